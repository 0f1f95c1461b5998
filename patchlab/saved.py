"""A run's memory bank on disk, and new images scored against it.

Blind detection needs a batch; images arrive batch after batch. ``patchlab run --save-bank``
writes ``OUT/bank/``, everything needed to score later images without the first batch or the
cache: the patch features of its images at each locally aware size (the bank is all of them,
or their coreset ``rows``), their global features where the method needs them, the run's image
scores, the image names, and the settings (backbone, weights' identity, preprocessing, scoring).

:func:`score_images` then scores new images, with the bank's own settings:

- **against the bank** (``add=False``): each new patch is compared with the bank's patches
  only, M = the saved bank (the new image is never its own neighbour, nor another new one's);
- **added to the bank** (``add=True``): blind on the union, M = the saved bank + every new
  patch, with the run's exclusions (a patch is not its own neighbour; ``image``: nor its
  image's), so a batch whose images share one defect still has normal neighbours in the bank.

The union is laid out new images first, so a new patch's index is the same in the batch and in
the union (the exclusions compare them). Methods: those that read the memory bank, PatchCluster
(Eq. 2 over the bank), PatchCore and mutual scoring (per-image minima over the bank's images);
LNAMD averages the sizes as a run does; RsCIN smooths over the new batch.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from patchlab.atomic import atomic_folder
from patchlab.backbones import weights_identity
from patchlab.bank import MemoryBank, neighbour_table
from patchlab.cache import FEATURE_VERSION, cache_folder, check_cache_folder, feature_key
from patchlab.config import RunConfig
from patchlab.data import ImageSet, load_paths
from patchlab.experiment import Result, feature_options, feature_settings, rescore
from patchlab.features import extract_features
from patchlab.hashing import file_digest
from patchlab.images import load_masks
from patchlab.methods import ScoringInputs, get_method

FORMAT = 1  # bump when the folder's layout changes: older banks are then refused by name
SCORABLE = ("patchcluster", "patchcore", "mutual")  # the methods that read the memory bank
FEATURE_FIELDS = ("backbone", "weights", "seed", "resize", "crop", "local_sizes")


@dataclass(frozen=True)
class SavedBank:
    """A memory bank read from disk (:func:`load_bank`).

    Attributes
    ----------
    config : RunConfig
        The settings of the run that saved it (features, method, K, image score...).
    features : dict {r: torch.Tensor (n_s, h, w, d) float32}
        Patch features of the bank's images at each locally aware size r.
    rows : dict {r: torch.Tensor (m_r,) int64, or None}
        The coreset of each size (each size picks its own): the patches (flattened,
        image-major) that form the bank; None where every patch does.
    global_features : torch.Tensor (n_s, c), or None
    image_scores : np.ndarray (n_s,)
        The scores the run gave its images.
    names : list of str
        The bank's images, as paths when saved.
    weights_identity : str
        :func:`patchlab.backbones.weights_identity` of the weights the features came from.
    digest : str
        A hash of the saved features: names the bank in the neighbour cache.
    """

    config: RunConfig
    features: dict[int, torch.Tensor]
    rows: dict[int, torch.Tensor | None]
    global_features: torch.Tensor | None
    image_scores: np.ndarray
    names: list[str]
    weights_identity: str
    digest: str

    def __len__(self) -> int:
        return len(self.names)


def save_bank(result: Result, folder: str | Path) -> Path:
    """Write ``result``'s memory bank into ``folder`` as one set (``bank.json`` and
    ``features.npz``, put in place whole: a kill leaves the old bank or the new one)."""
    inputs, config = result.inputs, result.config
    check_savable(config)
    sizes = (inputs, *inputs.others)
    features = {x.local: x.features.cpu() for x in sizes}
    rows = {x.local: None if x.bank is None else x.bank.rows for x in sizes}
    names = [str(p) for p in result.images.paths]
    identity = weights_identity(config.backbone, config.weights, config.seed)
    glob = inputs.global_features
    return _write(folder, config, identity, features, rows, glob, result.image_scores, names)


def grow_bank(bank: SavedBank, result: Result, folder: str | Path) -> Path:
    """Write ``bank`` grown by the new images ``result`` scored with ``add=True`` (their
    every patch joins; the bank's images first, then the new ones)."""
    inputs = result.inputs
    new = {x.local: x.features.cpu() for x in (inputs, *inputs.others)}
    features = {r: torch.cat([bank.features[r], new[r]]) for r in bank.features}
    rows = {}
    for r, kept in bank.rows.items():  # the saved coreset, and every new patch
        first = bank.features[r][..., 0].numel()
        joined = first + torch.arange(new[r][..., 0].numel())
        rows[r] = None if kept is None else torch.cat([kept, joined])
    glob = bank.global_features
    if glob is not None:
        glob = torch.cat([glob, inputs.global_features.cpu()])
    scores = np.concatenate([bank.image_scores, result.image_scores])
    names = [*bank.names, *(str(p) for p in result.images.paths)]
    # the weights as given now (a file may have moved), their identity the bank's (checked)
    config = replace(bank.config, weights=result.config.weights, k=result.config.k)
    config = replace(config, k_max=result.config.k_max)
    return _write(folder, config, bank.weights_identity, features, rows, glob, scores, names)


def check_savable(config: RunConfig) -> None:
    """An error before any work when a run's bank cannot score new images."""
    if config.method not in SCORABLE:
        raise ValueError(
            f"--save-bank: method {config.method!r} does not score against a memory bank; "
            f"use one of {', '.join(SCORABLE)}"
        )
    if config.bank_setting is not None:
        raise ValueError("--save-bank saves a blind run's bank; drop --bank-setting")


def _write(folder, config, identity, features, rows, glob, scores, names) -> Path:
    first = next(iter(features.values()))
    arrays = {f"size{r}": x.numpy() for r, x in features.items()}
    arrays |= {f"rows{r}": x.cpu().numpy() for r, x in rows.items() if x is not None}
    arrays["image_scores"] = np.asarray(scores, np.float64)
    if glob is not None:
        arrays["global"] = glob.cpu().numpy()
    meta = {
        "format": FORMAT,
        "feature_version": FEATURE_VERSION,
        "config": config.to_dict(),
        "weights_identity": identity,
        "grid": list(first.shape[1:3]),
        "feature_dim": int(first.shape[-1]),
        "names": names,
    }
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(folder) as tmp:
        np.savez(tmp / "features.npz", **arrays)
        (tmp / "bank.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def load_bank(folder: str | Path) -> SavedBank:
    """A bank saved by :func:`save_bank` (``patchlab run --save-bank``), checked whole.

    Raises
    ------
    ValueError
        Naming the file and what is wrong with it (missing, another format, damaged).
    """
    folder = Path(folder)
    if (folder / "bank").is_dir() and not (folder / "bank.json").exists():
        folder = folder / "bank"  # the run folder was given
    meta_path, arrays_path = folder / "bank.json", folder / "features.npz"
    redo = "save it again with patchlab run --save-bank"
    if not meta_path.is_file() or not arrays_path.is_file():
        raise ValueError(f"{folder} holds no saved bank (bank.json and features.npz); {redo}")
    try:
        meta = json.loads(meta_path.read_text())
        version = (meta.get("format"), meta.get("feature_version"))
    except Exception as err:  # not JSON, or not an object
        raise ValueError(f"{meta_path} is damaged ({type(err).__name__}: {err}); {redo}") from None
    if version != (FORMAT, FEATURE_VERSION):
        raise ValueError(
            f"{meta_path} is a bank of format {version[0]} / features v{version[1]}; this "
            f"patchlab reads format {FORMAT} / v{FEATURE_VERSION}: {redo}"
        )
    try:
        config = _config(meta["config"])
        names, identity = [str(n) for n in meta["names"]], str(meta["weights_identity"])
        grid, dim = tuple(int(x) for x in meta["grid"]), int(meta["feature_dim"])
        with np.load(arrays_path) as z:
            arrays = {name: z[name] for name in z.files}
    except Exception as err:  # JSON fields, zip, key and value errors: a damaged bank
        raise ValueError(
            f"the saved bank {folder} is damaged ({type(err).__name__}: {err}); {redo}"
        ) from None
    shape = (len(names), *grid, dim)
    features = {
        r: torch.from_numpy(arrays.get(f"size{r}", np.empty(0))) for r in config.local_sizes
    }
    rows = {r: arrays.get(f"rows{r}") for r in config.local_sizes}
    problems = _problems(shape, features, rows, arrays)
    if problems:
        raise ValueError(f"the saved bank {folder} is damaged ({'; '.join(problems)}); {redo}")
    rows = {r: None if x is None else torch.from_numpy(x.astype(np.int64)) for r, x in rows.items()}
    glob = torch.from_numpy(arrays["global"]) if "global" in arrays else None
    digest = file_digest(arrays_path, "sha256")[:16]
    return SavedBank(config, features, rows, glob, arrays["image_scores"], names, identity, digest)


def _config(saved: dict) -> RunConfig:
    """The saved settings as a RunConfig (JSON turned its tuples into lists)."""
    return RunConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})


