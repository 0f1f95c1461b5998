"""The CPU merge of the blocked kNN: per-row bounded max-heaps filled by compiled scans (numba).

Each table row r keeps its running top-k as a binary max-heap of k int64 keys,

    key(v, j) = s(v) * 2^32 + j,    s(v) = b if b >= 0 else b XOR 0x7FFFFFFF,

with b the bits of the float32 squared distance v read as an int32 and j the bank index. s is
monotonic (for the negative values that rounding can give as well), so keys order as (v, j)
lexicographically: among equal distances the smaller index is nearer, and the top-k of a row
does not depend on the order in which blocks arrive. One int64 per entry keeps a heap level to
a single load and compare. An empty slot holds key(+inf, 2^32 - 1), the largest key, so a
row full of them is a valid heap.

Merging a block of squared distances is one pass over it. An entry v of row r can enter the
row's top-k only when

    v <= kth[r],    kth[r] = the distance of the heap's root (the current k-th best),

which is tested for 64 entries at once (an OR of vectorised compares); a chunk that holds such
an entry is tested again in 16s, and only those are looked at one by one: an entry whose key is
below the root's replaces the root and sifts down (log2 k levels). After the first blocks few
chunks pass, so the pass costs little more than reading the block. Excluded pairs (+inf) never
enter.

For the symmetric self-kNN, a block of rows r0 + i and columns c0 + j (r0 != c0) also updates
the rows c0 + j with the candidates r0 + i (its transpose), in the same read of each entry: the
block is cut into T x T tiles for T threads, and in phase p thread t merges tile
(t, (t + p) mod T), so the threads of one phase own disjoint row heaps and disjoint column heaps.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import config, get_num_threads, njit, prange, set_num_threads

CHUNK = 64  # entries tested at once (vectorised compares: _hits64), then ...
SUB = 16  # ... the chunks that pass, in sub-chunks of 16 (_hits16), then one by one

# column parts per thread in the transposed merge: more keep a tile's column heaps in L2, but
# 1, 4 and 8 measured alike (within the noise of a shared machine)
STRIPS = 1
LOW = np.int64(0xFFFFFFFF)  # the index half of a key
EMPTY_INDEX = 0xFFFFFFFF  # the index of an empty slot (becomes -1 in the table)
# "ninf" is left out: +inf marks excluded pairs and empty heaps
FAST = {"nnan", "nsz", "arcp", "contract", "reassoc", "afn"}


@njit(nogil=True, inline="always")
def _key(v, j):  # pragma: no cover - compiled
    """key(v, j): the int64 that orders as (v, j)."""
    b = np.int64(np.float32(v).view(np.int32))
    if b < 0:
        b ^= 0x7FFFFFFF
    return (b << 32) | j


@njit(nogil=True, inline="always")
def _distance(key):  # pragma: no cover - compiled
    """The float32 distance of a key (the inverse of s)."""
    b = key >> 32
    if b < 0:
        b ^= 0x7FFFFFFF
    return np.int32(b).view(np.float32)


@njit(nogil=True, inline="always")
def _offer(keys, kth, r, v, j):  # pragma: no cover - compiled
    """Offer (v, j) to row r's heap (needs v <= kth[r]); return row r's k-th best after it."""
    if v == np.inf:  # an excluded pair
        return kth[r]
    key = _key(v, j)
    if key >= keys[r, 0]:  # an equal distance with a larger index
        return kth[r]
    k = keys.shape[1]
    pos = 0
    while True:  # sift the new key down from the root
        c = 2 * pos + 1
        if c >= k:
            break
        kc = keys[r, c]
        if c + 1 < k and keys[r, c + 1] > kc:
            c += 1
            kc = keys[r, c]
        if kc <= key:
            break
        keys[r, pos] = kc
        pos = c
    keys[r, pos] = key
    kth[r] = _distance(keys[r, 0])
    return kth[r]


def _hits(n: int):
    """A compiled test of n entries: whether an entry v = row[t] + a of t0:t0 + n is <= thr,
    or <= thr_c[t] when thr_c is not empty (the slice must be whole).

    An OR of compares over a length fixed when compiled (n is a constant of the closure), which
    LLVM vectorises: measured 0.19 ns an entry, against 1.1 for a float minimum, a variable
    length or shifted indices, which it leaves scalar or unrolls poorly. The sums are the
    same float32 ones as the offers'."""

    @njit(nogil=True, inline="always", fastmath=FAST)
    def hits(row, a, thr, thr_c, t0):  # pragma: no cover - compiled
        r = row[t0 : t0 + n]
        hit = np.int32(0)
        if thr_c.shape[0] == 0:
            for t in range(n):
                hit |= np.int32(r[t] + a <= thr)
        else:
            c = thr_c[t0 : t0 + n]
            for t in range(n):
                v = r[t] + a
                hit |= np.int32(v <= thr) | np.int32(v <= c[t])
        return hit

    return hits


