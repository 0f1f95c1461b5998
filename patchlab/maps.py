"""From patch scores to anomaly maps and image scores.

patch grid (28 x 28) --bilinear--> 224 x 224 --Gaussian, sigma = 4--> anomaly map
image score: the maximum, re-weighted as PatchCore does (the paper's Eq. 3), or plain, or
             the mean of the top q % of the grid, or the maximum less the image's median;
             optionally smoothed over each image's most similar images (MuSc's RsCIN)
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from patchlab.knn import knn
from patchlab.methods import ScoringInputs

# RunConfig.image_score's default ("top") was chosen by measurement (docs/results.md)
IMAGE_SCORES = ("patchcore", "eq3", "max", "top", "max_median")
NEEDS_SUPPORT = ("patchcore", "eq3")  # the rules that read the neighbour table


def anomaly_maps(patch_scores: torch.Tensor, size: int = 224, sigma: float = 4.0) -> np.ndarray:
    """Upsample patch score grids bilinearly and smooth them with a Gaussian.

    Parameters
    ----------
    patch_scores : torch.Tensor, shape (n, h, w)
    size : int
        Side of the output maps, in pixels (the network's input side).
    sigma : float
        Standard deviation of the Gaussian blur, in output pixels (0 disables it).

    Returns
    -------
    np.ndarray, shape (n, size, size), float32
    """
    grid = patch_scores.float()[:, None]
    up = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    maps = up.numpy()
    if sigma > 0:  # scipy's gaussian_filter: truncated at 4 sigma, 'reflect' borders
        maps = ndimage.gaussian_filter(maps, sigma=(0, sigma, sigma))
    return maps.astype(np.float32, copy=False)


def check_image_score(mode: str) -> None:
    """An error naming the choices when ``mode`` is not an image-score rule."""
    if mode not in IMAGE_SCORES:
        raise ValueError(f"image score mode={mode!r} is unknown; choose one of {IMAGE_SCORES}")


def support_distances(
    patch_scores: torch.Tensor, inputs: ScoringInputs, b: int = 9
) -> torch.Tensor:
    """What the re-weighted image scores weigh a* with: the distances from each image's top
    patch to the b nearest bank features of *its* nearest bank feature.

    For image i, f_i* is the patch of maximal score a_i*, f* its nearest bank feature (the
    first column of its table row) and N_b(f*) the b nearest bank features of f*, f* itself
    first (PatchCore's "support samples"). The query's own entries stay excluded as in the
    table (``self``/``nearest``: f_i* itself; ``image``: every patch of image i).

    Parameters
    ----------
    patch_scores : torch.Tensor, shape (n, h, w)
    inputs : ScoringInputs
        The set's features, its neighbour table and the bank (:meth:`ScoringInputs.bank_features`).
    b : int, >= 1

    Returns
    -------
    torch.Tensor, shape (n, b), float64, on the CPU
        dist(f_i*, m) for m in N_b(f*), column 0 being m = f*.
    """
    n, h, w, d = inputs.features.shape
    flat = inputs.features.reshape(n * h * w, d)
    bank = inputs.bank_features()
    if not 1 <= b <= len(bank):
        raise ValueError(f"b={b} must lie in [1, {len(bank)} bank features]")
    table = inputs.table()
    top = patch_scores.reshape(n, -1).argmax(1) + torch.arange(n) * h * w  # f_i*, patch index
    f_star = bank[table.indices[top, 0].to(bank.device)]  # (n, d) nearest bank feature
    blind = inputs.bank is None or inputs.bank.blind  # else no query is in the bank
    exclude = {"nearest": "self"}.get(table.exclude, table.exclude) if blind else "none"
    rows = inputs.bank_ids()
    bank_groups = rows // (h * w) if inputs.bank is None else inputs.bank.groups
    support = knn(  # N_b(f*): f* is found first (distance 0), as it is not the query
        f_star,
        b,
        bank,
        exclude=exclude,
        query_ids=top if blind else None,
        bank_ids=rows if blind else None,
        query_groups=torch.arange(n) if blind else None,
        bank_groups=bank_groups if blind else None,
        progress=False,
    )
    members = bank[support.indices.to(bank.device)].double()  # (n, b, d)
    return (flat[top.to(flat.device)].double()[:, None] - members).norm(dim=2).cpu()


def image_scores(
    patch_scores: torch.Tensor,
    mode: str = "patchcore",
    support: torch.Tensor | None = None,
    q: float = 0.01,
) -> np.ndarray:
    """One anomaly score per image.

    With s_i(p) the patch scores of image i, a_i* = max_p s_i(p), f_i* that patch, f* its
    nearest bank feature and D_m = dist(f_i*, m) for m in N_b(f*) (:func:`support_distances`,
    f* first):

    ``"max"``:        a_i = a_i*
    ``"patchcore"``:  a_i = (1 - exp(D_f*) / sum_{m in N_b(f*)} exp(D_m)) * a_i*
                      PatchCore's re-weighting, the function the paper says Eq. 3 is; the
                      weight lies in [0, 1) because f* is in N_b(f*).
    ``"eq3"``:        a_i = (1 - exp(a_i*) / sum_{m in N_b(f*)} exp(D_m)) * a_i*
                      Eq. 3 as printed. For PatchCore a_i* = D_f* and the two agree; for
                      PatchCluster a_i* is a mean of K distances, the weight turns negative
                      once a_i* > log sum exp(D) and the ranking of those images inverts.
    ``"top"``:        a_i = mean of the ceil(q * h * w) largest s_i(p)
                      (AnomalyDINO's image score, q = 1 %): less sensitive to one noisy patch.
    ``"max_median"``: a_i = a_i* - median_p s_i(p)
                      the peak above the image's own level: an image whose every patch is
                      far from the bank (lighting, a rare but normal variant) is not flagged.

    The ratios are computed as exp(x - logsumexp(D)), so large distances cannot overflow.

    Parameters
    ----------
    patch_scores : torch.Tensor, shape (n, h, w)
    mode : one of :data:`IMAGE_SCORES`
    support : torch.Tensor, shape (n, b), float64; needed by "patchcore" and "eq3"
    q : float in (0, 1]
        Share of the patch grid averaged by "top".

    Returns
    -------
    np.ndarray, shape (n,), float64
    """
    check_image_score(mode)
    grid = patch_scores.reshape(patch_scores.shape[0], -1).double().cpu()
    a_star = grid.amax(1)
    if mode == "max":
        return a_star.numpy()
    if mode == "top":
        if not 0 < q <= 1:
            raise ValueError(f"q (top_q) = {q} must lie in (0, 1]")
        top = max(1, math.ceil(q * grid.shape[1]))
        return grid.topk(top, dim=1).values.mean(1).numpy()
    if mode == "max_median":
        return (a_star - grid.quantile(0.5, dim=1)).numpy()  # the mean of the middle two if even
    if support is None:
        raise ValueError(f"image score {mode!r} needs support_distances(); use mode='max'")
    numerator = support[:, 0] if mode == "patchcore" else a_star
    weight = 1.0 - torch.exp(numerator - torch.logsumexp(support, 1))
    return (weight * a_star).numpy()


def rscin(
    scores: np.ndarray, global_features: torch.Tensor, windows: tuple[int, ...] = (2, 3)
) -> np.ndarray:
    """Image scores smoothed over each image's most similar images (after MuSc's RsCIN).

    With g_i the global feature of image i, W_ij = max(0, cos(g_i, g_j)) and N_k(i) the image
    i itself and its k - 1 most similar other images (the one kNN on the unit-normalised
    g, which orders images as the cosine does):

    s'_i = (1 / |windows|) sum_{k in windows} sum_{j in N_k(i)} W_ij s_j / sum_{j in N_k(i)} W_ij

    Each s'_i is a convex combination of scores (W_ii = 1), so an affine change of the scores
    (MuSc min-max normalises them first) changes s' the same way. A window of 1 leaves the
    scores as they are. MuSc's own windows are 2 and 3 on MVTec AD.

    Parameters
    ----------
    scores : np.ndarray, shape (n,)
    global_features : torch.Tensor, shape (n, c)
    windows : tuple of int, each >= 1 (one larger than n means all n images)

    Returns
    -------
    np.ndarray, shape (n,), float64
    """
    n = len(scores)
    if not windows or min(windows) < 1:
        raise ValueError(f"rscin windows {windows} must each be >= 1")
    windows = tuple(min(k, n) for k in windows)  # a window beyond the set is the whole set
    if global_features.shape[0] != n:
        raise ValueError(f"{global_features.shape[0]} global features for {n} image scores")
    g = torch.nn.functional.normalize(global_features.double().cpu(), dim=1)
    s = torch.as_tensor(scores, dtype=torch.float64)
    out = torch.zeros(n, dtype=torch.float64)
    widest = max(windows) - 1
    others = knn(g, widest, exclude="self", progress=False).indices if widest else None
    for k in windows:
        members = torch.arange(n)[:, None]
        if k > 1:
            members = torch.cat([members, others[:, : k - 1]], 1)  # (n, k): i first
        weight = (g[:, None] * g[members]).sum(2).clamp_min(0)  # W_ij
        weight[:, 0] = 1.0  # W_ii = 1, also for an all-zero global feature
        out += (weight * s[members]).sum(1) / weight.sum(1)
    return (out / len(windows)).numpy()


def image_scores_by_rule(
    patch: torch.Tensor,
    inputs: ScoringInputs,
    b: int,
    top_q: float,
    rscin_windows: tuple[int, ...] = (),
) -> dict[str, np.ndarray]:
    """The image scores under every rule the inputs allow, ``{rule: (n,) float64}``.

    The re-weighted rules (:data:`NEEDS_SUPPORT`) need the neighbour table: without one only
    ``max``, ``top`` and ``max_median`` are given. With ``rscin_windows``, each is smoothed by
    :func:`rscin` over the images' global features (``inputs.global_features``).
    """
    support = None
    if inputs.neighbours is not None:
        support = support_distances(patch, inputs, b)
    by_rule = {
        rule: image_scores(patch, rule, support, top_q)
        for rule in IMAGE_SCORES
        if support is not None or rule not in NEEDS_SUPPORT
    }
    if rscin_windows:
        if inputs.global_features is None:
            raise ValueError("rscin needs the global features: prepare() with rscin set")
        by_rule = {r: rscin(s, inputs.global_features, rscin_windows) for r, s in by_rule.items()}
    return by_rule
