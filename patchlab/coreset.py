"""Approximate greedy coreset (PatchCore's k-centre selection), in O(N) memory.

The bank is first projected to 128 dimensions by a seeded random linear map; distances in the
projection approximate those of the 1024-d features. Then, from a set of random starting
points, farthest-point iterations pick the patch farthest from everything picked so far:

    r(f)     <- mean_{s in starts} ||P f - P s||           (anchor distance)
    repeat M times:
        c    <- argmax_f r(f)                               (the next coreset member)
        r(f) <- min(r(f), ||P f - P c||)                    (running minimum, in place)

This is exactly the loop of patchcore-inspection's ``ApproximateGreedyCoresetSampler``. Each
iteration needs one distance column, computed with precomputed norms,
||a - c||^2 = ||a||^2 + ||c||^2 - 2 <a, c>, written into preallocated buffers: no N x N matrix,
no allocation of the bank's size inside the loop (on a GPU only the picked row is copied, and
the pick never travels to the host until the end).
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

PROJECTION_DIM = 128
N_STARTS = 10
CORESET_VERSION = 1  # bump whenever the picks for the same inputs change (cache keys)


def project(features: torch.Tensor, dim: int = PROJECTION_DIM, seed: int = 0) -> torch.Tensor:
    """Seeded random linear projection (PatchCore's ``torch.nn.Linear(d, dim, bias=False)``).

    Parameters
    ----------
    features : torch.Tensor, shape (n, d)

    Returns
    -------
    torch.Tensor, shape (n, dim), float32 (the features themselves when d <= dim)
    """
    if features.shape[1] <= dim:
        return features.float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mapper = torch.nn.Linear(features.shape[1], dim, bias=False)
    with torch.no_grad():
        return mapper.to(features.device)(features.float())


def greedy_coreset(
    features: torch.Tensor,
    ratio: float,
    *,
    seed: int = 0,
    projection_dim: int = PROJECTION_DIM,
    progress: bool = True,
) -> torch.Tensor:
    """Indices of an approximate greedy k-centre coreset.

    Parameters
    ----------
    features : torch.Tensor, shape (n, d)
        The memory bank (any device).
    ratio : float in (0, 1]
        Coreset size as a fraction of n (1 returns every index).
    seed : int
        Seed of the projection and of the starting points.
    projection_dim : int
        Dimension of the random projection.

    Returns
    -------
    torch.Tensor, shape (max(1, int(n * ratio)),), int64
        Bank rows, in the order they were picked.
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"coreset ratio must lie in (0, 1], got {ratio}")
    n = features.shape[0]
    if ratio == 1:
        return torch.arange(n)
    m = max(1, int(n * ratio))
    x = project(features, projection_dim, seed)
    starts = np.random.default_rng(seed).choice(n, min(N_STARTS, n), replace=False)
    return torch.from_numpy(_farthest_points(x, starts, m, progress))


def _farthest_points(x: torch.Tensor, starts: np.ndarray, m: int, progress: bool) -> np.ndarray:
    """The greedy loop; ``x`` (n, p) projected features, ``starts`` the anchor rows.

    On the CPU it runs in numpy with the reference sampler's arithmetic, operation for
    operation, so it picks the same indices; elsewhere (CUDA) :func:`_farthest_points_torch`.
    """
    if x.device.type != "cpu":
        return _farthest_points_torch(x, starts, m, progress)
    x = x.numpy()
    norms = np.einsum("ij,ij->i", x, x)[:, None]  # ||a||^2
    # anchor distance: mean Euclidean distance to the starting points
    d2 = -2 * (x @ x[starts].T) + norms + norms[starts].T
    running = np.sqrt(np.clip(d2, 0, None)).mean(-1).reshape(-1, 1)
    column = np.empty_like(running)
    picked = np.empty(m, np.int64)
    for t in tqdm(range(m), desc="coreset", unit="pt", disable=not progress, mininterval=0.5):
        c = int(np.argmax(running))
        picked[t] = c
        # ||a - c|| = sqrt(max(0, -2 <a, c> + ||a||^2 + ||c||^2)), into a preallocated column
        np.matmul(x, x[c : c + 1].T, out=column)
        column *= -2
        column += norms
        column += norms[c]
        np.clip(column, 0, None, out=column)
        np.sqrt(column, out=column)
        np.minimum(running, column, out=running)
    return picked


def _farthest_points_torch(
    x: torch.Tensor, starts: np.ndarray, m: int, progress: bool
) -> np.ndarray:
    """The same loop in torch, for a GPU: the pick ``c`` stays a device tensor that indexes
    the next column, so no iteration waits for the host (one copy of the picks at the end);
    the kernels queue ahead while the GPU reads ``x`` once per pick."""
    norms = (x * x).sum(1, keepdim=True)  # ||a||^2, (n, 1)
    rows = torch.from_numpy(starts).to(x.device)
    d2 = -2 * (x @ x[rows].T) + norms + norms[rows].T
    running = d2.clamp_min(0).sqrt().mean(-1, keepdim=True)
    column = torch.empty_like(running)
    picked = torch.empty(m, dtype=torch.int64, device=x.device)
    for t in tqdm(range(m), desc="coreset", unit="pt", disable=not progress, mininterval=0.5):
        c = running.argmax().view(1)  # on the device: no synchronisation
        picked[t] = c[0]
        torch.matmul(x, x.index_select(0, c).T, out=column)
        column.mul_(-2)
        column.add_(norms)
        column.add_(norms.index_select(0, c))
        column.clamp_(min=0).sqrt_()
        torch.minimum(running, column, out=running)
    return picked.cpu().numpy()
