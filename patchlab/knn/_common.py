"""Helpers every kNN backend shares: centring, and masking the excluded pairs of a block."""

from __future__ import annotations

import math

import torch


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