def _problems(shape: tuple, features: dict, rows: dict, arrays: dict) -> list[str]:
    """What does not fit in the saved arrays (an empty list when they are whole)."""
    problems = []
    for r, x in features.items():
        if tuple(x.shape) != shape:
            problems.append(f"size{r} is {tuple(x.shape)}, not {shape}")
        elif not bool(torch.isfinite(x).all()):
            problems.append(f"size{r} holds NaN or inf values")
    for r, x in rows.items():
        n_patches = shape[0] * shape[1] * shape[2]
        if x is not None and (x.ndim != 1 or not len(x) or x.min() < 0 or x.max() >= n_patches):
            problems.append(f"rows{r} do not index its {n_patches} patches")
    if len(arrays.get("image_scores", ())) != shape[0]:
        problems.append(f"image_scores does not hold {shape[0]} scores")
    return problems


def score_images(
    bank: SavedBank,
    images: ImageSet,
    *,
    k: int | None = None,
    add: bool = False,
    expect: dict | None = None,
    cache_dir: str | None = None,
    category: str | None = None,
    progress: bool = True,
) -> Result:
    """Score new images against a saved bank, with the bank's settings (see the module).

    Parameters
    ----------
    bank : SavedBank, from :func:`load_bank`
    images : ImageSet
        The new images (:func:`patchlab.data.load_folder`; :func:`patchlab.data.load_mvtec`
        for labelled ones: metrics are then computed).
    k : K of Eq. 2 (default: the run's).
    add : score blind on the bank plus the new images (see the module).
    expect : feature settings the caller asks for (``backbone``, ``weights``, ``seed``,
        ``resize``, ``crop``, ``local_sizes``): refused where they differ from the bank's,
        except ``weights``, a path to the same weights (moved): its identity must match.
    cache_dir : the feature and neighbour cache (default: ``$PATCHLAB_CACHE``, else
        ``~/.cache/patchlab``: the run's may lie on another machine).
    category : the MVTec category of labelled images (for the outputs' records).

    Returns
    -------
    Result
        Of the new images only; ``result.inputs.bank`` is the bank they were scored against.
    """
    config = _config_for(bank, images, k, expect or {}, cache_dir, category)
    check_cache_folder(cache_folder(config.cache_dir))  # before the work, not after
    seen = sorted(set(map(str, images.paths)) & set(bank.names))
    if seen:
        warnings.warn(
            f"{len(seen)} of the new images are in the bank (e.g. {seen[0]}): each finds its "
            "own patches there and scores near 0; score images the bank has not seen",
            stacklevel=2,
        )
    glob = None
    if bank.global_features is not None:
        glob = extract_features(images, kind="global", **feature_options(config, progress))
    sizes = [_size_inputs(bank, images, config, r, add, glob, progress) for r in config.local_sizes]
    inputs = replace(sizes[0], others=tuple(sizes[1:]))
    masks = load_masks(images, config.resize, config.crop)
    return rescore(config, images, inputs, masks, progress=progress)


