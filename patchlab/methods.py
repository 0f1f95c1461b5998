"""Patch scoring methods: one function each, one registry.

Every method returns one anomaly score per patch, shape (n_images * h * w,), from a
:class:`ScoringInputs`. The neighbour-table methods (PatchCluster, PatchCore, LOF) only slice
the stored table, so changing K re-scores instantly; the others (PaDiM, SPADE, mutual) read the
features directly and reuse the one kNN of :mod:`patchlab.knn`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from patchlab.bank import MemoryBank
from patchlab.knn import Neighbours, knn, nearest_per_group


@dataclass(frozen=True)
class ScoringInputs:
    """What the scoring methods read.

    Attributes
    ----------
    features : torch.Tensor, shape (n, h, w, d)
        Patch features of every image of the set.
    neighbours : Neighbours, optional
        Table of every patch (row ``i * h * w + p``) against the memory bank, k_max wide.
    bank : MemoryBank, optional
        The memory bank the table was computed against (:mod:`patchlab.bank`): the set's own
        patches or another set's (one-class), all or a coreset. None: every patch of the set.
    global_features : torch.Tensor, shape (n, c), optional
        One vector per image (for SPADE's image-level neighbours).
    local : int
        The locally aware neighbourhood size r the features were aggregated with.
    others : tuple of ScoringInputs
        The same images at the other locally aware neighbourhood sizes (MuSc's LNAMD,
        ``RunConfig.local_sizes``): :func:`score_patches` averages the scores of every size.
        Empty for one size.
    """

    features: torch.Tensor
    neighbours: Neighbours | None = None
    bank: MemoryBank | None = None
    global_features: torch.Tensor | None = None
    local: int = 3
    others: tuple[ScoringInputs, ...] = ()

    def bank_features(self) -> torch.Tensor:
        """The memory bank's entries, (m, d) (every patch of the set when ``bank`` is None)."""
        if self.bank is None:
            return self.features.reshape(-1, self.features.shape[-1])
        return self.bank.features

    def bank_ids(self) -> torch.Tensor:
        """(m,) int64: the patch index of each bank entry in its source (positions when the
        bank is every patch)."""
        return torch.arange(self.features[..., 0].numel()) if self.bank is None else self.bank.ids

    def table(self) -> Neighbours:
        if self.neighbours is None:
            raise ValueError("this method needs the neighbour table of the memory bank")
        return self.neighbours


def patchcluster(inputs: ScoringInputs, k: int) -> torch.Tensor:
    """PatchCluster (Eq. 2): the mean distance to the K nearest neighbours in the bank.

    s(f) = (1/K) * sum_{m in N_K(f)} ||f - m||_2,    the feature itself excluded
    """
    table = inputs.table()
    _check_k(table, k)
    return table.distances[:, :k].mean(1)


def patchcore(inputs: ScoringInputs, k: int = 1) -> torch.Tensor:
    """PatchCore: the distance to the nearest neighbour (PatchCluster with K = 1); K ignored."""
    return inputs.table().distances[:, 0].clone()


def patchcore_lof(inputs: ScoringInputs, k: int) -> torch.Tensor:
    """Local outlier factor of every patch with k neighbours in the bank (Breunig et al.).

        k-dist(o)        = distance from bank entry o to its k-th neighbour
        reach(p, o)      = max(k-dist(o), ||p - o||)
        lrd(p)           = 1 / mean_{o in N_k(p)} reach(p, o)
        LOF(p)           = mean_{o in N_k(p)} lrd(o) / lrd(p)

    The neighbours of bank entries are their own rows of the table (every bank entry is also
    a query), so the full table gives the LOF of every patch without another search.
    """
    if inputs.bank is not None and not inputs.bank.blind:
        raise ValueError("patchcore_lof needs a blind setting (the bank entries' own rows)")
    table = inputs.table()
    _check_k(table, k)
    dist, idx = table.distances[:, :k].double(), table.indices[:, :k]
    rows = inputs.bank_ids()
    k_dist = dist[rows, k - 1]  # (m,) k-distance of every bank entry
    reach = torch.maximum(dist, k_dist[idx])  # (n, k)
    lrd = 1.0 / reach.mean(1).clamp_min(1e-12)  # (n,) as sklearn: 1 / (mean + 1e-10)
    return (lrd[rows][idx].mean(1) / lrd).float()


def padim(inputs: ScoringInputs, k: int = 1, *, seed: int = 0, n_dims: int = 550) -> torch.Tensor:
    """PaDiM: one Gaussian per patch position over all images, Mahalanobis distance.

        mu_p = mean_i f_i(p),  Sigma_p = cov_i f_i(p) + 0.01 I,
        s(f_i(p)) = sqrt((f - mu_p)^T Sigma_p^-1 (f - mu_p))

    on a seeded random subset of ``n_dims`` channels (as PaDiM does with WideResNet-50).
    With few images the covariance is rank deficient; the 0.01 I term (PaDiM's own) keeps it
    invertible, so even one image gives finite scores. K is ignored.
    """
    n, h, w, d = inputs.features.shape
    gen = torch.Generator().manual_seed(seed)
    channels = torch.randperm(d, generator=gen)[: min(n_dims, d)].sort().values
    x = inputs.features[..., channels].double().reshape(n, h * w, -1).transpose(0, 1)  # (p, n, c)
    scores = torch.empty(h * w, n, dtype=torch.float64, device=x.device)
    eye = torch.eye(x.shape[2], dtype=torch.float64, device=x.device)
    for s in range(0, h * w, 64):  # 64 positions at a time: 64 covariance matrices in memory
        xs = x[s : s + 64]
        centred = xs - xs.mean(1, keepdim=True)
        cov = centred.transpose(1, 2) @ centred / max(n - 1, 1) + 0.01 * eye
        chol = torch.linalg.cholesky(cov)
        z = torch.linalg.solve_triangular(chol, centred.transpose(1, 2), upper=False)
        scores[s : s + 64] = z.pow(2).sum(1).sqrt()  # ||L^-1 (f - mu)|| = Mahalanobis
    return scores.T.reshape(-1).float()


def spade(
    inputs: ScoringInputs, k: int = 1, *, k_img: int = 50, progress: bool = False
) -> torch.Tensor:
    """SPADE: nearest patch among the K_img nearest images (by global feature), itself excluded."""
    return _spade(inputs, 1, k_img, progress)


def spade_cluster(
    inputs: ScoringInputs, k: int, *, k_img: int = 50, progress: bool = False
) -> torch.Tensor:
    """SPADE-Cluster: mean distance to the K nearest patches among the K_img nearest images."""
    return _spade(inputs, k, k_img, progress)


def _spade(inputs: ScoringInputs, k: int, k_img: int, progress: bool) -> torch.Tensor:
    n, h, w, d = inputs.features.shape
    if inputs.global_features is None:
        raise ValueError("SPADE needs global features (extract_features(kind='global'))")
    if not 1 <= k_img <= n - 1:
        raise ValueError(f"k_img={k_img} must lie in [1, n_images - 1 = {n - 1}]")
    if not 1 <= k <= k_img * h * w:
        raise ValueError(f"K={k} must lie in [1, k_img * patches per image = {k_img * h * w}]")
    images = knn(inputs.global_features, k_img, exclude="self", progress=False).indices
    patches = inputs.features.reshape(n, h * w, d)
    out = torch.empty(n, h * w, device=patches.device)
    for i in tqdm(range(n), desc="spade", unit="img", disable=not progress):
        gallery = patches[images[i]].reshape(-1, d)  # patches of the K_img nearest images
        table = knn(patches[i], k, gallery, exclude="none", progress=False)
        out[i] = table.distances.mean(1)
    return out.reshape(-1)


MUTUAL_BLOCK = 2**23  # per-image minima held at once by mutual scoring (32 MB of float32)


def mutual(
    inputs: ScoringInputs, k: int = 1, *, ratio: float = 0.3, progress: bool = False
) -> torch.Tensor:
    """Mutual scoring (MuSc's MSM): the mean of the lowest ``ratio`` of per-image minima.

        m_j(f) = min_{g in image j} ||f - g||   for every other image j
        s(f)   = mean of the ceil(ratio * (n_j)) smallest m_j(f),  n_j images j

    The images j are the set's own (blind; n_j = n - 1), or, with a memory bank, the bank's
    source images (``inputs.bank.source``): a saved bank's (its own image is not among them),
    or a saved bank's plus the set, the set first (blind: image i of the set is skipped).

    Streamed: the per-image minima of one block of query patches at a time, (block, n), so
    memory stays bounded whatever the set's size (never the (N, n) table). K is ignored.
    """
    n, h, w, d = inputs.features.shape
    columns = inputs.features if inputs.bank is None else inputs.bank.source
    own = inputs.bank is None or inputs.bank.blind  # image i is column i: skipped
    n_j = len(columns) - own
    if n_j < 1:
        raise ValueError(
            "mutual scoring needs at least two images; for one image use method='patchcluster'"
            " (--method patchcluster)"
        )
    if not 0 < ratio <= 1:
        raise ValueError(f"mutual ratio must lie in (0, 1], got {ratio}")
    queries = inputs.features.reshape(n * h * w, d)
    bank = columns.reshape(-1, d).to(queries.device)
    keep = max(1, math.ceil(ratio * n_j))
    images_per_block = max(1, (MUTUAL_BLOCK // len(columns)) // (h * w))
    out = torch.empty(n * h * w, device=queries.device)
    starts = range(0, n, images_per_block)
    for i0 in tqdm(starts, desc="mutual scoring", unit="block", disable=not progress):
        i1 = min(n, i0 + images_per_block)
        rows = slice(i0 * h * w, i1 * h * w)
        minima = nearest_per_group(queries[rows], bank, h * w, progress=False)  # (block, n_c)
        if own:
            image = torch.arange(i0, i1, device=queries.device).repeat_interleave(h * w)
            minima[torch.arange(len(image), device=queries.device), image] = float("inf")
        out[rows] = minima.topk(keep, dim=1, largest=False).values.mean(1)
    return out


def _check_k(table: Neighbours, k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"K must be a positive integer, got {k!r}")
    if k > table.k:
        raise ValueError(
            f"K={k} exceeds the neighbour table's k_max={table.k}; recompute the neighbours "
            f"with k_max >= {k} (--k-max)"
        )


@dataclass(frozen=True)
class Method:
    """A registry entry: the scoring function, what it reads, and the options it takes.

    ``options`` maps each keyword option of ``fn`` to the :class:`~patchlab.config.RunConfig`
    field that sets it.
    """

    fn: Callable[..., torch.Tensor]
    uses_table: bool  # reads the neighbour table (and supports the re-weighted image scores)
    uses_global: bool = False
    options: dict[str, str] = field(default_factory=dict)
    shows_progress: bool = False  # takes a ``progress`` flag (the slow, per-image methods)


METHODS: dict[str, Method] = {
    "patchcluster": Method(patchcluster, uses_table=True),
    "patchcore": Method(patchcore, uses_table=True),
    "patchcore_lof": Method(patchcore_lof, uses_table=True),
    "padim": Method(padim, uses_table=False, options={"seed": "seed"}),
    "spade": Method(spade, False, True, {"k_img": "k_img"}, shows_progress=True),
    "spade_cluster": Method(spade_cluster, False, True, {"k_img": "k_img"}, shows_progress=True),
    "mutual": Method(mutual, False, options={"ratio": "mutual_ratio"}, shows_progress=True),
}


def get_method(name: str) -> Method:
    """The registry entry ``name``, or an error listing the choices."""
    if name not in METHODS:
        raise ValueError(f"method={name!r} is unknown; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def score_patches(
    method: str, inputs: ScoringInputs, k: int, *, progress: bool = False, **options
) -> torch.Tensor:
    """Score every patch with the method called ``method`` (a key of :data:`METHODS`).

    ``options`` are the method's own (:attr:`Method.options`, e.g. ``k_img`` for SPADE,
    ``ratio`` for mutual scoring); any other is an error. Methods run on the device of
    ``inputs.features``. With features at several neighbourhood sizes r (``inputs.others``,
    MuSc's LNAMD) each size is scored on its own and the scores are averaged:

        s(f) = (1 / |R|) * sum_{r in R} s_r(f)

    Returns
    -------
    torch.Tensor, shape (n_images * h * w,), float32, on the CPU
    """
    entry = get_method(method)
    unknown = set(options) - set(entry.options)
    if unknown:
        raise ValueError(
            f"method {method!r} takes no option {', '.join(sorted(unknown))}; its options: "
            f"{', '.join(entry.options) or 'none'}"
        )
    if entry.shows_progress:
        options["progress"] = progress
    sizes = (inputs, *inputs.others)
    total = sum(entry.fn(x, k, **options).double().cpu() for x in sizes)
    return (total / len(sizes)).float()
