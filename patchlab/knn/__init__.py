"""Exact k-nearest neighbours of patch features: the one kNN of patchlab.

Every scoring method reads the same neighbour table, computed once for ``k_max``:

    dist(f, m) = ||f - m||_2                                (Euclidean, never squared)
    N_k(f)     = the k bank features m != f with the smallest dist(f, m)

The bank is never held as an N x N matrix. Two backends compute the same table:

- ``torch`` (:mod:`patchlab.knn._gemm`): blocks of squared distances from GEMMs,
  ||f - m||^2 = ||f||^2 + ||m||^2 - 2<f, m>, merged into a running top-k per row; for a
  self-kNN (queries = bank) each block pair is computed once and merged both ways; on the CPU
  the merge is compiled (:mod:`patchlab.knn._heaps`) and useless block pairs of a large self-kNN
  are skipped (:mod:`patchlab.knn._blocks`).
- ``keops`` (:mod:`patchlab.knn._keops`): a PyKeOps LazyTensor k-min reduction.

:class:`Engine` holds those choices; ``"auto"`` resolves them from the device and the bank
(:meth:`Engine.resolve`, the measured rules below). Every choice returns the same neighbours, up
to float ties.

What counts as "the feature itself" (``exclude``):

- ``"none"``:    nothing is excluded (queries that are not in the bank, e.g. one-class testing).
- ``"self"``:    the bank entry with the query's own id (exact; ids default to positions).
- ``"nearest"``: always drop the first neighbour (the paper's "k = 2" for PatchCore and SPADE).
- ``"image"``:   every bank entry of the query's own image (needs ``query_groups``).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, replace

import torch

from patchlab.knn._checks import EXCLUDE_MODES, _excluded_count, check_arguments
from patchlab.knn._common import Search
from patchlab.knn._exact import rerank, uncertain_rows
from patchlab.knn._gemm import nearest_per_group
from patchlab.knn._precision import bf16_pays, bf16_pool

__all__ = ["BACKENDS", "EXCLUDE_MODES", "KNN_VERSION", "Engine", "Neighbours", "knn"]
__all__ += ["check_arguments"]
__all__ += ["nearest_per_group"]

KNN_VERSION = 3  # bump whenever the tables computed for the same inputs change (cache keys)
# the backends: each a module whose ``search`` follows :class:`patchlab.knn._common.Search`,
# imported on first use (pykeops is optional). A new backend is one entry here.
SEARCHES = {"torch": "patchlab.knn._gemm", "keops": "patchlab.knn._keops"}
BACKENDS = ("auto", *SEARCHES)
PRECISIONS = ("auto", "fp32", "tf32", "bf16", "fp64")
CERTIFIED = ("fp32", "bf16")  # fast passes whose rounding is bounded row by row (_precision)
BF16_MAX_POOL = 2  # auto keeps a bf16 pass whose sampled pool is at most this many times k
MERGES = ("auto", "heaps", "torch")
CLUSTER_ROWS = 384  # rows per cluster block when skipping (smaller bound tighter, more pairs)
SKIP_MIN_D = 512  # auto skips block pairs from this width on (measured: Engine.resolve)


@dataclass(frozen=True)
class Neighbours:
    """A neighbour table.

    Attributes
    ----------
    distances : torch.Tensor, shape (n_queries, k), float32 or float64
        Euclidean distances to the k nearest bank features, ascending along each row: float64
        when the queries or the bank are float64, float32 otherwise.
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


