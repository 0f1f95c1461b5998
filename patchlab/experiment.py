"""One run, from a :class:`~patchlab.config.RunConfig` to maps, scores and metrics.

images -> features (cached) -> [coreset] -> neighbour table (cached) -> patch scores
       -> maps -> image scores -> metrics
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from patchlab.cache import atomic_save, cache_key, default_cache_dir
from patchlab.config import RunConfig
from patchlab.coreset import CORESET_VERSION, N_STARTS, PROJECTION_DIM, greedy_coreset
from patchlab.data import ImageSet, load_folder, load_masks, load_mvtec
from patchlab.features import extract_features, feature_key, resolve_device
from patchlab.knn import KNN_VERSION, Neighbours, knn
from patchlab.maps import anomaly_maps, image_scores, support_distances
from patchlab.methods import METHODS, ScoringInputs, score_patches
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
        n_patches, n_bank, image_score (the rule used), backbone, feature_dim, seconds per
        stage.
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


def load_images(config: RunConfig) -> ImageSet:
    """The image set a config names."""
    if config.unlabeled:
        return load_folder(config.data)
    return load_mvtec(config.data, config.category, config.setting)


def feature_options(config: RunConfig, progress: bool = False) -> dict:
    """The keyword arguments of :func:`extract_features` that a config sets."""
    return dict(
        backbone=config.backbone,
        weights=config.weights,
        seed=config.seed,
        resize=config.resize,
        crop=config.crop,
        batch_size=config.batch_size,
        device=config.device,
        cache_dir=config.cache_dir,
        progress=progress,
    )


def prepare(
    config: RunConfig, progress: bool = True
) -> tuple[ImageSet, ScoringInputs, np.ndarray, dict]:
    """Everything expensive a config's method needs: images, masks, features, neighbours."""
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = round(now - clock, 3)
        clock = now

    images = load_images(config)
    masks = load_masks(images, config.resize, config.crop)
    lap("load")
    common = feature_options(config, progress)
    # on CUDA the features stay there: every method then runs on the GPU
    features = extract_features(images, **common).to(resolve_device(config.device))
    method = METHODS[config.method]
    global_features = (
        extract_features(images, kind="global", **common) if method.uses_global else None
    )
    lap("features")
    table, bank_rows = None, None
    if method.uses_table:
        table, bank_rows = neighbour_table(images, features, config, progress=progress)
        lap("neighbours")
    return images, ScoringInputs(features, table, bank_rows, global_features), masks, seconds


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
    n, h, w, _ = inputs.features.shape
    flat = score_patches(
        config.method,
        inputs,
        config.k,
        k_img=config.k_img,
        ratio=config.mutual_ratio,
        seed=config.seed,
        progress=progress,
    )
    patch = flat.reshape(n, h, w)
    maps = anomaly_maps(patch, config.crop or config.resize, config.sigma)
    rule = config.image_score if inputs.neighbours is not None else "max"
    by_rule = {"max": image_scores(patch, "max")}
    if inputs.neighbours is not None:
        support = support_distances(
            patch, inputs.features, inputs.neighbours, config.b, inputs.bank_rows
        )
        for other in ("patchcore", "eq3"):
            by_rule[other] = image_scores(patch, other, support)
    scores = by_rule[rule]
    negative = int((scores < 0).sum())
    if negative:
        warnings.warn(
            f"{negative} of {n} images got a negative image-score weight under "
            f"image_score={rule!r} (its a* exceeds log sum exp of the support distances), "
            "which inverts their ranking; use image_score='patchcore' or 'max'",
            stacklevel=2,
        )
    t1 = time.perf_counter()
    metrics: dict = {"image_auroc": None, "pixel_auroc": None, "pro": None}
    if images.has_labels and pixel_metrics:
        metrics = evaluate(images.labels, scores, masks, maps)
    elif images.has_labels:
        metrics["image_auroc"] = evaluate_images(images.labels, scores)
    if images.has_labels and len(by_rule) > 1:
        metrics["image_auroc_by_score"] = {
            name: evaluate_images(images.labels, s) for name, s in by_rule.items()
        }
    metrics["negative_weights"] = negative
    n_bank = len(inputs.bank_rows) if inputs.bank_rows is not None else n * h * w
    metrics |= {
        "n_images": n,
        "n_patches": n * h * w,
        "n_bank": n_bank,
        "image_score": rule,
        "backbone": config.backbone,
        "weights": config.weights,
        "feature_dim": int(inputs.features.shape[-1]),
        "seconds": {"scores": round(t1 - t0, 3), "metrics": round(time.perf_counter() - t1, 3)},
    }
    return Result(config, images, inputs, patch, maps, scores, masks, metrics)


