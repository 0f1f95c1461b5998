"""Patch scoring methods: one function each, one registry.

Each method turns the neighbour table of every patch (computed once, for ``k_max``) into one
anomaly score per patch. Changing K only slices the table, so re-scoring is instant.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from patchlab.knn import Neighbours


def patchcluster(neighbours: Neighbours, k: int) -> torch.Tensor:
    """PatchCluster (Eq. 2): the mean distance to the K nearest neighbours.

        s(f) = (1/K) * sum_{m in N_K(f)} ||f - m||_2,    the feature itself excluded

    Parameters
    ----------
    neighbours : Neighbours, (n_patches, k_max) table
    k : int, 1 <= k <= k_max

    Returns
    -------
    torch.Tensor, shape (n_patches,), float32
    """
    _check_k(neighbours, k)
    return neighbours.distances[:, :k].mean(1)


def patchcore(neighbours: Neighbours, k: int = 1) -> torch.Tensor:
    """PatchCore: the distance to the nearest neighbour (PatchCluster with K = 1).

    ``k`` is accepted for a uniform signature and ignored.

    Returns
    -------
    torch.Tensor, shape (n_patches,), float32
    """
    return neighbours.distances[:, 0].clone()


def _check_k(neighbours: Neighbours, k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"K must be a positive integer, got {k!r}")
    if k > neighbours.k:
        raise ValueError(
            f"K={k} exceeds the neighbour table's k_max={neighbours.k}; recompute the "
            f"neighbours with k_max >= {k} (--k-max)"
        )


METHODS: dict[str, Callable[[Neighbours, int], torch.Tensor]] = {
    "patchcluster": patchcluster,
    "patchcore": patchcore,
}


def score_patches(method: str, neighbours: Neighbours, k: int) -> torch.Tensor:
    """Score every patch with the method called ``method`` (a key of :data:`METHODS`)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; choose one of {sorted(METHODS)}")
    return METHODS[method](neighbours, k)
