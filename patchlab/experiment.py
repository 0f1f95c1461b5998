"""One run, from a :class:`~patchlab.config.RunConfig` to maps, scores and metrics.

images -> features (cached) -> neighbour table (cached) -> patch scores -> maps
       -> image scores -> metrics
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from patchlab.cache import atomic_save, default_cache_dir
from patchlab.config import RunConfig
from patchlab.data import ImageSet, load_folder, load_masks, load_mvtec
from patchlab.features import extract_features, feature_key, resolve_device
from patchlab.knn import Neighbours, knn
from patchlab.maps import anomaly_maps, image_scores
from patchlab.methods import score_patches
from patchlab.metrics import evaluate


@dataclass
class Result:
    """What one run produced.

    Attributes
    ----------
    config : RunConfig
    images : ImageSet
    features : torch.Tensor, shape (n, h, w, d)
    neighbours : Neighbours, (n * h * w, k_max) table
    patch_scores : torch.Tensor, shape (n, h, w)
    maps : np.ndarray, shape (n, S, S), float32
    image_scores : np.ndarray, shape (n,)
    masks : np.ndarray, shape (n, S, S), uint8
    metrics : dict
        image_auroc, pixel_auroc, pro (None where undefined), n_images, n_patches, seconds.
    """

    config: RunConfig
    images: ImageSet
    features: torch.Tensor
    neighbours: Neighbours
    patch_scores: torch.Tensor
    maps: np.ndarray
    image_scores: np.ndarray
    masks: np.ndarray
    metrics: dict = field(default_factory=dict)


def load_images(config: RunConfig) -> ImageSet:
    """The image set a config names."""
    if config.unlabeled:
        return load_folder(config.data)
    return load_mvtec(config.data, config.category, config.setting)


def run(config: RunConfig, progress: bool = True) -> Result:
    """Run the whole pipeline once; features and neighbours come from the cache when present."""
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
    features = extract_features(
        images,
        weights=config.weights,
        seed=config.seed,
        resize=config.resize,
        crop=config.crop,
        batch_size=config.batch_size,
        device=config.device,
        cache_dir=config.cache_dir,
        progress=progress,
    )
    lap("features")
    neighbours = neighbour_table(images, features, config, progress=progress)
    lap("neighbours")
    result = rescore(config, images, features, neighbours, masks)
    result.metrics["seconds"] = {**seconds, **result.metrics["seconds"]}
    return result


def rescore(
    config: RunConfig,
    images: ImageSet,
    features: torch.Tensor,
    neighbours: Neighbours,
    masks: np.ndarray,
) -> Result:
    """Scores, maps, image scores and metrics from a stored neighbour table (no kNN)."""
    t0 = time.perf_counter()
    n, h, w, _ = features.shape
    patch = score_patches(config.method, neighbours, config.k).reshape(n, h, w)
    side = config.crop or config.resize
    maps = anomaly_maps(patch, side, config.sigma)
    scores = image_scores(patch, neighbours, config.image_score, config.b)
    t1 = time.perf_counter()
    metrics: dict = {"image_auroc": None, "pixel_auroc": None, "pro": None}
    if images.has_labels:
        metrics = evaluate(images.labels, scores, masks, maps)
    metrics |= {
        "n_images": n,
        "n_patches": n * h * w,
        "seconds": {"scores": round(t1 - t0, 3), "metrics": round(time.perf_counter() - t1, 3)},
    }
    return Result(config, images, features, neighbours, patch, maps, scores, masks, metrics)


def neighbour_table(
    images: ImageSet, features: torch.Tensor, config: RunConfig, progress: bool = True
) -> Neighbours:
    """The (n_patches, k_max) self-kNN table of the bank, from the cache when possible.

    A cached table computed for a larger k_max is sliced rather than recomputed.
    """
    n, h, w, d = features.shape
    fkey = feature_key(
        images, weights=config.weights, seed=config.seed, resize=config.resize, crop=config.crop
    )
    folder = Path(config.cache_dir or default_cache_dir())
    stem = f"neighbours-{fkey}-{config.exclude}"
    need = config.table_k
    for path in sorted(folder.glob(f"{stem}-k*.npz"), key=lambda p: int(p.stem.rsplit("k", 1)[1])):
        if int(path.stem.rsplit("k", 1)[1]) >= need:
            with np.load(path) as z:
                return Neighbours(
                    torch.from_numpy(z["distances"][:, :need]).contiguous(),
                    torch.from_numpy(z["indices"][:, :need]).long().contiguous(),
                    config.exclude,
                )
    bank = features.reshape(n * h * w, d)
    groups = torch.arange(n).repeat_interleave(h * w)
    table = knn(
        bank.to(resolve_device(config.device)),
        need,
        exclude=config.exclude,
        query_groups=groups,
        backend=config.backend,
        progress=progress,
    )
    table = Neighbours(table.distances.cpu(), table.indices.cpu(), config.exclude)
    atomic_save(
        folder / f"{stem}-k{need}.npz",
        distances=table.distances.numpy(),
        indices=table.indices.numpy().astype(np.int32),
    )
    return table


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


def with_method(config: RunConfig, method: str, k: int | None = None) -> RunConfig:
    """A copy of ``config`` with another method (and K)."""
    return replace(config, method=method, k=config.k if k is None else k)
