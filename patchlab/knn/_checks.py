"""The checks of :func:`patchlab.knn.knn`'s arguments, in one place (the Dask path runs them
too, before anything leaves the process), and the exclusion keys they resolve."""

from __future__ import annotations

import numpy as np
import torch

EXCLUDE_MODES = ("none", "self", "nearest", "image")


def check_arguments(
    queries,
    k,
    bank=None,
    exclude="self",
    query_ids=None,
    bank_ids=None,
    query_groups=None,
    bank_groups=None,
) -> tuple[torch.Tensor, torch.Tensor, tuple, tuple]:
    """The checks of :func:`knn`'s arguments, with its clear errors (also run by
    :func:`patchlab.distributed.knn_on_cluster` before anything leaves the process).

    Returns
    -------
    (queries, bank, ids, groups): the features as floating tensors (``bank`` is ``queries``
    for a self-kNN) and the (query key, bank key) pairs of the exclusion, or (None, None).
    """
    queries = _as_features(queries, "queries")
    symmetric = bank is None
    bank = queries if symmetric else _as_features(bank, "bank")
    _check_inputs(queries, bank, k, exclude)
    _check_keys(queries, bank, symmetric, query_ids, bank_ids, query_groups, bank_groups)
    ids, groups = _exclusion_keys(
        exclude, symmetric, queries, query_ids, bank_ids, query_groups, bank_groups
    )
    excluded = _excluded_count(*ids, *groups)
    k_search = k + 1 if exclude == "nearest" else k
    n_b = bank.shape[0]
    if k_search > n_b - excluded:
        raise ValueError(
            f"k={k} is larger than the bank allows: {n_b} bank features, up to {excluded} "
            f"excluded per query with exclude={exclude!r}; choose "
            f"k <= {n_b - excluded - (k_search - k)}"
        )
    return queries, bank, ids, groups


def _as_features(x, name: str) -> torch.Tensor:
    """A (n, d) floating tensor from a tensor or a numpy array, or a clear error."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch tensor or numpy array, got {type(x).__name__}")
    if x.dtype == torch.bool or not (x.is_floating_point() or x.dtype in _INTEGERS):
        raise ValueError(f"{name} must hold numbers (float or int), got dtype {x.dtype}")
    if not x.is_floating_point():
        x = x.float()
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D (rows, d) array, got {tuple(x.shape)}")
    return x


def _check_keys(queries, bank, symmetric, query_ids, bank_ids, query_groups, bank_groups):
    """Every id and group array has one entry per row of what it labels."""
    for name, key, rows in (
        ("query_ids", query_ids, queries),
        ("query_groups", query_groups, queries),
        ("bank_ids", bank_ids, bank),
        ("bank_groups", bank_groups, bank),
    ):
        if key is not None and (key.ndim != 1 or len(key) != len(rows)):
            what = "queries" if name.startswith("query") else "bank"
            raise ValueError(
                f"{name} must hold one entry per row of the {what} ({len(rows)}), got shape "
                f"{tuple(key.shape)}"
            )


def _check_inputs(queries, bank, k, exclude) -> None:
    if exclude not in EXCLUDE_MODES:
        raise ValueError(f"exclude={exclude!r} is unknown; choose one of {EXCLUDE_MODES}")
    if queries.ndim != 2 or bank.ndim != 2 or queries.shape[1] != bank.shape[1]:
        raise ValueError(
            f"queries and bank must be 2-D with the same width; got {tuple(queries.shape)} "
            f"and {tuple(bank.shape)}"
        )
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    for name, x in (("queries", queries), ("bank", bank))[: 1 if bank is queries else 2]:
        # a finite sum needs finite entries; only a non-finite one (NaN, inf or an overflow)
        # is worth the exact, memory-hungrier check
        if not torch.isfinite(x.sum()) and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} hold NaN or inf values; check the features")


def _exclusion_keys(exclude, symmetric, queries, query_ids, bank_ids, query_groups, bank_groups):
    """The (query key, bank key) pairs of the ids and groups an exclusion compares."""
    device = queries.device
    if symmetric and (bank_ids is not None or bank_groups is not None):
        raise ValueError("self-kNN (bank=None): pass query_ids / query_groups only")
    ids = groups = (None, None)
    if exclude == "self":
        if query_ids is None and symmetric:
            query_ids = torch.arange(queries.shape[0], device=device)
        if query_ids is None or (bank_ids is None and not symmetric):
            raise ValueError(
                "exclude='self' with a separate bank needs query_ids and bank_ids "
                "(the identity of every row); use exclude='none' if queries are not in the bank"
            )
        query_ids = query_ids.to(device)
        ids = (query_ids, query_ids if symmetric else bank_ids.to(device))
    if exclude == "image":
        if query_groups is None:
            raise ValueError("exclude='image' needs query_groups (the image index of every query)")
        if bank_groups is None and not symmetric:
            raise ValueError("exclude='image' with a separate bank needs bank_groups as well")
        query_groups = query_groups.to(device)
        groups = (query_groups, query_groups if symmetric else bank_groups.to(device))
    return ids, groups


def _excluded_count(query_ids, bank_ids, query_groups, bank_groups) -> int:
    """The most bank entries any one query can lose to exclusion."""
    for key in (bank_ids, bank_groups):
        if key is not None:
            return int(torch.unique(key, return_counts=True)[1].max())
    return 0


_INTEGERS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
