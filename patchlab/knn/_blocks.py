"""Cluster-aligned blocks for the CPU self-kNN, and the bound that lets it skip block pairs.

Patch features cluster. If the bank is reordered so that every block of rows is one cluster
(or a piece of one), a block pair (A, B) whose clusters lie far apart cannot hold a neighbour
of any of its rows, and its GEMM can be skipped. With mu_B the centroid of block B and
rho_B = max_{m in B} ||m - mu_B|| its radius, the triangle inequality bounds every distance
from a row f to B from below:

    ||f - m|| >= ||f - mu_B|| - rho_B   for every m in B.

So B cannot improve row f's top-k once (||f - mu_B|| - rho_B)^2 >= kth(f), the current k-th
best squared distance; the pair is skipped when that holds for every row of A against B *and*
every row of B against A (the symmetric pass would merge both). The search stays exact: the
bound is computed in float64 and a pair is skipped only with a margin above the float32
rounding of the GEMM-form distances.

The clusters come from a few seeded Lloyd (k-means) iterations on a sample; any partition is
correct, a good one just skips more. Diagonal blocks go first (they fill every heap from its
own cluster), then the other pairs by increasing centroid distance, so that thresholds are
tight before far pairs are tested.
"""

from __future__ import annotations

import math

import numpy as np
import torch

MIN_ROWS = 8192  # smaller banks: no reordering (a few blocks; nothing to skip)
MAX_BOUND_ENTRIES = 2**26  # the (rows x blocks) float32 bound table stays under 256 MB
LLOYD_ITERATIONS = 10
SAMPLE_PER_CLUSTER = 64
CLUSTER_ROWS = 384  # mean cluster size: smaller clusters bound tighter, but make more pairs


class ClusterBlocks:
    """A reordering of the bank into cluster-aligned blocks, with their distance bounds.

    Attributes
    ----------
    order : torch.Tensor, shape (n,), int64
        Bank row of every position of the reordered bank.
    ranges : list of (start, stop)
        Row ranges of the blocks in the reordered bank (each within one cluster).
    """

    def __init__(
        self, x: torch.Tensor, block_size: int, cluster_rows: int = CLUSTER_ROWS, seed: int = 0
    ) -> None:
        n = x.shape[0]
        n_clusters = max(2, round(n / min(cluster_rows, block_size)))
        label = _lloyd(x, n_clusters, seed)
        self.order = torch.argsort(label, stable=True)
        counts = torch.bincount(label, minlength=n_clusters).tolist()
        self.ranges = []
        start = 0
        for c in counts:  # each cluster in ceil(c / block_size) equal pieces
            pieces = math.ceil(c / block_size)
            cuts = np.linspace(start, start + c, pieces + 1).round().astype(int)
            self.ranges += list(zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True))
            start += c
        self.centres = self.radii = self.to_centre = None

    def measure(self, xs: torch.Tensor, rows: int = 8192) -> None:
        """Centroids, radii and row-to-centroid distances (float64 arithmetic) of the reordered bank
        ``xs = x[order]`` (n, d); a block at a time, so no float64 copy of the bank is made."""
        centres, radii = [], []
        for s, e in self.ranges:
            part = xs[s:e].double()
            mu = part.mean(0)
            centres.append(mu)
            radii.append(float((part - mu).norm(dim=1).max()))
        self.centres = torch.stack(centres)  # (blocks, d)
        self.radii = np.array(radii)
        c_norm = (self.centres**2).sum(1)
        # ||f - mu_B||, (n, blocks), computed in float64 and kept in float32: its rounding
        # (6e-8 relative) is far below the margin that skippable() allows
        to_centre = np.empty((xs.shape[0], len(self.ranges)), np.float32)
        for s in range(0, xs.shape[0], rows):
            part = xs[s : s + rows].double()
            sq = (part * part).sum(1, keepdim=True) + c_norm[None] - 2 * part @ self.centres.T
            to_centre[s : s + rows] = sq.clamp_min_(0).sqrt_().numpy()
        self.to_centre = to_centre

    @staticmethod
    def worth_it(n: int, block_size: int, cluster_rows: int = CLUSTER_ROWS) -> bool:
        """Whether a bank of n rows is worth reordering: large enough, and the bound table
        (rows x blocks) fits in :data:`MAX_BOUND_ENTRIES`."""
        blocks = round(n / min(cluster_rows, block_size)) + n // block_size + 1
        return n >= MIN_ROWS and n * blocks <= MAX_BOUND_ENTRIES

    def pairs(self) -> list[tuple[int, int]]:
        """Block pairs (i <= j): diagonal ones first, then by increasing centroid distance."""
        c = self.centres
        far = torch.cdist(c, c).numpy()
        m = len(self.ranges)
        rest = sorted(((i, j) for i in range(m) for j in range(i + 1, m)), key=lambda p: far[p])
        return [(i, i) for i in range(m)] + rest

    def skippable(self, i: int, j: int, kth: np.ndarray, margin: np.ndarray) -> bool:
        """Whether block pair (i, j) can hold no neighbour of any of its rows.

        ``kth`` (n,) are the rows' current k-th best squared distances (reordered positions),
        ``margin`` (n,) the float32 rounding allowance of those distances.
        """
        for a, b in ((i, j), (j, i)):
            s, e = self.ranges[a]
            gap = np.maximum(self.to_centre[s:e, b] - self.radii[b], 0.0)
            if not (gap * gap > kth[s:e] + margin[s:e]).all():
                return False
        return True


def _lloyd(x: torch.Tensor, n_clusters: int, seed: int) -> torch.Tensor:
    """Cluster label of every row: seeded Lloyd iterations on a sample, then every row to its
    nearest centroid. Returns shape (n,) int64."""
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    sample = x[torch.randperm(n, generator=gen)[: min(n, n_clusters * SAMPLE_PER_CLUSTER)]]
    centres = sample[torch.randperm(len(sample), generator=gen)[:n_clusters]].clone()
    for _ in range(LLOYD_ITERATIONS):
        label = _nearest(sample, centres)
        sums = torch.zeros_like(centres).index_add_(0, label, sample)
        counts = torch.bincount(label, minlength=n_clusters)
        alive = counts > 0  # an empty cluster keeps its centre
        centres[alive] = sums[alive] / counts[alive, None]
    return _nearest(x, centres)


def _nearest(x: torch.Tensor, centres: torch.Tensor, rows: int = 8192) -> torch.Tensor:
    """Index of the nearest centre of every row (GEMM form, in chunks)."""
    c_norm = (centres * centres).sum(1)
    out = torch.empty(x.shape[0], dtype=torch.int64)
    for s in range(0, x.shape[0], rows):
        out[s : s + rows] = torch.addmm(c_norm[None], x[s : s + rows], centres.T, alpha=-2).argmin(
            1
        )
    return out
