"""The ``torch`` backend: exact kNN by blocked GEMMs and a running top-k per row.

A block of squared distances comes from one GEMM,

    ||f - m||^2 = ||f||^2 + ||m||^2 - 2 <f, m>,

and only the entries below each row's current k-th best can enter its top-k. The merge is a
compiled per-row heap on the CPU (:mod:`patchlab.knn._heaps`) and a torch threshold merge on
CUDA (:class:`TorchMerge`). For a self-kNN each block pair (i <= j) is computed once and
merged into the rows of both blocks; on the CPU the bank can first be reordered into
cluster-aligned blocks whose useless pairs are skipped (:mod:`patchlab.knn._blocks`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from patchlab.knn._common import centred, mask_excluded
from patchlab.knn._precision import bf16_block


@dataclass
class _Layout:
    """Which block pairs to compute, in which order, over which (possibly reordered) rows."""

    rows: list[tuple[int, int]]  # row ranges of the blocks
    cols: list[tuple[int, int]]  # column ranges (the rows' own for a self-kNN)
    pairs: list[tuple[int, int]]  # (row block, column block), diagonal first for a self-kNN
    blocks: object = None  # ClusterBlocks when the bank was reordered, else None


def search(queries, bank, k, symmetric, ids, groups, engine, progress):
    """Squared distances (n_q, k) ascending and bank indices (n_q, k) of the k nearest, by the
    float32 (bf16, float64) GEMM form: the candidates that :func:`patchlab.knn._exact.rerank`
    then ranks exactly.

    ``engine`` is a resolved :class:`patchlab.knn.Engine`; ``ids``/``groups`` are (query key,
    bank key) pairs or (None, None). Entries that cannot be filled are (+inf, -1).
    """
    wide64 = engine.precision == "fp64"  # float64 GEMMs: the fallback of uncertain rows
    n_q, n_b, bs = queries.shape[0], bank.shape[0], engine.block_size
    layout = _layout(queries, n_b, bs, symmetric, engine)
    order = None if layout.blocks is None else layout.blocks.order  # cluster-aligned rows
    mean = bank.float().mean(0, keepdim=True)
    budget = engine.copy_mb * 2**20
    q = Centred(queries, mean, order, budget)
    b = q if symmetric else Centred(bank, mean, None, budget)
    if order is not None:
        ids, groups = (_reorder(ids, order, n_q), _reorder(groups, order, n_q))
    dtype = torch.float64 if wide64 else torch.float32
    q_norm = q.sq_norms(dtype)
    b_norm = q_norm if symmetric else b.sq_norms(dtype)
    low = {"bf16": torch.bfloat16, "fp64": torch.float64}.get(engine.precision)
    merge = _merger(engine.merge, n_q, k, bs, n_b, queries.device)
    if layout.blocks is not None:
        layout.blocks.measure(q)
        layout.pairs = layout.blocks.pairs()  # diagonal first, then by centroid distance
        # float32 rounding of a GEMM-form squared distance: well under 1e-5 (||f||^2 + ||m||^2)
        margin = (1e-5 * (q_norm + q_norm.max())).numpy()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = engine.precision == "tf32"
    try:
        for ri, ci in tqdm(layout.pairs, desc="neighbours", unit="block", disable=not progress):
            if ri != ci and layout.blocks is not None:
                if layout.blocks.skippable(ri, ci, merge.kth, margin):
                    continue
            (r0, r1), (c0, c1) = layout.rows[ri], layout.cols[ci]
            qa, bb = q.rows(r0, r1, low), b.rows(c0, c1, low)
            # ||m||^2 - 2<f, m> in the GEMM; ||f||^2 is added by the merge
            add = q_norm[r0:r1]
            if engine.precision == "bf16":  # bf16 products, the rest float32 (_precision)
                d2 = bf16_block(qa, bb, b_norm[c0:c1], out=merge.buffer(r1 - r0, c1 - c0))
            elif wide64:  # the whole form in float64 before it is rounded to float32
                d2 = torch.addmm(b_norm[None, c0:c1], qa, bb.T, alpha=-2.0)
                d2 = d2.add_(add[:, None]).float()
                add = torch.zeros(r1 - r0, device=d2.device)
            else:
                out = merge.buffer(r1 - r0, c1 - c0)
                d2 = torch.addmm(b_norm[None, c0:c1], qa, bb.T, alpha=-2.0, out=out)
            mask_excluded(d2, r0, r1, c0, c1, ids, groups)  # +inf stays +inf below
            merge.merge(d2, r0, c0, add.float(), both=symmetric and c0 != r0)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    best_d, best_i = merge.result()
    if order is not None:  # back to the caller's row order and indices
        out_d, out_i = torch.empty_like(best_d), torch.empty_like(best_i)
        out_d[order] = best_d
        out_i[order] = torch.where(best_i >= 0, order[best_i.clamp_min(0)], -1)
        best_d, best_i = out_d, out_i
    return best_d, best_i


class Centred:
    """The rows of a bank translated by the bank mean (float32), a block at a time.

    Distances are unchanged, the norms shrink, and so does the cancellation error of
    ||f||^2 + ||m||^2 - 2<f, m>. A bank of at most ``budget`` bytes is centred once (one
    copy, in ``order`` when given); a larger one is centred block by block as the search asks
    for it, so the search never holds a copy of a large bank.
    """

    def __init__(
        self,
        x: torch.Tensor,
        mean: torch.Tensor,
        order: torch.Tensor | None = None,
        budget: int = 2**29,
    ):
        self.x, self.mean, self.order = x, mean, order
        self.copy = None
        self._last: tuple = (None, None, None)
        if x.shape[0] * x.shape[1] * 4 <= budget:
            self.copy = self._centre(0, x.shape[0])

    @property
    def shape(self) -> torch.Size:
        return self.x.shape

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return self.rows(*rows.indices(self.x.shape[0])[:2])

    def _centre(self, s: int, e: int) -> torch.Tensor:
        if self.order is None:
            return (self.x[s:e].float() - self.mean).contiguous()
        return self.x[self.order[s:e]].float().sub_(self.mean)  # a fresh gather: in place

    def rows(self, s: int, e: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Centred rows s:e (in ``order``), float32 or ``dtype``."""
        if self._last[:2] != (s, e):
            block = self.copy[s:e] if self.copy is not None else self._centre(s, e)
            self._last = (s, e, block)
        block = self._last[2]
        return block if dtype is None else block.to(dtype)

    def sq_norms(self, dtype: torch.dtype = torch.float32, rows: int = 8192) -> torch.Tensor:
        """||row - mean||^2 of every row (in ``order``), (n,)."""
        n = self.x.shape[0]
        out = torch.empty(n, dtype=dtype, device=self.x.device)
        for s in range(0, n, rows):
            part = self.rows(s, min(s + rows, n), dtype)
            out[s : s + rows] = (part * part).sum(1)
        return out


