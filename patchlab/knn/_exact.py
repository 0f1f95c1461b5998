"""The last step of every search: the candidates' distances recomputed exactly, in float64.

A backend's fast pass keeps ``k + pool`` candidates per query. Its float32 distances carry
rounding: the GEMM form ||f||^2 + ||m||^2 - 2<f, m> loses about eps * (||f||^2 + ||m||^2),
which is the whole distance for near duplicates and reorders near ties at the k-th place. Here
every candidate's distance is computed again from the difference of the original features,

    d(f, m)^2 = sum_j (f_j - m_j)^2        in float64 (a compiled loop, rows in parallel),

and the k nearest are taken, ties by the smaller bank index (on the CPU one compiled pass,
rows in parallel; on CUDA torch ops on bounded chunks). The table then equals a float64
brute force wherever the true k nearest are among the candidates, which ``pool`` ensures up to
the float32 rounding of the fast pass.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange

from patchlab.knn._heaps import matched_threads
from patchlab.knn._precision import error_coefficients

BIG_INDEX = np.iinfo(np.int64).max  # a missing candidate (-1), sorted after every index


@njit(parallel=True, nogil=True, fastmath={"contract", "reassoc"}, cache=True)
def _rerank_cpu(q, b, cand, out_d, out_i):  # pragma: no cover - compiled
    """For every row i, in parallel: the candidates sorted by index (-1 last), their squared
    distances ||q[i] - b[c]||^2 summed in float64, and the first k of a stable sort by
    distance into out_d[i], out_i[i] (k = out_d.shape[1]; +inf and -1 past the candidates)."""
    n, w = cand.shape
    k = out_d.shape[1]
    d = q.shape[1]
    for i in prange(n):
        c = cand[i].copy()
        for j in range(w):
            if c[j] < 0:
                c[j] = BIG_INDEX
        c.sort()
        d2 = np.empty(w, np.float64)
        for j in range(w):
            if c[j] == BIG_INDEX:
                d2[j] = np.inf
                continue
            s = 0.0
            for t in range(d):
                diff = np.float64(q[i, t]) - np.float64(b[c[j], t])
                s += diff * diff
            d2[j] = s
        order = np.argsort(d2, kind="mergesort")  # stable: equal distances keep index order
        for t in range(k):
            out_d[i, t] = d2[order[t]]
            out_i[i, t] = -1 if c[order[t]] == BIG_INDEX else c[order[t]]


def rerank(
    queries: torch.Tensor, bank: torch.Tensor, candidates: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest of each row's candidates, by exact float64 distances.

    Parameters
    ----------
    queries : torch.Tensor, shape (n, d)
    bank : torch.Tensor, shape (m, d)
        Features in float64 or float32 (float16/bfloat16 are widened); the differences are
        formed in float64 either way.
    candidates : torch.Tensor, shape (n, w), int64
        Bank rows of each query's candidates (w >= k, each at most once), -1 for none.
    k : int

    Returns
    -------
    squared distances (n, k) float64 ascending (+inf where fewer than k candidates), and bank
    indices (n, k) int64 (-1 there), on the candidates' device; among equal distances the
    smaller index comes first.
    """
    n, w = candidates.shape
    # the features as given: float64 stays float64 (beyond float32's range too), float16 and
    # bfloat16 become float32; once, a no-op for a float32 bank
    dtype = torch.float64 if torch.float64 in (queries.dtype, bank.dtype) else torch.float32
    bank = bank.detach().to(dtype).contiguous()
    out_d = torch.empty(n, k, dtype=torch.float64, device=candidates.device)
    out_i = torch.empty(n, k, dtype=torch.int64, device=candidates.device)
    if candidates.device.type == "cpu":  # one compiled pass, rows in parallel
        q = queries.detach().to(dtype).contiguous().numpy()
        matched_threads()
        _rerank_cpu(q, bank.numpy(), candidates.contiguous().numpy(), out_d.numpy(), out_i.numpy())
        return out_d, out_i
    rows = max(1, 2**24 // w)  # a chunk's (rows, w) tables stay near 128 MB
    for s in range(0, n, rows):
        out_d[s : s + rows], out_i[s : s + rows] = _rerank_rows(
            queries[s : s + rows], bank, candidates[s : s + rows], k
        )
    return out_d, out_i


def _rerank_rows(queries, bank, candidates, k):
    """:func:`rerank` of one chunk of rows on CUDA, with torch ops."""
    # ties by index: sort the candidates by index (-1 last), then stably by distance
    big = torch.iinfo(torch.int64).max
    cand = torch.where(candidates < 0, big, candidates).sort(1).values
    cand = cand.masked_fill_(cand == big, -1)
    d2 = _distances_torch(queries, bank, cand)
    order = d2.argsort(dim=1, stable=True)[:, :k]
    return d2.gather(1, order), cand.gather(1, order)


def _distances_torch(queries, bank, cand, chunk_bytes: int = 2**28) -> torch.Tensor:
    """||q_i - b_c||^2 of every candidate c, in float64 torch ops (CUDA), (chunk, w, d)
    float64 within ``chunk_bytes``; +inf where c is -1."""
    n, w = cand.shape
    out = torch.empty(n, w, dtype=torch.float64, device=cand.device)
    chunk = max(1, chunk_bytes // (8 * w * bank.shape[1]))
    for s in range(0, n, chunk):
        c = cand[s : s + chunk]
        diff = bank[c.clamp_min(0)].double() - queries[s : s + chunk].double()[:, None, :]
        out[s : s + chunk] = diff.pow_(2).sum(2).masked_fill_(c < 0, math.inf)
    return out


def uncertain_rows(
    fast: torch.Tensor,
    candidates: torch.Tensor,
    exact_kth: torch.Tensor,
    queries: torch.Tensor,
    bank: torch.Tensor,
    precision: str = "fp32",
) -> torch.Tensor:
    """The rows whose k nearest may lie outside the fast pass's candidates.

    The fast pass's GEMM form of a squared distance errs by at most

        err(f, m) = c_x ||f - mu|| ||m - mu|| + c_n (||f - mu||^2 + ||m - mu||^2)

    (mu the bank mean the backend centred on; (c_x, c_n) from
    :func:`patchlab.knn._precision.error_coefficients`: for float32, c_x = 0 and
    c_n = 2 (d + 3) eps32, as a float32 dot product of length d errs by at most
    d eps32 ||f|| ||m||, whatever the summation order). Let T be the fast distance of the last
    candidate: every other bank entry m was computed at T or more (or skipped, which proves
    more), so its true distance is at least T - err(f, m). Only entries with
    ||m - mu|| <= ||f - mu|| + sqrt(D_k) can be nearer than D_k, the exact k-th distance among
    the candidates (the triangle inequality), so with M^2 the smaller of (||f - mu|| +
    sqrt(D_k))^2 and the largest ||m - mu||^2,

        T - c_x ||f - mu|| M - c_n (||f - mu||^2 + M^2) > D_k

    proves that the k nearest are all candidates. Rows whose every allowed bank entry is a
    candidate are certain too.

    Parameters
    ----------
    fast : torch.Tensor, shape (n, w), float32
        The fast pass's squared distances, ascending (+inf past the last candidate).
    candidates : torch.Tensor, shape (n, w), int64 (-1 for none)
    exact_kth : torch.Tensor, shape (n,), float64
        D_k: the exact k-th squared distance among each row's candidates.
    queries, bank : the original features, (n, d) and (m, d)
    precision : {"fp32", "bf16"}
        The fast pass's GEMM precision.

    Returns
    -------
    torch.Tensor, shape (n,), bool
    """
    n, w = candidates.shape
    complete = (candidates < 0).any(1)  # fewer than w allowed entries: all are candidates
    if complete.all():
        return torch.zeros(n, dtype=torch.bool, device=candidates.device)
    mean = _mean64(bank)
    q_sq = _centred_sq_norms(queries, mean)
    reach = (q_sq.sqrt() + exact_kth.sqrt()).pow(2)
    m_sq = torch.minimum(reach, _centred_sq_norms(bank, mean).max())
    c_x, c_n = error_coefficients(precision, queries.shape[1])
    err = c_x * (q_sq * m_sq).sqrt() + c_n * (q_sq + m_sq)
    certain = fast[:, w - 1].double() - err > exact_kth
    return ~complete & ~certain


def _mean64(x: torch.Tensor, rows: int = 8192) -> torch.Tensor:
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], rows):
        total += x[s : s + rows].double().sum(0)
    return total / x.shape[0]


def _centred_sq_norms(x: torch.Tensor, mean: torch.Tensor, rows: int = 8192) -> torch.Tensor:
    """||x_i - mean||^2 in float64, a bounded chunk at a time."""
    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], rows):
        out[s : s + rows] = (x[s : s + rows].double() - mean).pow_(2).sum(1)
    return out
