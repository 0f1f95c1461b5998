"""What every kNN backend shares: its contract (:class:`Search`), centring, and masking the
excluded pairs of a block."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from patchlab.knn import Engine

Keys = tuple[torch.Tensor | None, torch.Tensor | None]  # (query key, bank key), or (None, None)


class Search(Protocol):
    """A backend's fast pass: the ``k`` nearest candidates of every query, in its precision.

    Parameters
    ----------
    queries : (n_q, d) and bank : (n_b, d), float, on one device (scaled by
        :func:`patchlab.knn.knn` into a safe range); ``symmetric``: the bank is the queries.
    k : candidates per row (the k asked for plus the certification pool).
    ids, groups : :data:`Keys`; a pair of rows whose keys are equal is excluded.
    engine : the resolved :class:`patchlab.knn.Engine` (precision, block size, merge...).
    progress : show a progress bar.

    Returns
    -------
    (squared distances (n_q, k) ascending, bank indices (n_q, k) int64); entries that cannot
    be filled are (+inf, -1). :func:`patchlab.knn._exact.rerank` ranks them exactly.
    """

    def __call__(
        self,
        queries: torch.Tensor,
        bank: torch.Tensor,
        k: int,
        symmetric: bool,
        ids: Keys,
        groups: Keys,
        engine: Engine,
        progress: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def centred(
    queries: torch.Tensor, bank: torch.Tensor, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets translated by the bank mean, float32, contiguous.

    Distances are unchanged, the norms shrink, and so does the cancellation error of
    ||f||^2 + ||m||^2 - 2<f, m>. With ``symmetric`` the bank is the queries.
    """
    mean = bank.float().mean(0, keepdim=True)
    q = (queries.float() - mean).contiguous()
    return q, q if symmetric else (bank.float() - mean).contiguous()


def mask_excluded(d2, r0, r1, c0, c1, ids, groups) -> None:
    """Set the excluded entries of block (rows r0:r1, columns c0:c1) to +inf, in place.

    ``ids`` and ``groups`` are (query key, bank key) pairs, or (None, None); an entry is
    excluded when its two keys are equal. Only blocks whose key ranges meet are compared.
    """
    for q_key, b_key in (ids, groups):
        if q_key is None:
            continue
        qk, bk = q_key[r0:r1], b_key[c0:c1]
        if qk.min() <= bk.max() and bk.min() <= qk.max():
            d2.masked_fill_(qk[:, None] == bk[None, :], math.inf)