def _merger(kind: str, n: int, k: int, block_size: int, n_bank: int, device: torch.device):
    """The running top-k of every row: compiled heaps (CPU) or the torch merge."""
    if kind == "heaps":
        from patchlab.knn._heaps import Heaps

        return Heaps(n, k, buffer=min(block_size, n) * min(block_size, n_bank))
    return TorchMerge(n, k, device)


def _layout(q: torch.Tensor, n_b: int, bs: int, symmetric: bool, engine) -> _Layout:
    """Block ranges and pairs; cluster-aligned (reordered) blocks when the engine skips."""
    n_q = q.shape[0]
    if symmetric and engine.skip:
        from patchlab.knn._blocks import ClusterBlocks

        blocks = ClusterBlocks(q.float(), bs, engine.cluster_rows)  # pairs follow once measured
        return _Layout(blocks.ranges, blocks.ranges, [], blocks)
    rows = [(s, min(s + bs, n_q)) for s in range(0, n_q, bs)]
    cols = rows if symmetric else [(s, min(s + bs, n_b)) for s in range(0, n_b, bs)]
    pairs = [(i, j) for i in range(len(rows)) for j in range(len(cols)) if not symmetric or j >= i]
    if symmetric:
        # diagonal blocks first: every row's top-k is first filled from a block of its own
        # rows, where it stays in cache, and the transposed pass meets tight thresholds
        pairs.sort(key=lambda p: p[0] != p[1])
    return _Layout(rows, cols, pairs)


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


