"""Exact k-nearest neighbours of patch features: the one kNN of patchlab.

Every scoring method reads the same neighbour table, computed once for ``k_max``:

    dist(f, m) = ||f - m||_2                                (Euclidean, never squared)
    N_k(f)     = the k bank features m != f with the smallest dist(f, m)

The bank is never held as an N x N matrix. The ``torch`` backend works on blocks of rows and
columns: a block of squared distances comes from one GEMM,

    ||f - m||^2 = ||f||^2 + ||m||^2 - 2 <f, m>,

and only the entries below each row's current k-th best distance (a cheap comparison) are merged
into that row's running top-k. When the queries are the bank itself ("self-kNN"), the distance
matrix is symmetric: each block pair (i, j), i <= j, is computed once and merged into the rows of
both blocks, halving the GEMM work.

What counts as "the feature itself" (``exclude``):

- ``"none"``:    nothing is excluded (queries that are not in the bank, e.g. one-class testing).
- ``"self"``:    the bank entry with the query's own id (exact; ids default to positions).
- ``"nearest"``: always drop the first neighbour (the paper's "k = 2" for PatchCore and SPADE).
- ``"image"``:   every bank entry of the query's own image (needs ``query_groups``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

EXCLUDE_MODES = ("none", "self", "nearest", "image")
KNN_VERSION = 2  # bump whenever the tables computed for the same inputs change (cache keys)
BACKENDS = ("auto", "torch", "keops")
# backend="auto": the fastest backend measured for (device, largest d) with benchmarks/knn.py
# (docs/performance.md). CPU: the blocked GEMM won at every size measured, d = 64 included.
# CUDA (one H200): the GEMM ran 300 000 x 1024 in 3.9 s; KeOps 2.3 could not be measured
# there (it crashed generating its first CUDA kernel), so the GEMM.
AUTO_BACKEND = {"cpu": ((math.inf, "torch"),), "cuda": ((math.inf, "torch"),)}
PRECISIONS = ("fp32", "tf32", "bf16")
# the CPU merges blocks into per-row heaps with compiled scans (patchlab._merge_cpu); False
# selects the torch merge that CUDA uses (the tests run both)
CPU_HEAPS = True
# the CPU self-kNN reorders the bank into cluster-aligned blocks and skips the block pairs that
# a triangle-inequality bound proves useless (patchlab._blocks); False computes every pair
CPU_SKIP = True


@dataclass(frozen=True)
class Neighbours:
    """A neighbour table.

    Attributes
    ----------
    distances : torch.Tensor, shape (n_queries, k), float32
        Euclidean distances to the k nearest bank features, ascending along each row.
    indices : torch.Tensor, shape (n_queries, k), int64
        Row indices of those features in the bank.
    exclude : str
        The exclusion mode the table was computed with.
    """

    distances: torch.Tensor
    indices: torch.Tensor
    exclude: str

    @property
    def k(self) -> int:
        return self.distances.shape[1]

    def __len__(self) -> int:
        return self.distances.shape[0]


def knn(
    queries: torch.Tensor,
    k: int,
    bank: torch.Tensor | None = None,
    *,
    exclude: str = "self",
    query_ids: torch.Tensor | None = None,
    bank_ids: torch.Tensor | None = None,
    query_groups: torch.Tensor | None = None,
    bank_groups: torch.Tensor | None = None,
    backend: str = "torch",
    precision: str = "fp32",
    pool: int = 32,
    block_size: int | None = None,
    progress: bool = True,
) -> Neighbours:
    """Exact k nearest neighbours of every query among the bank.

    Parameters
    ----------
    queries : torch.Tensor, shape (n_queries, d), float
        Query features. On CUDA the computation runs on CUDA.
    k : int
        Number of neighbours to return per query, after exclusion.
    bank : torch.Tensor, shape (n_bank, d), optional
        Bank features. ``None`` means the queries are the bank (self-kNN, symmetric blocks).
    exclude : {"none", "self", "nearest", "image"}
        What counts as the query itself; see the module docstring.
    query_ids, bank_ids : torch.Tensor, shape (n_queries,) / (n_bank,), int64, optional
        Identities for ``exclude="self"``: bank entry j is excluded for query i when
        ``bank_ids[j] == query_ids[i]``. Default to positions (``arange``) for self-kNN; with a
        separate bank both are required (e.g. coreset rows keep their index in the full set).
    query_groups, bank_groups : torch.Tensor, shape (n_queries,) / (n_bank,), int64, optional
        Image index of every row, for ``exclude="image"``. ``bank_groups`` defaults to
        ``query_groups`` for self-kNN.
    backend : {"auto", "torch", "keops"}
        ``torch``: blocked GEMM with a threshold merge. ``keops``: PyKeOps LazyTensor reduction.
        ``auto``: the one measured fastest for the device and d (:data:`AUTO_BACKEND`).
    precision : {"fp32", "tf32", "bf16"}
        GEMM precision of the ``torch`` backend. With ``tf32`` (CUDA) or ``bf16`` the search
        keeps ``k + pool`` candidates per query, whose distances are then recomputed exactly in
        float32 (``||f - m||^2`` from the difference) to pick the k nearest: the result equals
        the float32 one whenever the true k nearest are among the candidates. On real
        1024-d features (docs/performance.md) ``tf32`` with pool 32 is as exact as float32 or
        better; ``bf16`` is not exact at any pool tried.
    pool : int
        Extra candidates kept for the exact re-ranking (``tf32``/``bf16`` only).
    block_size : int, optional
        Rows (and columns) per block; bounds memory at about ``3 * block_size**2 * 4`` bytes.
        Chosen from the device when omitted.
    progress : bool
        Show a progress bar.

    Returns
    -------
    Neighbours
        ``distances`` (n_queries, k) float32 ascending and ``indices`` (n_queries, k) int64.
    """
    symmetric = bank is None
    bank_ = queries if symmetric else bank
    _check_inputs(queries, bank_, k, exclude, backend)
    if backend == "auto":
        backend = auto_backend(queries.device, queries.shape[1])
    n_q, n_b = queries.shape[0], bank_.shape[0]
    device = queries.device

    if symmetric and (bank_ids is not None or bank_groups is not None):
        raise ValueError("self-kNN (bank=None): pass query_ids / query_groups only")
    if exclude == "self":
        if query_ids is None and symmetric:
            query_ids = torch.arange(n_q, device=device)
        if query_ids is None or (bank_ids is None and not symmetric):
            raise ValueError(
                "exclude='self' with a separate bank needs query_ids and bank_ids "
                "(the identity of every row); use exclude='none' if queries are not in the bank"
            )
        query_ids = query_ids.to(device)
        bank_ids = query_ids if symmetric else bank_ids.to(device)
    if exclude == "image":
        if query_groups is None:
            raise ValueError("exclude='image' needs query_groups (the image index of every query)")
        if bank_groups is None and not symmetric:
            raise ValueError("exclude='image' with a separate bank needs bank_groups as well")
        query_groups = query_groups.to(device)
        bank_groups = query_groups if symmetric else bank_groups.to(device)

    excluded = _excluded_count(exclude, query_ids, bank_ids, query_groups, bank_groups)
    k_search = k + 1 if exclude == "nearest" else k
    if k_search > n_b - excluded:
        raise ValueError(
            f"k={k} is larger than the bank allows: {n_b} bank features, up to {excluded} "
            f"excluded per query with exclude={exclude!r}; choose "
            f"k <= {n_b - excluded - (k_search - k)}"
        )

    ids = (query_ids, bank_ids) if exclude == "self" else (None, None)
    groups = (query_groups, bank_groups) if exclude == "image" else (None, None)
    if backend == "torch":
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} is unknown; choose one of {PRECISIONS}")
        wide = k_search if precision == "fp32" else min(k_search + pool, n_b - excluded)
        d2, idx = _knn_torch(
            queries, bank_, wide, symmetric, ids, groups, block_size, progress, precision
        )
        if precision != "fp32":
            d2, idx = _rerank(queries, bank_, idx, k_search)
    else:
        from patchlab.knn_keops import knn_keops

        d2, idx = knn_keops(queries, bank_, k_search, ids, groups, block_size, progress)
    if exclude == "nearest":
        d2, idx = d2[:, 1:], idx[:, 1:]
    return Neighbours(d2.clamp_min_(0).sqrt_(), idx, exclude)


def auto_backend(device: torch.device, d: int) -> str:
    """The backend :data:`AUTO_BACKEND` lists as fastest for this device and dimension."""
    rules = AUTO_BACKEND.get(torch.device(device).type, AUTO_BACKEND["cpu"])
    return next(name for max_d, name in rules if d <= max_d)


def _check_inputs(queries, bank, k, exclude, backend) -> None:
    if exclude not in EXCLUDE_MODES:
        raise ValueError(f"exclude={exclude!r} is unknown; choose one of {EXCLUDE_MODES}")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; choose one of {BACKENDS}")
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


def _excluded_count(exclude, query_ids, bank_ids, query_groups, bank_groups) -> int:
    """The most bank entries any one query can lose to exclusion."""
    if exclude == "self":
        return int(torch.unique(bank_ids, return_counts=True)[1].max())
    if exclude == "image":
        return int(torch.unique(bank_groups, return_counts=True)[1].max())
    return 0


def default_block_size(device: torch.device, n: int) -> int:
    """Block size for the blocked GEMM: 2048 on the CPU, up to 16384 on CUDA by free memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # three float32 blocks (distances, two masks) within a quarter of free memory
        return int(min(16384, max(1024, math.isqrt(free // 4 // 12))))
    return 2048


def centred(
    queries: torch.Tensor, bank: torch.Tensor, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets translated by the bank mean, float32, contiguous.

    Distances are unchanged, the norms shrink, and so does the cancellation error of
    ||f||^2 + ||m||^2 - 2<f, m> in float32. With ``symmetric`` the bank is the queries.
    """
    mean = bank.float().mean(0, keepdim=True)
    q = (queries.float() - mean).contiguous()
    return q, q if symmetric else (bank.float() - mean).contiguous()


def _knn_torch(queries, bank, k, symmetric, ids, groups, block_size, progress, precision="fp32"):
    """Blocked exact kNN returning squared distances (n_q, k) and indices (n_q, k)."""
    device = queries.device
    q, b = centred(queries, bank, symmetric)
    q_norm, b_norm = (q * q).sum(1), (b * b).sum(1)
    n_q, n_b = q.shape[0], b.shape[0]
    bs = block_size or default_block_size(device, max(n_q, n_b))
    low = {"bf16": torch.bfloat16}.get(precision)
    q_low, b_low = (q.to(low), b.to(low)) if low else (None, None)

    # CPU: per-row max-heaps filled by a compiled scan of each block (patchlab._merge_cpu);
    # CUDA: the torch threshold merge (_merge), whose tables stay sorted after every block
    heaps = None
    if device.type == "cpu" and CPU_HEAPS:
        from patchlab._merge_cpu import Heaps

        heaps = Heaps(n_q, k)
        buf = torch.empty(min(bs, n_q) * min(bs, n_b))  # (block rows * block columns,)
    else:
        best_d = torch.full((n_q, k), math.inf, device=device)
        best_i = torch.full((n_q, k), -1, dtype=torch.int64, device=device)
    blocks = None
    if symmetric and heaps is not None and CPU_SKIP and not low:
        from patchlab._blocks import ClusterBlocks

        if ClusterBlocks.worth_it(n_q, bs):
            # reorder the bank into cluster-aligned blocks (undone at the end) and skip the
            # block pairs the bound of patchlab._blocks proves useless
            blocks = ClusterBlocks(q, bs)
            order = blocks.order
            q, q_norm = q[order], q_norm[order]
            b, b_norm = q, q_norm
            ids, groups = (_reorder(ids, order, n_q), _reorder(groups, order, n_q))
            blocks.measure(q)
            row_blocks = col_blocks = blocks.ranges
            pairs = blocks.pairs()  # diagonal blocks first, as below
            # float32 rounding of a GEMM-form squared distance: well under 1e-5 (||f||^2 + ||m||^2)
            margin = (1e-5 * (q_norm + q_norm.max())).numpy()
    if blocks is None:
        row_blocks = [(s, min(s + bs, n_q)) for s in range(0, n_q, bs)]
        col_blocks = row_blocks if symmetric else [(s, min(s + bs, n_b)) for s in range(0, n_b, bs)]
        pairs = [
            (ri, ci)
            for ri in range(len(row_blocks))
            for ci in range(len(col_blocks))
            if not symmetric or ci >= ri
        ]
        if symmetric and heaps is not None:
            # diagonal blocks first: every heap is first filled from a block of its own rows,
            # where it stays in cache, and the transposed pass meets tight thresholds
            pairs.sort(key=lambda p: p[0] != p[1])
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        for ri, ci in tqdm(pairs, desc="neighbours", unit="block", disable=not progress):
            if blocks is not None and ri != ci and blocks.skippable(ri, ci, heaps.kth, margin):
                continue
            (r0, r1), (c0, c1) = row_blocks[ri], col_blocks[ci]
            # squared distances of one block: ||m||^2 - 2<f, m> in the GEMM, + ||f||^2 after
            if low:
                d2 = (q_low[r0:r1] @ b_low[c0:c1].T).float().mul_(-2.0)
                d2.add_(b_norm[None, c0:c1])
            elif heaps is not None:  # one buffer for every block: no allocation, no page faults
                out = buf[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
                d2 = torch.addmm(b_norm[None, c0:c1], q[r0:r1], b[c0:c1].T, alpha=-2.0, out=out)
            else:
                d2 = torch.addmm(b_norm[None, c0:c1], q[r0:r1], b[c0:c1].T, alpha=-2.0)
            _mask_excluded(d2, r0, r1, c0, c1, ids, groups)  # +inf stays +inf below
            if heaps is not None:  # ||f||^2 is added inside the compiled scan
                heaps.merge(d2, r0, c0, q_norm[r0:r1], both=symmetric and c0 != r0)
                continue
            d2.add_(q_norm[r0:r1, None])
            _merge(best_d, best_i, d2, r0, c0)
            if symmetric and c0 != r0:
                _merge(best_d, best_i, d2, c0, r0, transposed=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    if heaps is not None:
        best_d, best_i = heaps.result()
    _refine_near_duplicates(best_d, best_i, q, b, q_norm, b_norm)
    if blocks is not None:  # back to the caller's row order and indices
        out_d, out_i = torch.empty_like(best_d), torch.empty_like(best_i)
        out_d[order] = best_d
        out_i[order] = torch.where(best_i >= 0, order[best_i.clamp_min(0)], -1)
        best_d, best_i = out_d, out_i
    return best_d, best_i


def _reorder(pair, order, n):
    """(query key, bank key) of an exclusion, for the reordered bank of a self-kNN.

    Default ids (every row its own identity) stay positions, so only diagonal blocks meet."""
    key = pair[0]
    if key is None:
        return pair
    if torch.equal(key, torch.arange(n, device=key.device)):
        return key, key
    key = key[order]
    return key, key


def _rerank(queries, bank, idx, k):
    """Exact float32 squared distances to every candidate, then the k smallest of each row."""
    chunk = max(1, 2**25 // (idx.shape[1] * bank.shape[1]))  # (chunk, wide, d) <= 128 MB
    out_d = torch.empty(idx.shape[0], k, device=idx.device)
    out_i = torch.empty(idx.shape[0], k, dtype=torch.int64, device=idx.device)
    for s in range(0, idx.shape[0], chunk):
        cand = idx[s : s + chunk]
        q = queries[s : s + chunk].float()
        diff = bank[cand.clamp_min(0)].float() - q[:, None, :]  # (chunk, wide, d)
        d2 = diff.pow_(2).sum(2).masked_fill_(cand < 0, math.inf)
        top, pos = d2.topk(k, dim=1, largest=False)
        out_d[s : s + chunk], out_i[s : s + chunk] = top, cand.gather(1, pos)
    return out_d, out_i


def _refine_near_duplicates(best_d, best_i, q, b, q_norm, b_norm, rel: float = 1e-3) -> None:
    """Recompute, as ||f - m||^2 directly, the distances that the GEMM form cannot resolve.

    ||f||^2 + ||m||^2 - 2<f, m> loses about eps * (||f||^2 + ||m||^2) to rounding: for near
    duplicates (overlapping patches) that is the whole distance. Those few entries are
    recomputed from the difference, and their rows re-sorted.
    """
    found = best_i >= 0
    scale = q_norm[:, None] + b_norm[best_i.clamp_min(0)]
    rows, cols = ((best_d < rel * scale) & found).nonzero(as_tuple=True)
    if rows.numel() == 0:
        return
    for s in range(0, rows.numel(), 65536):  # bounded memory: 65536 x d at a time
        r, c = rows[s : s + 65536], cols[s : s + 65536]
        best_d[r, c] = (q[r] - b[best_i[r, c]]).pow(2).sum(1)
    touched = torch.unique(rows)
    order = best_d[touched].argsort(dim=1, stable=True)
    best_d[touched] = best_d[touched].gather(1, order)
    best_i[touched] = best_i[touched].gather(1, order)


def nearest_per_group(
    queries: torch.Tensor, bank: torch.Tensor, group_size: int, progress: bool = True
) -> torch.Tensor:
    """Distance from every query to its nearest bank row within each group of the bank.

    The bank's rows form consecutive groups of ``group_size`` (e.g. the 784 patches of each
    image); the same blocked GEMM form as :func:`knn` is used, never an N x N matrix.

    Parameters
    ----------
    queries : torch.Tensor, shape (n_queries, d)
    bank : torch.Tensor, shape (n_groups * group_size, d)
    group_size : int

    Returns
    -------
    torch.Tensor, shape (n_queries, n_groups), float32
        ``out[i, g] = min_{m in group g} ||queries[i] - m||_2``.
    """
    if bank.shape[0] % group_size:
        raise ValueError(f"bank rows ({bank.shape[0]}) are not a multiple of group_size")
    q, b = centred(queries, bank)
    q_norm, b_norm = (q * q).sum(1), (b * b).sum(1)
    n_groups = bank.shape[0] // group_size
    out = torch.empty(q.shape[0], n_groups, device=q.device)
    budget = 2**22 if q.device.type == "cpu" else 2**28  # distances per block (16 MB / 1 GB)
    rows = max(256, math.isqrt(budget))  # query rows per block
    per = max(1, budget // (rows * group_size))  # groups per column block
    blocks = [(r, g) for r in range(0, q.shape[0], rows) for g in range(0, n_groups, per)]
    for r, g in tqdm(blocks, desc="per-image nearest", unit="block", disable=not progress):
        c0, c1 = g * group_size, min(n_groups, g + per) * group_size
        d2 = torch.addmm(b_norm[None, c0:c1], q[r : r + rows], b[c0:c1].T, alpha=-2.0)
        d2.add_(q_norm[r : r + rows, None])
        out[r : r + rows, g : g + per] = d2.view(d2.shape[0], -1, group_size).amin(2)
    return out.clamp_min_(0).sqrt_()


def _mask_excluded(d2, r0, r1, c0, c1, ids, groups) -> None:
    """Set excluded entries of one block to +inf, in place (only where ranges can meet)."""
    for q_key, b_key in (ids, groups):
        if q_key is None:
            continue
        qk, bk = q_key[r0:r1], b_key[c0:c1]
        if qk.min() <= bk.max() and bk.min() <= qk.max():
            d2.masked_fill_(qk[:, None] == bk[None, :], math.inf)


def _merge(best_d, best_i, d2, r0, c0, transposed=False) -> None:
    """Merge one block of squared distances into the running top-k of its rows, in place.

    The block's rows are ``r0 + i`` and its columns ``c0 + j``; with ``transposed`` the roles
    swap (rows of the table are the block's columns), which lets the symmetric pass reuse a
    block for both row ranges without copying it. Only entries strictly below a row's current
    k-th best can enter its top-k, so only those are gathered: after the first blocks they are
    a small fraction of the block. Rows with more than k candidates take a plain top-k of their
    block row instead, so no candidate table is ever wider than k.
    """
    k = best_d.shape[1]
    block = d2.T if transposed else d2  # a view: (table rows, candidates)
    kth = best_d[r0 : r0 + block.shape[0], k - 1]
    if transposed:
        # transpose the (1-byte) mask rather than the block: nonzero() comes out row-grouped
        row, col = (d2 < kth[None, :]).T.contiguous().nonzero(as_tuple=True)
    else:
        row, col = (d2 < kth[:, None]).nonzero(as_tuple=True)
    if row.numel() == 0:
        return
    touched, counts = torch.unique_consecutive(row, return_counts=True)
    heavy = counts > k
    parts = []  # (table rows, candidate distances, candidate columns)
    if heavy.any():  # many candidates: a top-k of the block row
        rows_h = touched[heavy]
        vals, pos = block[rows_h].topk(min(k, block.shape[1]), dim=1, largest=False)
        parts.append((rows_h, vals, pos + c0))
    if not heavy.all():  # few candidates: pad each row's into a (rows, <= k) table
        light = torch.repeat_interleave(~heavy, counts)
        row, col, counts = row[light], col[light], counts[~heavy]
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(row.numel(), device=d2.device) - torch.repeat_interleave(starts, counts)
        line = torch.repeat_interleave(torch.arange(counts.numel(), device=d2.device), counts)
        width = int(counts.max())
        cand_d = torch.full((counts.numel(), width), math.inf, device=d2.device)
        cand_i = torch.full((counts.numel(), width), -1, dtype=torch.int64, device=d2.device)
        cand_d[line, slot] = block[row, col]
        cand_i[line, slot] = col + c0
        parts.append((touched[~heavy], cand_d, cand_i))
    for rows, cand_d, cand_i in parts:
        target = rows + r0
        all_d = torch.cat([best_d[target], cand_d], 1)
        all_i = torch.cat([best_i[target], cand_i], 1)
        top_d, pos = all_d.topk(k, dim=1, largest=False)
        best_d[target] = top_d
        best_i[target] = all_i.gather(1, pos)
