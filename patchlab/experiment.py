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

import numpy as np
import torch

from patchlab.bank import build_bank, neighbour_table
from patchlab.cache import (
    cache_folder,
    check_cache_folder,
    feature_key,
    remove_orphans,
    resolve_device,
)
from patchlab.config import RunConfig
from patchlab.data import ImageSet, load_folder, load_mvtec
from patchlab.features import extract_features
from patchlab.images import load_masks
from patchlab.maps import NEEDS_SUPPORT, anomaly_maps, image_scores_by_rule
from patchlab.methods import ScoringInputs, get_method, score_patches
from patchlab.metrics import evaluate_rules


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
        image-score rule the inputs allow: patchcore and eq3 need a neighbour table),
        negative_weights, n_images, n_patches, n_bank, image_score (the rule used), k_img
        (SPADE, the value used), backbone, weights, feature_dim, seconds per stage.
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


def feature_settings(config: RunConfig) -> dict:
    """The settings that name a config's features in the cache (:func:`feature_key`)."""
    return dict(
        backbone=config.backbone,
        weights=config.weights,
        seed=config.seed,
        resize=config.resize,
        crop=config.crop,
        local=config.local_sizes[0],
    )


def feature_options(config: RunConfig, progress: bool = False) -> dict:
    """The keyword arguments of :func:`extract_features` that a config sets (the first of
    its locally aware sizes)."""
    return dict(
        **feature_settings(config),
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
    (images, inputs, masks, seconds): ``seconds`` per stage (load, features and neighbours).
    """
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = round(now - clock, 3)
        clock = now

    cache = check_cache_folder(cache_folder(config.cache_dir))  # before the work, not after
    remove_orphans(cache)  # temporary files of killed writes
    images = load_images(config)
    if len(images) == 1:
        warnings.warn(
            f"{images.name} holds one image: blind detection compares its patches with each "
            "other only, so a defect that fills much of it scores low; add more images",
            stacklevel=2,
        )
    masks = load_masks(images, config.resize, config.crop)
    lap("load")
    method = get_method(config.method)
    glob = None
    if method.uses_global or config.rscin:
        glob = extract_features(images, kind="global", **feature_options(config, progress))
    lap("features")
    sizes = [size_inputs(images, config, r, progress, glob, seconds) for r in config.local_sizes]
    # MuSc's LNAMD: the first size carries the others
    return images, replace(sizes[0], others=tuple(sizes[1:])), masks, seconds


def size_inputs(
    images: ImageSet,
    config: RunConfig,
    local: int,
    progress: bool = True,
    glob: torch.Tensor | None = None,
    seconds: dict | None = None,
) -> ScoringInputs:
    """The features of ``images`` at one locally aware neighbourhood size, and what the
    config's method reads of them: the memory bank (another image set, one-class) and the
    neighbour table with its coreset rows (:func:`patchlab.bank.neighbour_table`). The time
    of each stage is added to ``seconds["features"]`` and ``seconds["neighbours"]``."""
    seconds = {} if seconds is None else seconds
    t0 = time.perf_counter()
    config = replace(config, local_sizes=(local,))
    common = feature_options(config, progress)
    # on CUDA the features stay there: every method then runs on the GPU
    features = extract_features(images, **common).to(resolve_device(config.device))
    table, bank = None, None
    t1 = time.perf_counter()
    if get_method(config.method).uses_table:  # the other methods read the set's features
        key = feature_key(images.paths, **feature_settings(config))
        source, source_key = features, key
        if config.bank_setting is not None:  # one-class: the bank is another image set
            bank_images = load_images(config, config.bank_setting)
            source = extract_features(bank_images, **common).to(features.device)
            source_key = feature_key(bank_images.paths, **feature_settings(config))
        t1 = time.perf_counter()
        bank = build_bank(source, source_key, config, config.bank_setting is None, progress)
        table = neighbour_table(features, key, bank, config, progress)
    for stage, value in (("features", t1 - t0), ("neighbours", time.perf_counter() - t1)):
        seconds[stage] = round(seconds.get(stage, 0.0) + value, 3)
    return ScoringInputs(features, table, bank, glob, local=local)


def run(config: RunConfig, progress: bool = True) -> Result:
    """Run the whole pipeline once; features and neighbours come from the cache when present.

    Examples
    --------
    A small demo category, the paper's PatchCluster with K = 3 (pretrained Lite0 features):

    >>> import tempfile
    >>> from patchlab.config import PAPER_SETTINGS, RunConfig
    >>> from patchlab.demo import make_demo_data
    >>> tmp = tempfile.mkdtemp()
    >>> root = make_demo_data(tmp + "/demo", categories=["brick"], n_train=2, n_test_good=3,
    ...                       n_defective=3)
    >>> config = RunConfig(data=str(root), category="brick", k=3, k_max=5,
    ...                    cache_dir=tmp + "/cache", **PAPER_SETTINGS)
    >>> result = run(config, progress=False)
    >>> result.maps.shape, result.image_scores.shape  # test setting: 3 good + 3 defective
    ((6, 224, 224), (6,))
    >>> sorted(result.metrics)[:4]
    ['backbone', 'feature_dim', 'image_auroc', 'image_auroc_by_score']
    """
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
    patch_scores: torch.Tensor | None = None,
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
    ``patch_scores`` (n * h * w,) are the method's scores when the caller kept them from an
    earlier call (:attr:`Result.patch_scores`): a method that ignores K (mutual scoring,
    PaDiM) is then not computed again when only the image score or the display changes.

    Examples
    --------
    Another K from what :func:`prepare` (or :func:`run`) computed, without any kNN:

    >>> import tempfile
    >>> from dataclasses import replace
    >>> from patchlab.config import PAPER_SETTINGS, RunConfig
    >>> from patchlab.demo import make_demo_data
    >>> tmp = tempfile.mkdtemp()
    >>> root = make_demo_data(tmp + "/demo", categories=["brick"], n_train=2, n_test_good=3,
    ...                       n_defective=3)
    >>> config = RunConfig(data=str(root), category="brick", k=3, k_max=5,
    ...                    cache_dir=tmp + "/cache", **PAPER_SETTINGS)
    >>> images, inputs, masks, _ = prepare(config, progress=False)
    >>> k5 = rescore(replace(config, k=5), images, inputs, masks)
    >>> k5.patch_scores.shape  # one score per 8 x 8 patch of each image
    torch.Size([6, 28, 28])
    """
    t0 = time.perf_counter()
    prepared = (inputs.local, *(x.local for x in inputs.others))
    if prepared != config.local_sizes:
        raise ValueError(
            f"local_sizes={config.local_sizes} but the inputs were prepared with sizes "
            f"{prepared}; prepare() with this config"
        )
    n, h, w, _ = inputs.features.shape
    method = get_method(config.method)
    options = {name: getattr(config, key) for name, key in method.options.items()}
    if "k_img" in options:  # SPADE on a small set: at most every other image
        options["k_img"] = min(options["k_img"], max(1, n - 1))
    flat = patch_scores
    if flat is None:
        flat = score_patches(config.method, inputs, config.k, progress=progress, **options)
    patch = flat.reshape(n, h, w)
    maps = anomaly_maps(patch, config.crop or config.resize, config.sigma)
    rule = config.image_score
    if rule in NEEDS_SUPPORT and inputs.neighbours is None:
        rule = "max"
    by_rule = image_scores_by_rule(patch, inputs, config.b, config.top_q, config.rscin)
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
    labels = images.labels if images.has_labels else None
    metrics = evaluate_rules(labels, by_rule, rule, masks, maps, pixel_metrics)
    n_bank = len(inputs.bank) if inputs.bank is not None else inputs.features[..., 0].numel()
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