class TorchMerge:
    """The running top-k of every row as sorted (n, k) tables, merged with torch ops (CUDA)."""

    kth = None  # no block skipping on this path

    def __init__(self, n: int, k: int, device: torch.device) -> None:
        self.best_d = torch.full((n, k), math.inf, device=device)
        self.best_i = torch.full((n, k), -1, dtype=torch.int64, device=device)

    def buffer(self, rows: int, cols: int) -> None:
        return None  # a fresh block each time (the GEMM allocates)

    def merge(self, d2, r0, c0, add, both=False) -> None:
        d2.add_(add[:, None])
        _merge(self.best_d, self.best_i, d2, r0, c0)
        if both:
            _merge(self.best_d, self.best_i, d2, c0, r0, transposed=True)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.best_d, self.best_i


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
        parts.append(_padded(block, row, col, touched, counts, heavy, c0))
    for rows, cand_d, cand_i in parts:
        target = rows + r0
        all_d = torch.cat([best_d[target], cand_d], 1)
        all_i = torch.cat([best_i[target], cand_i], 1)
        top_d, pos = all_d.topk(k, dim=1, largest=False)
        best_d[target] = top_d
        best_i[target] = all_i.gather(1, pos)


def _padded(block, row, col, touched, counts, heavy, c0):
    """The candidates of the rows with at most k of them, as (rows, width) padded tables."""
    light = torch.repeat_interleave(~heavy, counts)
    row, col, counts = row[light], col[light], counts[~heavy]
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(row.numel(), device=block.device) - torch.repeat_interleave(starts, counts)
    line = torch.repeat_interleave(torch.arange(counts.numel(), device=block.device), counts)
    width = int(counts.max())
    cand_d = torch.full((counts.numel(), width), math.inf, device=block.device)
    cand_i = torch.full((counts.numel(), width), -1, dtype=torch.int64, device=block.device)
    cand_d[line, slot] = block[row, col]
    cand_i[line, slot] = col + c0
    return touched[~heavy], cand_d, cand_i


def nearest_per_group(
    queries: torch.Tensor, bank: torch.Tensor, group_size: int, progress: bool = True
) -> torch.Tensor:
    """Distance from every query to its nearest bank row within each group of the bank.

    The bank's rows form consecutive groups of ``group_size`` (e.g. the 784 patches of each
    image); the same blocked GEMM form as :func:`patchlab.knn.knn` is used, never an N x N
    matrix.

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
    budget = 2**23 if q.device.type == "cpu" else 2**28  # distances per block (32 MB / 1 GB)
    rows = 1024 if q.device.type == "cpu" else math.isqrt(budget)  # query rows per block
    per = max(1, budget // (rows * group_size))  # groups per column block
    blocks = [(r, g) for r in range(0, q.shape[0], rows) for g in range(0, n_groups, per)]
    for r, g in tqdm(blocks, desc="per-image nearest", unit="block", disable=not progress):
        c0, c1 = g * group_size, min(n_groups, g + per) * group_size
        # ||m||^2 - 2 <f, m>, minimised per group; ||f||^2 is added to the minima (one pass
        # over the (rows, groups) minima instead of the whole block: the GEMM's own speed)
        d2 = torch.addmm(b_norm[None, c0:c1], q[r : r + rows], b[c0:c1].T, alpha=-2.0)
        out[r : r + rows, g : g + per] = d2.view(d2.shape[0], -1, group_size).amin(2)
    out.add_(q_norm[:, None])
    return out.clamp_min_(0).sqrt_()