_hits64, _hits16 = _hits(CHUNK), _hits(SUB)


@njit(parallel=True, nogil=True, cache=True, fastmath=FAST)
def _merge_rows(keys, kth, d2, add, r0, c0):  # pragma: no cover - compiled
    """Rows r0 + i take the candidates (d2[i, j] + add[i], c0 + j); parallel over rows."""
    m, w = d2.shape
    none = np.empty(0, np.float32)
    for i in prange(m):
        r = r0 + i
        a = add[i]
        row = d2[i]
        thr = kth[r]
        for j0 in range(0, w, CHUNK):
            if j0 + CHUNK <= w and _hits64(row, a, thr, none, j0) == 0:
                continue
            for s in range(j0, min(j0 + CHUNK, w), SUB):  # the same test, then one by one
                if s + SUB <= w and _hits16(row, a, thr, none, s) == 0:
                    continue
                for j in range(s, min(s + SUB, w)):
                    v = row[j] + a
                    if v <= thr:
                        thr = _offer(keys, kth, r, v, c0 + j)


@njit(nogil=True, inline="always", fastmath=FAST)
def _merge_tile(keys, kth, d2, add, r0, c0, ia, ib, ja, jb):  # pragma: no cover - compiled
    """Rows ia:ib x columns ja:jb of a block, merged both ways.

    First every chunk is tested against the thresholds at the start of the tile (a pure,
    vectorised pass: thresholds only fall, so a stale one admits more, never fewer); then
    the chunks that hold a candidate are tested again in sub-chunks, with the current
    thresholds, and merged one entry at a time."""
    width = jb - ja
    thr_c = kth[c0 + ja : c0 + jb].copy()  # the column rows' k-th best, kept in L1
    chunks = -(-width // CHUNK)
    hits = np.empty((ib - ia, chunks), np.int32)
    for i in range(ia, ib):
        row, a, thr = d2[i, ja:jb], add[i], kth[r0 + i]
        for c in range(chunks):
            t0 = c * CHUNK
            hits[i - ia, c] = t0 + CHUNK > width or _hits64(row, a, thr, thr_c, t0)
    for i in range(ia, ib):
        r = r0 + i
        a = add[i]
        row = d2[i, ja:jb]
        thr = kth[r]
        for c in range(chunks):
            if hits[i - ia, c] == 0:
                continue
            for s in range(c * CHUNK, min(c * CHUNK + CHUNK, width), SUB):
                if s + SUB <= width and _hits16(row, a, thr, thr_c, s) == 0:
                    continue
                for t in range(s, min(s + SUB, width)):
                    v = row[t] + a
                    if v <= thr:
                        thr = _offer(keys, kth, r, v, c0 + ja + t)
                    if v <= thr_c[t]:
                        thr_c[t] = _offer(keys, kth, c0 + ja + t, v, r)


@njit(parallel=True, nogil=True, cache=True, fastmath=FAST)
def _merge_both(keys, kth, d2, add, r0, c0, parts, strips):  # pragma: no cover - compiled
    """Rows r0 + i and rows c0 + j take their candidates from the block (r0 != c0).

    The rows are cut into ``parts`` parts (one per thread) and the columns into
    ``cuts = parts * strips`` parts. In phase p, task t merges row part t with column part
    (t * strips + p) mod cuts: the tasks of one phase touch disjoint row heaps and disjoint
    column heaps, and after ``cuts`` phases every tile has been merged once. Narrow column
    parts keep their heaps in the core's cache.
    """
    m, w = d2.shape
    cuts = parts * strips
    for p in range(cuts):
        for t in prange(parts):
            u = (t * strips + p) % cuts
            ia, ib = t * m // parts, (t + 1) * m // parts
            ja, jb = u * w // cuts, (u + 1) * w // cuts
            _merge_tile(keys, kth, d2, add, r0, c0, ia, ib, ja, jb)


@njit(parallel=True, nogil=True, cache=True)
def _unpack(keys, out_d, out_i):  # pragma: no cover - compiled
    """Sort every row's keys and split them into distances and indices (-1 for empty)."""
    n, k = keys.shape
    for r in prange(n):
        row = np.sort(keys[r])
        for t in range(k):
            out_d[r, t] = _distance(row[t])
            j = row[t] & LOW
            out_i[r, t] = -1 if j == EMPTY_INDEX else j


def matched_threads() -> int:
    """numba's thread count, matched to torch's (and at most numba's pool)."""
    n = max(1, min(torch.get_num_threads(), config.NUMBA_NUM_THREADS))
    if get_num_threads() != n:
        set_num_threads(n)
    return n


class Heaps:
    """The running top-k of every row of a table, filled block by block.

    Parameters
    ----------
    n : int
        Table rows (queries).
    k : int
        Neighbours kept per row.
    """

    def __init__(self, n: int, k: int, buffer: int = 0) -> None:
        empty = np.int64(0x7F800000) << np.int64(32) | np.int64(EMPTY_INDEX)  # key(+inf, -)
        self.keys = np.full((n, k), empty, np.int64)  # (n, k) max-heaps of keys
        self.kth = np.full(n, np.inf, np.float32)  # (n,) each row's current k-th best
        self._buffer = torch.empty(buffer)  # one block buffer: no allocation, no page faults

    def buffer(self, rows: int, cols: int) -> torch.Tensor:
        """A (rows, cols) float32 view of the block buffer (the GEMM's ``out``)."""
        if rows * cols > self._buffer.numel():
            self._buffer = torch.empty(rows * cols)
        return self._buffer[: rows * cols].view(rows, cols)

    def merge(
        self,
        d2: torch.Tensor,
        r0: int,
        c0: int,
        add: torch.Tensor | None = None,
        both: bool = False,
    ) -> None:
        """Merge one block of squared distances, in place.

        Parameters
        ----------
        d2 : torch.Tensor, shape (m, w), float32, CPU, contiguous
            The block: ``d2[i, j] + add[i]`` is the squared distance between row ``r0 + i`` and
            bank row ``c0 + j``; ``+inf`` marks an excluded pair.
        r0, c0 : int
            First row and first column of the block (``c0 + w <= 2**32 - 1``).
        add : torch.Tensor, shape (m,), float32, optional
            Added to every entry of row i before it is compared (``||f_i||^2``); zero if
            omitted. The sum is rounded exactly as ``d2 + add[:, None]`` would be.
        both : bool
            Also merge the transpose: rows ``c0 + j`` take the candidates ``r0 + i``
            (symmetric self-kNN; the row ranges must not overlap).
        """
        m, w = d2.shape
        if c0 + w >= EMPTY_INDEX or (both and r0 + m >= EMPTY_INDEX):
            raise ValueError("the CPU merge indexes at most 2**32 - 2 bank rows")
        if both and r0 < c0 + w and c0 < r0 + m:
            raise ValueError("both=True needs disjoint row and column ranges")
        threads = matched_threads()
        block = d2.detach().contiguous().numpy()
        a = np.zeros(m, np.float32) if add is None else add.detach().contiguous().numpy()
        if both:
            _merge_both(self.keys, self.kth, block, a, r0, c0, threads, STRIPS)
        else:
            _merge_rows(self.keys, self.kth, block, a, r0, c0)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables: distances (n, k) float32 ascending (ties by index) and indices (n, k)
        int64, -1 where a row holds fewer than k candidates (distance +inf)."""
        matched_threads()
        n, k = self.keys.shape
        out_d, out_i = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
        _unpack(self.keys, out_d, out_i)
        return torch.from_numpy(out_d), torch.from_numpy(out_i)