def score_arrays(
    bank: SavedBank, arrays: np.ndarray | torch.Tensor, folder: str | Path | None = None, **kw
) -> Result:
    """Score images given as arrays (a camera's frames, a notebook's tensors) against ``bank``.

    Parameters
    ----------
    arrays : (n, H, W, 3) or (n, H, W) uint8, or float in [0, 1]; a torch tensor may also be
        (n, 3, H, W) or (n, 1, H, W), as torchvision lays images out.
    folder : where they are written as PNG files (lossless): ``000000.png``, ... Default: a
        new temporary folder, kept, since the result's figures and report read the images
        from it. They are then scored as files (:func:`score_images`, whose keyword
        arguments ``kw`` are): the same preprocessing, and the same cache, as any image.
    """
    from PIL import Image

    frames = arrays.detach().cpu().numpy() if isinstance(arrays, torch.Tensor) else arrays
    frames = np.asarray(frames)
    if isinstance(arrays, torch.Tensor) and frames.ndim == 4 and frames.shape[1] in (1, 3):
        frames = frames.transpose(0, 2, 3, 1)  # (n, C, H, W) -> (n, H, W, C)
    if frames.ndim == 4 and frames.shape[-1] == 1:
        frames = frames[..., 0]
    if frames.ndim not in (3, 4) or (frames.ndim == 4 and frames.shape[-1] != 3) or not len(frames):
        raise ValueError(
            f"arrays must be images (n, H, W, 3), (n, H, W) or, as a tensor, (n, 3, H, W); "
            f"got shape {tuple(np.shape(arrays))}"
        )
    if frames.dtype != np.uint8:  # floats in [0, 1]
        frames = np.clip(np.round(frames.astype(np.float64) * 255), 0, 255).astype(np.uint8)
    folder = Path(folder or tempfile.mkdtemp(prefix="patchlab-batch-"))
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{j:06d}.png" for j in range(len(frames))]
    for path, frame in zip(paths, frames, strict=True):
        Image.fromarray(frame).save(path)
    return score_images(bank, load_paths(paths), **kw)


