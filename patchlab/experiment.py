"""One run, from a :class:`~patchlab.config.RunConfig` to maps, scores and metrics.

images -> features (cached) -> [coreset] -> neighbour table (cached) -> patch scores
       -> maps -> image scores -> metrics

:func:`prepare` does the expensive part once (features, coreset, neighbour table, each through
:mod:`patchlab.cache`); :func:`rescore` does the rest from what it prepared, in milliseconds,
for any method, K and image score; :func:`run` is the two. Writing a result to disk is
:mod:`patchlab.outputs`.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from patchlab.cache import (
    atomic_save,
    cache_folder,
    coreset_stem,
    feature_key,
    find_prefix,
    neighbour_stem,
    read_entry,
    remove_orphans,
    resolve_device,
)
from patchlab.config import RunConfig
from patchlab.coreset import greedy_coreset
from patchlab.data import ImageSet, load_folder, load_masks, load_mvtec
from patchlab.features import extract_features
from patchlab.knn import Neighbours, knn
from patchlab.maps import (
    IMAGE_SCORES,
    NEEDS_SUPPORT,
    anomaly_maps,
    image_scores,
    rscin,
    support_distances,
)
from patchlab.methods import ScoringInputs, get_method, score_patches
from patchlab.metrics import evaluate
from patchlab.metrics import image_auroc as evaluate_images


@dataclass
class Result:
    """What one run produced.

    Attributes
    ----------
    config : RunConfig
    images : ImageSet
    inputs : ScoringInputs
        Features, neighbour table, coreset rows and global features the scores came from.
    patch_scores : torch.Tensor, shape (n, h, w)
    maps : np.ndarray, shape (n, S, S), float32
    image_scores : np.ndarray, shape (n,)
    masks : np.ndarray, shape (n, S, S), uint8
    metrics : dict
        image_auroc, pixel_auroc, pro (None where undefined), image_auroc_by_score (every
        image-score rule, where a neighbour table exists), negative_weights, n_images,
        n_patches, n_bank, image_score (the rule used), k_img (SPADE, the value used),
        backbone, weights, feature_dim, seconds per stage.
    """

    config: RunConfig
    images: ImageSet
    inputs: ScoringInputs
    patch_scores: torch.Tensor
    maps: np.ndarray
    image_scores: np.ndarray
    masks: np.ndarray
    metrics: dict = field(default_factory=dict)

    @property
    def features(self) -> torch.Tensor:
        return self.inputs.features


def load_images(config: RunConfig, setting: str | None = None) -> ImageSet:
    """The image set a config names (or its ``setting`` of the same category)."""
    if config.unlabeled:
        return load_folder(config.data)
    return load_mvtec(config.data, config.category, setting or config.setting)


def feature_options(config: RunConfig, progress: bool = False) -> dict:
    """The keyword arguments of :func:`extract_features` that a config sets (the first of
    its locally aware sizes)."""
    return dict(
        backbone=config.backbone,
        weights=config.weights,
        seed=config.seed,
        resize=config.resize,
        crop=config.crop,
        local=config.local_sizes[0],
        batch_size=config.batch_size,
        device=config.device,
        cache_dir=config.cache_dir,
        scheduler=config.scheduler,
        progress=progress,
    )


def prepare(
    config: RunConfig, progress: bool = True
) -> tuple[ImageSet, ScoringInputs, np.ndarray, dict]:
    """Everything expensive a config's method needs: images, masks, features, neighbours.

    Returns
    -------
    (images, inputs, masks, seconds): ``seconds`` per stage (load, features, neighbours).
    """
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = round(now - clock, 3)
        clock = now

    remove_orphans(cache_folder(config.cache_dir))  # temporary files of killed writes
    images = load_images(config)
    masks = load_masks(images, config.resize, config.crop)
    lap("load")
    common = feature_options(config, progress)
    device = resolve_device(config.device)
    # on CUDA the features stay there: every method then runs on the GPU
    features = extract_features(images, **common).to(device)
    bank_images, bank = None, None
    if config.bank_setting is not None:  # one-class: the bank is another image set
        bank_images = load_images(config, config.bank_setting)
        bank = extract_features(bank_images, **common).to(device)
    method = get_method(config.method)
    wants_global = method.uses_global or bool(config.rscin)
    glob = extract_features(images, kind="global", **common) if wants_global else None
    lap("features")
    table, bank_rows = None, None
    if method.uses_table:
        table, bank_rows = neighbour_table(images, features, config, progress, bank_images, bank)
        lap("neighbours")
    others = tuple(
        prepare(replace(config, local_sizes=(r,), rscin=()), progress)[1]
        for r in config.local_sizes[1:]
    )  # MuSc's LNAMD: the same set at the other neighbourhood sizes
    if others:
        lap("other sizes")
    inputs = ScoringInputs(features, table, bank_rows, glob, bank, others)
    return images, inputs, masks, seconds


def run(config: RunConfig, progress: bool = True) -> Result:
    """Run the whole pipeline once; features and neighbours come from the cache when present."""
    images, inputs, masks, seconds = prepare(config, progress)
    result = rescore(config, images, inputs, masks, progress=progress)
    result.metrics["seconds"] = {**seconds, **result.metrics["seconds"]}
    return result


def rescore(
    config: RunConfig,
    images: ImageSet,
    inputs: ScoringInputs,
    masks: np.ndarray,
    progress: bool = False,
    pixel_metrics: bool = True,
) -> Result:
    """Scores, maps, image scores and metrics from prepared inputs (no feature or kNN work).

    The re-weighted image scores (``patchcore``, ``eq3``) need the neighbour table; methods
    without one use the plain maximum, and ``metrics["image_score"]`` says which rule was
    used. Where a table exists, the image AUROC of every rule is reported as
    ``metrics["image_auroc_by_score"]`` and ``metrics["negative_weights"]`` counts the images
    whose weight under the configured rule is negative (a warning says so).
    ``pixel_metrics=False`` skips pixel AUROC and PRO (they sort every pixel of the set, the
    slowest part of a re-score; they are None then) and keeps the image AUROC: what an
    interactive widget needs.
    """
    t0 = time.perf_counter()
    if len(inputs.others) + 1 != len(config.local_sizes):
        raise ValueError(
            f"local_sizes={config.local_sizes} but the inputs were prepared with "
            f"{len(inputs.others) + 1} neighbourhood size(s); prepare() with this config"
        )
    n, h, w, _ = inputs.features.shape
    method = get_method(config.method)
    options = {name: getattr(config, key) for name, key in method.options.items()}
    if "k_img" in options:  # SPADE on a small set: at most every other image
        options["k_img"] = min(options["k_img"], max(1, n - 1))
    flat = score_patches(config.method, inputs, config.k, progress=progress, **options)
    patch = flat.reshape(n, h, w)
    maps = anomaly_maps(patch, config.crop or config.resize, config.sigma)
    rule = config.image_score
    if rule in NEEDS_SUPPORT and inputs.neighbours is None:
        rule = "max"
    by_rule = image_scores_by_rule(patch, inputs, config)
    scores = by_rule[rule]
    negative = int((scores < 0).sum()) if rule in NEEDS_SUPPORT else 0
    if negative:
        warnings.warn(
            f"{negative} of {n} images got a negative image-score weight under "
            f"image_score={rule!r} (its a* exceeds log sum exp of the support distances), "
            "which inverts their ranking; use image_score='patchcore' or 'max'",
            stacklevel=2,
        )
    t1 = time.perf_counter()
    metrics = _metrics(images, masks, maps, by_rule, rule, pixel_metrics)
    source = inputs.features if inputs.bank is None else inputs.bank
    n_bank = len(inputs.bank_rows) if inputs.bank_rows is not None else source[..., 0].numel()
    metrics |= {
        "negative_weights": negative,
        "n_images": n,
        "n_patches": n * h * w,
        "n_bank": n_bank,
        "image_score": rule,
        "backbone": config.backbone,
        "weights": config.weights,
        "feature_dim": int(inputs.features.shape[-1]),
        **({"k_img": options["k_img"]} if "k_img" in options else {}),
        "seconds": {"scores": round(t1 - t0, 3), "metrics": round(time.perf_counter() - t1, 3)},
    }
    return Result(config, images, inputs, patch, maps, scores, masks, metrics)


def image_scores_by_rule(patch: torch.Tensor, inputs: ScoringInputs, config: RunConfig) -> dict:
    """The image scores under every rule the inputs allow (the re-weighted ones need a
    neighbour table), {rule: (n,) float64}; each smoothed by RsCIN when the config asks."""
    support = None
    if inputs.neighbours is not None:
        support = support_distances(patch, inputs, config.b)
    by_rule = {
        rule: image_scores(patch, rule, support, config.top_q)
        for rule in IMAGE_SCORES
        if support is not None or rule not in NEEDS_SUPPORT
    }
    if config.rscin:
        if inputs.global_features is None:
            raise ValueError("rscin needs the global features: prepare() with rscin set")
        by_rule = {r: rscin(s, inputs.global_features, config.rscin) for r, s in by_rule.items()}
    return by_rule


def _metrics(images, masks, maps, by_rule, rule, pixel_metrics) -> dict:
    """Image AUROC (of the rule used and of every rule), pixel AUROC and PRO, where labels
    allow; None where undefined."""
    metrics: dict = {"image_auroc": None, "pixel_auroc": None, "pro": None}
    if not images.has_labels:
        return metrics
    if pixel_metrics:
        metrics = evaluate(images.labels, by_rule[rule], masks, maps)
    else:
        metrics["image_auroc"] = evaluate_images(images.labels, by_rule[rule])
    if len(by_rule) > 1:
        metrics["image_auroc_by_score"] = {
            name: evaluate_images(images.labels, s) for name, s in by_rule.items()
        }
    return metrics


def neighbour_table(
    images: ImageSet,
    features: torch.Tensor,
    config: RunConfig,
    progress: bool = True,
    bank_images: ImageSet | None = None,
    bank: torch.Tensor | None = None,
) -> tuple[Neighbours, torch.Tensor | None]:
    """The (n_patches, k_max) table of every patch against the memory bank, cached.

    The memory bank is every patch of the set (blind), or of ``bank`` (the features of
    ``bank_images``, one-class), or a greedy coreset of those (``config.coreset < 1``). A
    cached table computed for a larger k_max is sliced rather than recomputed.

    Returns
    -------
    (table, bank_rows): ``bank_rows`` (m,) int64 are the coreset's patch indices, or None.
    """
    options = dict(
        backbone=config.backbone,
        weights=config.weights,
        seed=config.seed,
        resize=config.resize,
        crop=config.crop,
        local=config.local_sizes[0],
    )
    key = feature_key(images.paths, **options)
    bank_key = None if bank is None else feature_key(bank_images.paths, **options)
    source = features if bank is None else bank
    pool = source.reshape(-1, source.shape[-1])
    bank_rows = None
    if config.coreset < 1:
        bank_rows = coreset_rows(pool, bank_key or key, config, progress)
    folder, need = cache_folder(config.cache_dir), config.table_k
    stem = neighbour_stem(key, config.exclude, bank_rows, bank_key)
    n_rows = features[..., 0].numel()
    n_bank = len(pool) if bank_rows is None else len(bank_rows)
    _check_bank_size(config, n_bank)

    def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
        with np.load(path) as z:
            return z["distances"][:, :need], z["indices"][:, :need]

    def complete(table) -> bool:
        d, i = table
        return d.shape == i.shape == (n_rows, need) and int(i.max(initial=0)) < n_bank
        # (a broken file raises while loading; read_entry removes it either way)

    while (cached := find_prefix(folder, stem, "k", need)) is not None:
        table = read_entry(cached, load, complete)
        if table is not None:
            distances = torch.from_numpy(np.ascontiguousarray(table[0]))
            indices = torch.from_numpy(table[1].astype(np.int64))
            return Neighbours(distances, indices, config.exclude), bank_rows
    table = _search(features, pool, bank_rows, config, progress, blind=bank is None)
    atomic_save(
        folder / f"{stem}-k{need}.npz",
        distances=table.distances.numpy(),
        indices=table.indices.numpy().astype(np.int32),
    )
    return table, bank_rows


def _check_bank_size(config: RunConfig, n_bank: int) -> None:
    """A clear error when a coreset leaves too few patches for the table (the kNN's own error
    would not name the coreset)."""
    if config.coreset == 1 or n_bank > config.table_k:
        return
    raise ValueError(
        f"--coreset {config.coreset} keeps {n_bank} patch features, too few for a neighbour "
        f"table of k_max={config.table_k} (plus the excluded ones); raise --coreset or lower "
        "--k / --k-max"
    )


def _search(features, pool, bank_rows, config, progress, blind) -> Neighbours:
    """The kNN of every patch of ``features`` against ``pool`` (or its ``bank_rows``)."""
    n, h, w, d = features.shape
    queries = features.reshape(n * h * w, d)
    groups = torch.arange(n).repeat_interleave(h * w)
    kw: dict = dict(exclude=config.exclude, engine=config.engine(), progress=progress)
    need = config.table_k
    search = knn
    if config.scheduler is not None:  # the same search, in row strips on a Dask cluster
        from patchlab.distributed import connect, knn_on_cluster

        search = partial(knn_on_cluster, connect(config.scheduler))
    if blind and bank_rows is None:  # the self-kNN: symmetric blocks
        table = search(queries, need, query_groups=groups, **kw)
    elif blind:  # a coreset of the set's own patches: rows keep their patch identity
        table = search(
            queries,
            need,
            pool[bank_rows.to(pool.device)],
            query_ids=torch.arange(n * h * w),
            bank_ids=bank_rows,
            query_groups=groups,
            bank_groups=groups[bank_rows],
            **kw,
        )
    else:  # one-class: the bank is another image set, nothing to exclude
        bank = pool if bank_rows is None else pool[bank_rows.to(pool.device)]
        table = search(queries, need, bank, **kw)
    return Neighbours(table.distances.cpu(), table.indices.cpu(), config.exclude)


def coreset_rows(
    pool: torch.Tensor, key: str, config: RunConfig, progress: bool = True
) -> torch.Tensor:
    """Greedy coreset rows of ``pool`` (m, d), the features named ``key``, cached.

    Greedy picks come in a fixed order for a given seed, so a smaller ratio is a prefix of a
    larger one: a cached longer sequence is cut, not redone.
    """
    m = max(1, int(pool.shape[0] * config.coreset))
    device = resolve_device(config.device)
    folder = cache_folder(config.cache_dir)
    stem = coreset_stem(key, config.seed, device)

    def valid(rows: np.ndarray) -> bool:
        return rows.ndim == 1 and len(rows) >= m and 0 <= rows.min() and rows.max() < len(pool)

    while (cached := find_prefix(folder, stem, "m", m)) is not None:
        rows = read_entry(cached, np.load, valid)
        if rows is not None:
            return torch.from_numpy(rows[:m].astype(np.int64))
    rows = greedy_coreset(pool.to(device), config.coreset, seed=config.seed, progress=progress)
    rows = rows.cpu()
    atomic_save(folder / f"{stem}-m{m}.npy", rows=rows.numpy())
    return rows
