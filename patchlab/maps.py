"""From patch scores to anomaly maps and image scores.

patch grid (28 x 28) --bilinear--> 224 x 224 --Gaussian, sigma = 4--> anomaly map
image score: Eq. 3 (PatchCore's re-weighted maximum) or the plain maximum
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from patchlab.knn import Neighbours

IMAGE_SCORES = ("eq3", "max")


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


def image_scores(
    patch_scores: torch.Tensor,
    neighbours: Neighbours | None = None,
    mode: str = "eq3",
    b: int = 9,
) -> np.ndarray:
    """One anomaly score per image.

    ``"max"``: a = max over the image's patches of the patch score.

    ``"eq3"`` (the paper's Eq. 3, as PatchCore): with f* the patch of maximal score a*, and
    N(f*) its b nearest bank features (from the neighbour table),

        a = (1 - exp(a*) / sum_{f in N(f*)} exp(dist(f*, f))) * a*

    computed as ``1 - exp(a* - logsumexp(dist))`` so that large distances cannot overflow.

    Parameters
    ----------
    patch_scores : torch.Tensor, shape (n, h, w)
    neighbours : Neighbours, (n * h * w, k_max) table in the same patch order; needed for eq3
    mode : {"eq3", "max"}
    b : int, 1 <= b <= k_max

    Returns
    -------
    np.ndarray, shape (n,), float64
    """
    if mode not in IMAGE_SCORES:
        raise ValueError(f"image score mode={mode!r} is unknown; choose one of {IMAGE_SCORES}")
    flat = patch_scores.reshape(patch_scores.shape[0], -1).double()
    a_star, where = flat.max(1)
    if mode == "max":
        return a_star.numpy()
    if neighbours is None:
        raise ValueError("image score 'eq3' needs the neighbour table; use mode='max'")
    if not 1 <= b <= neighbours.k:
        raise ValueError(f"b={b} must lie in [1, k_max={neighbours.k}] of the neighbour table")
    patch_index = torch.arange(flat.shape[0]) * flat.shape[1] + where  # f* of every image
    dist = neighbours.distances[patch_index, :b].double()  # dist(f*, f), f in N(f*)
    weight = 1.0 - torch.exp(a_star - torch.logsumexp(dist, 1))
    return (weight * a_star).numpy()