def neighbour_table(
    images: ImageSet, features: torch.Tensor, config: RunConfig, progress: bool = True
) -> tuple[Neighbours, torch.Tensor | None]:
    """The (n_patches, k_max) table of every patch against the memory bank, cached.

    The memory bank is every patch, or a greedy coreset of them (``config.coreset < 1``).
    A cached table computed for a larger k_max is sliced rather than recomputed.

    Returns
    -------
    (table, bank_rows): ``bank_rows`` (m,) int64 are the coreset's patch indices, or None.
    """
    n, h, w, d = features.shape
    fkey = feature_key(
        images,
        backbone=config.backbone,
        weights=config.weights,
        seed=config.seed,
        resize=config.resize,
        crop=config.crop,
    )
    folder = Path(config.cache_dir or default_cache_dir())
    bank = features.reshape(n * h * w, d)
    bank_rows = None
    if config.coreset < 1:
        bank_rows = _coreset_rows(bank, fkey, folder, config, progress)
    # the table's identity: features, exclusion, kNN version and the exact bank rows
    bank_id = "all" if bank_rows is None else hashlib.sha256(bank_rows.numpy()).hexdigest()[:16]
    stem = f"neighbours-{fkey}-{config.exclude}-{bank_id}-v{KNN_VERSION}"
    need = config.table_k
    cached = sorted(folder.glob(f"{stem}-k*.npz"), key=lambda p: int(p.stem.rsplit("-k", 1)[1]))
    for path in cached:
        if int(path.stem.rsplit("-k", 1)[1]) >= need:
            with np.load(path) as z:
                table = Neighbours(
                    torch.from_numpy(z["distances"][:, :need]).contiguous(),
                    torch.from_numpy(z["indices"][:, :need]).long().contiguous(),
                    config.exclude,
                )
            return table, bank_rows

    device = resolve_device(config.device)
    groups = torch.arange(n).repeat_interleave(h * w)
    kw: dict = dict(exclude=config.exclude, backend=config.backend, progress=progress)
    if bank_rows is None:
        table = knn(bank.to(device), need, query_groups=groups, **kw)
    else:
        table = knn(
            bank.to(device),
            need,
            bank[bank_rows].to(device),
            query_ids=torch.arange(n * h * w),
            bank_ids=bank_rows,
            query_groups=groups,
            bank_groups=groups[bank_rows],
            **kw,
        )
    table = Neighbours(table.distances.cpu(), table.indices.cpu(), config.exclude)
    atomic_save(
        folder / f"{stem}-k{need}.npz",
        distances=table.distances.numpy(),
        indices=table.indices.numpy().astype(np.int32),
    )
    return table, bank_rows


def _coreset_rows(bank, fkey, folder, config, progress) -> torch.Tensor:
    """Greedy coreset rows, cached. Greedy picks come in a fixed order for a given seed, so a
    smaller ratio is a prefix of a larger one: a cached longer sequence is cut, not redone."""
    m = max(1, int(bank.shape[0] * config.coreset))
    device = resolve_device(config.device)
    record = {
        "f": fkey,
        "seed": config.seed,
        "starts": N_STARTS,
        "dim": PROJECTION_DIM,
        "version": CORESET_VERSION,
        "device": device.type,
    }  # CPU and CUDA round apart
    stem = f"coreset-{cache_key(record)}"
    longer = sorted(folder.glob(f"{stem}-m*.npy"), key=lambda p: int(p.stem.rsplit("-m", 1)[1]))
    for path in longer:
        if int(path.stem.rsplit("-m", 1)[1]) >= m:
            return torch.from_numpy(np.load(path)[:m])
    rows = greedy_coreset(
        bank.to(resolve_device(config.device)), config.coreset, seed=config.seed, progress=progress
    ).cpu()
    atomic_save(folder / f"{stem}-m{m}.npy", rows=rows.numpy())
    return rows


def save_result(result: Result, out: str | Path) -> Path:
    """Write ``metrics.json``, ``image_scores.csv`` and ``maps.npz`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record = {**result.metrics, "config": result.config.to_dict()}
    (out / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
    order = np.argsort(-result.image_scores, kind="stable")
    with open(out / "image_scores.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "score"])
        for i in order:
            writer.writerow(
                [
                    str(result.images.paths[i]),
                    int(result.images.labels[i]),
                    f"{result.image_scores[i]:.6g}",
                ]
            )
    np.savez_compressed(
        out / "maps.npz",
        maps=result.maps.astype(np.float32),
        masks=result.masks.astype(np.uint8),
        labels=result.images.labels,
        image_scores=result.image_scores,
        paths=np.array([str(p) for p in result.images.paths]),
    )
    return out