@dataclass(frozen=True)
class Engine:
    """How :func:`knn` computes the table; ``"auto"``/``None`` fields are resolved per call.

    Attributes
    ----------
    backend : {"auto", "torch", "keops"}
        The search: blocked GEMM, or a KeOps LazyTensor reduction.
    precision : {"auto", "fp32", "tf32", "bf16", "fp64"}
        GEMM precision of the fast pass of ``torch``. ``fp32`` and ``bf16`` are certified row
        by row from a bound on their rounding (:mod:`patchlab.knn._precision`; an uncertain
        row is searched again in ``fp64``), so the table equals a float64 brute force up to
        exact ties. ``tf32`` is not certified: its candidates are ranked exactly, and the set
        is exact when the true k nearest are among them (docs/performance.md: on real 1024-d
        features with pool 32 it matched float64 as often as ``fp32``).
    pool : int, optional
        Extra candidates the fast pass keeps per query; the k nearest are then taken by their
        exact float64 distances (:mod:`patchlab.knn._exact`). Default 8 for float32 GEMMs at
        d <= 256, else 32: measured on real features (152-d K = 25, 1024-d K = 100), the
        float32 rounding is then certified for every row (with 8 at 1024-d, 17 % of the rows
        needed the float64 search). For ``bf16`` it is sized per call from the rounding
        bound on a sample of rows (:func:`patchlab.knn._precision.bf16_pool`).
    block_size : int, optional
        Rows (and columns) per block; memory grows as about ``3 * block_size**2 * 4`` bytes.
    merge : {"auto", "heaps", "torch"}
        ``torch`` backend on the CPU: compiled per-row heaps, or the torch merge CUDA uses.
    skip : bool, optional
        CPU self-kNN: reorder the bank into cluster blocks and skip the block pairs a
        triangle-inequality bound proves useless. None: when the bank is large enough.
    cluster_rows : int
        Mean rows per cluster block when skipping.
    copy_mb : int
        ``torch`` backend: a bank of at most this many MB (float32) is centred in one copy,
        which the blocks are read from; a larger one is centred block by block (about 15 %
        slower, measured at 50 000 x 1024), so that the search's memory stays bounded.
    """

    backend: str = "auto"
    precision: str = "auto"
    pool: int | None = None
    block_size: int | None = None
    merge: str = "auto"
    skip: bool | None = None
    cluster_rows: int = CLUSTER_ROWS
    copy_mb: int = 256

    def __post_init__(self) -> None:
        for name, allowed in (
            ("backend", BACKENDS),
            ("precision", PRECISIONS),
            ("merge", MERGES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is unknown; choose one of {allowed}"
                )
        if (self.pool is not None and self.pool < 0) or (
            self.block_size is not None and self.block_size < 1
        ):
            raise ValueError("pool must be >= 0 and block_size >= 1")

    def resolve(self, device: torch.device, n_bank: int, symmetric: bool, d: int) -> Engine:
        """Every ``auto`` replaced by a concrete choice. The measurements behind each rule
        are in docs/performance.md ("How auto chooses"), from ``benchmarks/knn.py``.

        - backend: ``torch`` (the blocked GEMM beat KeOps on the CPU at every size measured).
        - precision: ``bf16`` on a CPU with bf16 instructions whose bf16 GEMM measures at
          least 1.5x the float32 one, for banks of 20 000 rows or more
          (:func:`patchlab.knn._precision.bf16_pays`, a calibration once per process), and
          whose sampled pool is at most :data:`BF16_MAX_POOL` x k; ``fp32`` otherwise. Both
          are certified row by row (rows they cannot certify are searched again in float64,
          :mod:`patchlab.knn._exact`); ``tf32`` cannot be certified: offered, never chosen.
        - merge: compiled ``heaps`` on the CPU, the ``torch`` merge on CUDA.
        - skip: a CPU self-kNN of at least 8192 rows whose bound table fits in 256 MB, at
          d >= :data:`SKIP_MIN_D`, with the ``heaps`` merge and float32 GEMMs.
        - block_size: 2048 on the CPU; up to 16384 on CUDA, by free memory.
        """
        backend = "torch" if self.backend == "auto" else self.backend
        precision = self.precision
        if precision == "auto":
            precision = "bf16" if backend == "torch" and bf16_pays(device, n_bank, d) else "fp32"
        pool = self.pool
        if pool is None and not (precision == "bf16" and backend == "torch"):
            # enough that the float32 rounding is certified for nearly every row (bf16: None,
            # sized by knn from a sample)
            pool = 8 if precision == "fp32" and d <= 256 else 32
        merge = self.merge
        if merge == "auto":
            merge = "heaps" if device.type == "cpu" else "torch"
        if merge == "heaps" and device.type != "cpu":
            raise ValueError("merge='heaps' runs on the CPU only; use merge='torch' on CUDA")
        block_size = self.block_size
        if block_size is None and backend == "torch":
            block_size = _default_block_size(device)
        skip = self.skip
        if skip is None and backend == "torch":
            from patchlab.knn._blocks import ClusterBlocks

            worth = ClusterBlocks.worth_it(n_bank, block_size, self.cluster_rows)
            skip = worth and d >= SKIP_MIN_D
        skip = bool(skip) and symmetric and merge == "heaps" and precision == "fp32"
        return replace(
            self,
            backend=backend,
            precision=precision,
            pool=pool,
            merge=merge,
            block_size=block_size,
            skip=skip,
        )


def _default_block_size(device: torch.device) -> int:
    """2048 on the CPU; on CUDA three float32 blocks within a quarter of free memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(min(16384, max(1024, math.isqrt(free // 4 // 12))))
    return 2048


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
    engine: Engine | None = None,
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
    engine : Engine, optional
        How the search runs (backend, precision, blocks); ``Engine()`` (every choice
        ``auto``) by default. The neighbours do not depend on it, up to float ties.
    progress : bool
        Show a progress bar.

    Returns
    -------
    Neighbours
        ``distances`` (n_queries, k) ascending, float64 when the queries or the bank are
        float64 (float32 otherwise), and ``indices`` (n_queries, k) int64.

    Examples
    --------
    Four points on a line; each one's two nearest others (a self-kNN excludes the point):

    >>> import torch
    >>> from patchlab.knn import knn
    >>> x = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    >>> table = knn(x, 2, progress=False)
    >>> table.indices.tolist()
    [[1, 2], [0, 2], [1, 0], [2, 1]]
    >>> table.distances.tolist()
    [[1.0, 3.0], [1.0, 2.0], [2.0, 3.0], [4.0, 6.0]]
    >>> table.indices[:, :1].tolist()  # any smaller K is a slice of the same table
    [[1], [0], [1], [2]]
    """
    symmetric = bank is None
    queries, bank_, ids, groups = check_arguments(
        queries, k, bank, exclude, query_ids, bank_ids, query_groups, bank_groups
    )
    asked = engine or Engine()
    engine = asked.resolve(queries.device, bank_.shape[0], symmetric, bank_.shape[1])
    k_search = k + 1 if exclude == "nearest" else k
    n_b = bank_.shape[0]
    excluded = _excluded_count(*ids, *groups)
    search: Search = importlib.import_module(SEARCHES[engine.backend]).search
    # everything runs on features scaled by a power of two (exact) into a safe range, so that
    # no squared distance overflows or underflows; the distances are scaled back at the end
    scale = _safe_scale(queries, bank_)
    q = queries if scale == 1 else queries * scale
    b = q if symmetric else (bank_ if scale == 1 else bank_ * scale)
    if engine.pool is None:  # a bf16 pass: the pool its rounding bound asks for on a sample
        engine = replace(engine, pool=bf16_pool(q, b, k_search))
        if asked.precision == "auto" and engine.pool > BF16_MAX_POOL * k_search:
            # chosen by auto, but the candidates would cost more than the GEMM saves
            fp32 = replace(asked, precision="fp32")
            engine = fp32.resolve(queries.device, bank_.shape[0], symmetric, bank_.shape[1])
    # the fast pass keeps `pool` extra candidates; their exact float64 distances pick the k
    wide = min(k_search + engine.pool, n_b - excluded)
    fast, candidates = search(q, b, wide, symmetric, ids, groups, engine, progress)
    d2, idx = rerank(q, b, candidates, k_search)
    if engine.backend == "torch" and engine.precision in CERTIFIED:
        # rows whose fast pass's rounding bound cannot certify them: searched again in float64
        kth = d2[:, k_search - 1]
        redo = uncertain_rows(fast, candidates, kth, q, b, engine.precision).nonzero().flatten()
        if len(redo):
            again = _search_again(q, b, redo, wide, ids, groups, engine)
            d2[redo], idx[redo] = rerank(q[redo], b, again, k_search)
    if exclude == "nearest":
        d2, idx = d2[:, 1:], idx[:, 1:]
    dist = d2.sqrt_().div_(scale)  # float64; exact unscaling (a power of two)
    f64 = torch.float64 in (queries.dtype, bank_.dtype)  # float64 in, float64 out
    return Neighbours(dist if f64 else dist.float(), idx, exclude)


def _search_again(queries, bank, rows, wide, ids, groups, engine) -> torch.Tensor:
    """The candidates of some query rows by a float64 GEMM search of the whole bank."""
    from patchlab.knn._gemm import search

    def subset(pair):
        return pair if pair[0] is None else (pair[0][rows], pair[1])

    fp64 = replace(engine, precision="fp64", skip=False)
    _, found = search(queries[rows], bank, wide, False, subset(ids), subset(groups), fp64, False)
    return found


def _safe_scale(queries, bank) -> float:
    """A power of two that brings the features' largest magnitude near 1 when it is outside
    [2^-40, 2^40]: float32 squared distances of features of 1e19 would overflow to inf (and of
    1e-30 underflow to 0), float64 ones of 1e160. Scaling by a power of two is exact; 1
    otherwise (the features patchlab extracts are near 1)."""
    top = max(float(queries.abs().max()), float(bank.abs().max()))
    if top == 0 or 2.0**-40 <= top <= 2.0**40:
        return 1.0
    return 2.0 ** -math.frexp(top)[1]
