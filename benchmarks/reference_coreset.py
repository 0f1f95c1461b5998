"""The reference greedy coreset, as patchcore-inspection's ApproximateGreedyCoresetSampler runs it,
transcribed to plain numpy: one full distance column per iteration, concatenated to the running
anchor distances and reduced with a min (allocations inside the loop, norms recomputed).

Used by tests/test_coreset.py and benchmarks/coreset.py as the independent computation.
"""

from __future__ import annotations

import numpy as np
import torch


def batchwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances (len(a), len(b)) as PatchCore computes them."""
    a_times_a = np.einsum("ij,ij->i", a, a)[:, None]
    b_times_b = np.einsum("ij,ij->i", b, b)[None, :]
    return np.sqrt(np.clip(-2 * (a @ b.T) + a_times_a + b_times_b, 0, None))


def reference_greedy(projected: np.ndarray, starts: np.ndarray, m: int) -> np.ndarray:
    """Indices picked by the approximate greedy k-centre loop."""
    anchor = batchwise_distances(projected, projected[starts]).mean(-1).reshape(-1, 1)
    picked = []
    for _ in range(m):
        select = int(np.argmax(anchor))
        picked.append(select)
        column = batchwise_distances(projected, projected[select : select + 1])
        anchor = np.concatenate([anchor, column], axis=-1)
        anchor = np.min(anchor, axis=1).reshape(-1, 1)
    return np.array(picked)


def reference_greedy_torch(projected: torch.Tensor, starts: np.ndarray, m: int) -> np.ndarray:
    """The same loop in torch on the tensor's device, as patchcore-inspection runs it there:
    ``torch.argmax(...).item()`` per pick (a host round trip), norms recomputed, the anchor
    column concatenated and reduced with a min.

    Parameters
    ----------
    projected : torch.Tensor, shape (n, p), float32, on any device
    starts : numpy.ndarray of int, the anchor rows
    m : int, number of picks

    Returns
    -------
    numpy.ndarray, shape (m,), int64: the picked rows in order
    """

    def distances(a, b):
        a_times_a = a.unsqueeze(1).bmm(a.unsqueeze(2)).reshape(-1, 1)
        b_times_b = b.unsqueeze(1).bmm(b.unsqueeze(2)).reshape(1, -1)
        return (-2 * a.mm(b.T) + a_times_a + b_times_b).clamp(0, None).sqrt()

    anchor = distances(projected, projected[torch.as_tensor(starts)]).mean(-1).reshape(-1, 1)
    picked = []
    for _ in range(m):
        select = torch.argmax(anchor).item()
        picked.append(select)
        column = distances(projected, projected[select : select + 1])
        anchor = torch.cat([anchor, column], dim=-1)
        anchor = torch.min(anchor, dim=1).values.reshape(-1, 1)
    return np.array(picked)