def _config_for(bank: SavedBank, images: ImageSet, k, expect, cache_dir, category) -> RunConfig:
    """The bank's settings for the new images, or an error naming what does not match."""
    config = bank.config
    for name, value in expect.items():
        if name != "weights" and value is not None and value != getattr(config, name):
            raise ValueError(
                f"the bank was saved with {name}={getattr(config, name)!r}, not {value!r}: new "
                "images are scored with the bank's features and preprocessing (drop the option)"
            )
    weights = expect.get("weights") or config.weights
    now = weights_identity(config.backbone, weights, config.seed)  # a missing file is named
    if now != bank.weights_identity:
        raise ValueError(
            f"the bank was saved with {config.backbone} weights {bank.weights_identity}, but "
            f"--weights {weights} are {now}; pass --weights with the file it was saved with"
        )
    k = config.k if k is None else k
    return replace(
        config,
        data=str(images.paths[0].parent),
        category=category if images.has_labels else None,
        unlabeled=not images.has_labels,
        bank_setting=None,
        k=k,
        k_max=None if config.k_max is None else max(config.k_max, k),
        weights=weights,
        cache_dir=cache_dir,
        scheduler=None,
    )


def _size_inputs(bank, images, config, r, add, glob, progress) -> ScoringInputs:
    """The new images' features at size r and the bank they are scored against."""
    sized = replace(config, local_sizes=(r,))
    new = extract_features(images, **feature_options(sized, progress))
    saved = bank.features[r].to(new.device)
    key = feature_key(images.paths, **feature_settings(sized))
    n_new = new[..., 0].numel()
    if add:  # the union, new images first: a new patch keeps its index
        source = torch.cat([new, saved])
        kept = bank.rows[r]
        old = torch.arange(saved[..., 0].numel()) if kept is None else kept
        rows = torch.cat([torch.arange(n_new), n_new + old])
        memory = MemoryBank(source, rows, blind=True, key=f"{bank.digest}+{key}")
    else:
        memory = MemoryBank(saved, bank.rows[r], blind=False, key=bank.digest)
    table = None
    if get_method(config.method).uses_table:  # mutual reads the bank's images instead
        table = neighbour_table(new, key, memory, sized, progress)
    return ScoringInputs(new, table, memory, glob, local=r)
