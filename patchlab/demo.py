"""Offline demo data set in MVTec AD layout, generated deterministically from a seed.

Texture categories are random crops of the real photographs that ship with scikit-image
(``skimage.data.brick``, ``gravel``, ``grass``); ``washer`` is a procedural tab washer under random
rotation and translation. Defective images carry one painted defect each; its mask is exactly the
region the defect is painted in, so every pixel outside the mask is untouched.

:func:`run_demo` is ``patchlab demo``: PatchCluster against PatchCore on every category, with
:data:`DEMO_DEFAULTS`.
"""

from __future__ import annotations

import json
import operator
import os
import shutil
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from patchlab.config import PAPER_SETTINGS, RunConfig

DEMO_CATEGORIES: tuple[str, ...] = ("brick", "gravel", "grass", "washer")
DEFECT_TYPES: tuple[str, ...] = ("scratch", "hole", "stain")
_FOREIGN = {"brick": "grass", "gravel": "brick", "grass": "gravel", "washer": "gravel"}
_CROP = 256  # side, in source pixels, of the crop cut from a 512x512 photograph
_FORMAT = 3  # bump whenever the generator's output changes: older folders are then regenerated
# the demo shows the paper's claim, PatchCluster against PatchCore, as the paper runs them
# (under a minute from nothing on 2 cores); `patchlab run`'s defaults are the measured best
DEMO_DEFAULTS = {k: v for k, v in PAPER_SETTINGS.items() if k != "method"}
DEMO_SETS = ("category", "bank_setting", "unlabeled", "method")  # what run_demo sets itself


def run_demo(
    config: RunConfig,
    data: str | Path | None = None,
    categories: Sequence[str] = DEMO_CATEGORIES,
    progress: bool = True,
) -> list[tuple[str, dict]]:
    """``patchlab demo``: the demo data (written if absent, at :func:`demo_path`), then
    PatchCluster (one run) and PatchCore (a re-score of the same table) on each category.

    Returns
    -------
    [(row name, metrics)], two rows per category: ``"brick patchcluster K=25"``,
    ``"brick patchcore"``.
    """
    from dataclasses import replace

    from patchlab.experiment import rescore, run

    root = make_demo_data(demo_path(data), categories=categories)
    print(f"demo data: {root} (categories {', '.join(categories)})")
    rows = []
    for category in categories:
        cluster = replace(config, data=str(root), category=category, method="patchcluster")
        first = run(cluster, progress=progress)
        rows.append((f"{category} patchcluster K={cluster.k}", first.metrics))
        core = rescore(
            replace(cluster, method="patchcore"), first.images, first.inputs, first.masks
        )
        rows.append((f"{category} patchcore", core.metrics))
    return rows


def demo_path(root: str | Path | None = None) -> Path:
    """Where the demo data lives.

    Parameters
    ----------
    root : an explicit location; returned as given (``~`` expanded).

    Returns
    -------
    ``root`` if given, else ``$PATCHLAB_DEMO`` if set, else ``<repo>/data/demo`` in a source
    checkout (a ``pyproject.toml`` beside the package folder), else ``~/.cache/patchlab/demo``.
    """
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get("PATCHLAB_DEMO"):
        return Path(os.environ["PATCHLAB_DEMO"]).expanduser()
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").is_file():
        return repo / "data" / "demo"
    return Path.home() / ".cache" / "patchlab" / "demo"


@cache
def _photo(name: str) -> np.ndarray:
    """The scikit-image photograph ``name`` as float32, shape (512, 512), values 0..255."""
    from skimage import data as skdata

    return getattr(skdata, name)().astype(np.float32)


def _texture(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A random crop of photograph ``name`` (offset, flip, 90-degree turn, brightness jitter).

    Returns float32, shape (size, size).
    """
    photo = _photo(name)
    y, x = rng.integers(0, photo.shape[0] - _CROP + 1, size=2)
    crop = np.rot90(photo[y : y + _CROP, x : x + _CROP], k=int(rng.integers(4)))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if size != _CROP:
        crop = np.asarray(
            Image.fromarray(np.ascontiguousarray(crop)).resize(
                (size, size), Image.Resampling.BILINEAR
            )
        )
    return crop * rng.uniform(0.9, 1.1) + rng.uniform(-8.0, 8.0)


def _washer(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A shaded tab washer on a mottled background, randomly turned and shifted.

    Returns the image, float32 (size, size, 3), and the object's coverage, float32 (size, size).
    """
    s = size / 256
    cy, cx = size / 2 + rng.uniform(-20, 20, size=2) * s
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    u, v = dx * np.cos(theta) + dy * np.sin(theta), dy * np.cos(theta) - dx * np.sin(theta)
    rho, big, small = np.hypot(dx, dy), 0.30 * size, 0.11 * size
    ring = np.clip(big - rho + 0.5, 0, 1) * np.clip(rho - small + 0.5, 0, 1)
    tab = (
        np.clip(0.07 * size - np.abs(v) + 0.5, 0, 1)
        * np.clip(u - 0.8 * big + 0.5, 0, 1)
        * np.clip(big + 0.14 * size - u + 0.5, 0, 1)
    )
    cover = np.maximum(ring, tab)
    light = -(dx + dy) / (np.sqrt(2) * big)  # fixed light from the upper left
    grain = ndimage.gaussian_filter(rng.normal(size=(size, size)), 0.8 * s)
    metal = (
        160
        + 30 * light
        + 10 * np.sin(rho * 2 * np.pi / (5 * s))
        + 25 * grain
        + 40 * np.exp(-(((rho - big + 2 * s) / (2 * s)) ** 2))
        + 30 * np.exp(-(((rho - small - 2 * s) / (2 * s)) ** 2))
    )
    coarse = Image.fromarray(rng.normal(size=(12, 12)).astype(np.float32))
    mottle = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC))
    shadow = ndimage.gaussian_filter(np.roll(cover, (int(6 * s), int(6 * s)), axis=(0, 1)), 3 * s)
    back = (70 + 10 * mottle + 6 * rng.normal(size=(size, size))) * (1 - 0.5 * shadow)
    img = (
        back[..., None] * np.array([1.0, 0.95, 0.85]) * (1 - cover[..., None])
        + metal[..., None] * np.array([0.96, 0.99, 1.04]) * cover[..., None]
    )
    return img.astype(np.float32), cover


def _normal(category: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A defect-free image, float32 (size, size, 3), and where defects may go, bool (size, size)."""
    if category == "washer":
        img, cover = _washer(rng, size)
        return img, cover > 0.99
    img = np.repeat(_texture(category, rng, size)[..., None], 3, axis=2)
    return img, np.ones((size, size), dtype=bool)


def _blob(rng: np.random.Generator, size: int, centre: np.ndarray, radius: float) -> np.ndarray:
    """An irregular blob (noisy ellipse, largest connected part) near ``centre``.

    Returns bool, shape (size, size).
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    phi, ratio = rng.uniform(0, np.pi), rng.uniform(0.6, 1.0)
    dy, dx = yy - centre[0], xx - centre[1]
    a, b = dx * np.cos(phi) + dy * np.sin(phi), dy * np.cos(phi) - dx * np.sin(phi)
    wobble = ndimage.gaussian_filter(rng.normal(size=(size, size)), radius / 3) * radius / 4
    labels, n = ndimage.label(np.hypot(a, b / ratio) / radius + wobble < 1)
    if n == 0:
        return labels > 0
    return labels == 1 + np.argmax(np.bincount(labels.ravel())[1:])


def _scratch(rng: np.random.Generator, size: int, centre: np.ndarray) -> np.ndarray:
    """A curved line (quadratic Bezier, 5-8 px wide) through ``centre``; bool (size, size)."""
    s = size / 256
    length, phi = rng.uniform(0.4, 0.7) * size, rng.uniform(0, 2 * np.pi)
    start = centre - length / 2 * np.array([np.sin(phi), np.cos(phi)])
    end = 2 * centre - start
    normal = np.array([np.cos(phi), -np.sin(phi)])
    ctrl = (start + end) / 2 + rng.uniform(-0.3, 0.3) * length * normal
    t = np.linspace(0, 1, int(3 * length) + 2)[:, None]
    pts = np.rint((1 - t) ** 2 * start + 2 * t * (1 - t) * ctrl + t**2 * end).astype(int)
    pts = pts[((pts >= 0) & (pts < size)).all(axis=1)]
    line = np.zeros((size, size), dtype=bool)
    line[pts[:, 0], pts[:, 1]] = True
    width = max(2, round(int(rng.integers(5, 9)) * s))
    return ndimage.binary_dilation(line, structure=np.ones((width, width), dtype=bool))


def _add_defect(
    img: np.ndarray, region: np.ndarray, kind: str, rng: np.random.Generator, foreign: str
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect of ``kind`` inside ``region``.

    Defects are strong in brightness, as real ones on these surfaces are: a scratch is a bright
    streak (a dark one on bright metal), a hole is near black, a stain is dark rust brown with
    the surface's (and photograph ``foreign``'s) texture showing through. They lie inside the
    central 224x224 crop the pipeline sees, their centres at least 30 px (at size 256) from its
    border, so the crop never cuts most of a defect away.

    Returns the defective image, float32 (H, W, 3), and its mask, bool (H, W): exactly the
    painted pixels. Redraws (deterministically) until the mask covers at least 0.5 % of the image.
    """
    size, s = img.shape[0], img.shape[0] / 256
    inside = np.zeros((size, size), dtype=bool)  # the centre crop, less a 4 px margin
    lo = int(round(20 * s))
    inside[lo : size - lo, lo : size - lo] = True
    middle = np.zeros((size, size), dtype=bool)  # where centres go
    lo = int(round(46 * s))
    middle[lo : size - lo, lo : size - lo] = True
    region = region & inside
    inner = ndimage.binary_erosion(region, iterations=max(1, int(12 * s)), border_value=0)
    for allowed in (inner & middle, region & middle, region):
        if allowed.any():
            break
    candidates = np.argwhere(allowed)
    mask = np.zeros((size, size), dtype=bool)
    while mask.sum() < 0.005 * size * size:
        centre = candidates[rng.integers(len(candidates))].astype(np.float64)
        if kind == "scratch":
            mask = _scratch(rng, size, centre) & region
        elif kind == "hole":
            mask = _blob(rng, size, centre, rng.uniform(17, 25) * s) & region
        else:
            mask = _blob(rng, size, centre, rng.uniform(22, 30) * s) & region
    out = img.copy()
    n = int(mask.sum())
    if kind == "scratch":
        level = 15.0 if img[mask].mean() > 150 else 245.0
        out[mask] = level + rng.normal(0, 4, size=(n, 1))
    elif kind == "hole":
        depth = ndimage.distance_transform_edt(mask)[mask] / max(1.0, 4 * s)
        out[mask] = (30 - 22 * np.clip(depth, 0, 1))[:, None]
    else:
        texture = 0.75 * img[mask].mean(axis=1) + 0.25 * _texture(foreign, rng, size)[mask]
        shade = 0.4 + 0.6 * np.clip(texture / 255, 0, 1)
        out[mask] = shade[:, None] * np.array([130.0, 48.0, 10.0])
    return out, mask


def _save(path: Path, arr: np.ndarray) -> None:
    """Write ``arr`` (H, W) or (H, W, 3), any float range, as an 8-bit PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8)).save(path, compress_level=1)


def _files(counts: dict[str, int]) -> list[str]:
    """Relative paths of every file a complete category folder holds."""
    names = [f"{split}/{i:03d}.png" for split, n in counts.items() for i in range(n)]
    return names + [
        f"ground_truth/{split[5:]}/{i:03d}_mask.png"
        for split, n in counts.items()
        if split.startswith("test/") and split != "test/good"
        for i in range(n)
    ]


def _read_meta(path: Path) -> dict:
    """The JSON object in ``path``, or ``{}`` when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def make_demo_data(
    out: str | Path,
    *,
    categories: Sequence[str] | None = None,
    seed: int = 0,
    n_train: int = 40,
    n_test_good: int = 20,
    n_defective: int = 20,
    size: int = 256,
    overwrite: bool = False,
) -> Path:
    """Write the demo data set in MVTec AD layout.

    Parameters
    ----------
    out : folder to write; one subfolder per category.
    categories : names from ``DEMO_CATEGORIES``; all of them when None.
    seed : non-negative; image ``i`` of each folder depends only on (seed, category, folder, i),
        so smaller counts give a prefix of the larger set.
    n_train, n_test_good : good images in ``train/good`` and ``test/good``.
    n_defective : defective test images, split round-robin over ``DEFECT_TYPES``.
    size : side of every image and mask, in pixels (at least 32).
    overwrite : regenerate categories that are already complete.

    Returns
    -------
    Path(out), holding per category ``train/good/000.png``, ``test/good/000.png``,
    ``test/<defect>/000.png`` (RGB, size x size), ``ground_truth/<defect>/000_mask.png``
    (uint8 0/255, size x size) and ``meta.json`` (seed, size, counts). A category whose
    ``meta.json`` matches the request is skipped; one written for another request is rewritten; a
    non-empty folder not written here raises ``FileExistsError`` unless ``overwrite``.
    """
    categories = [categories] if isinstance(categories, str) else categories
    names = list(DEMO_CATEGORIES if categories is None else dict.fromkeys(categories))
    bad = [c for c in names if c not in DEMO_CATEGORIES]
    if bad or not names:
        raise ValueError(f"unknown demo category {bad or names!r}; valid: {DEMO_CATEGORIES}")
    limits = {
        "n_train": (n_train, 1),
        "n_test_good": (n_test_good, 1),
        "n_defective": (n_defective, 1),
        "size": (size, 32),
        "seed": (seed, 0),
    }
    for arg, (value, least) in limits.items():
        if operator.index(value) < least:
            raise ValueError(f"{arg} must be at least {least}, got {arg}={value}")
    seed, size = int(seed), int(size)
    root = Path(out)
    for category in names:
        counts = {"train/good": int(n_train), "test/good": int(n_test_good)}
        counts |= {
            f"test/{d}": len(range(k, n_defective, len(DEFECT_TYPES)))
            for k, d in enumerate(DEFECT_TYPES)
        }
        _write_category(root / category, category, counts, seed, size, overwrite)
    return root


def _write_category(
    folder: Path, category: str, counts: dict[str, int], seed: int, size: int, overwrite: bool
) -> None:
    """One category's images, masks and ``meta.json``, unless already complete."""
    meta = {
        "generator": "patchlab.demo",
        "format": _FORMAT,
        "category": category,
        "seed": seed,
        "size": size,
        "counts": counts,
    }
    meta_file = folder / "meta.json"
    old = _read_meta(meta_file)
    if not overwrite and old == {**meta, "complete": True}:
        if all((folder / f).is_file() for f in _files(counts)):
            return
    elif not overwrite and old.get("generator") != meta["generator"] and folder.exists():
        if not folder.is_dir() or any(folder.iterdir()):
            raise FileExistsError(
                f"{folder} exists and was not written by make_demo_data; "
                "pass overwrite=True to replace it"
            )
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    meta_file.write_text(json.dumps({**meta, "complete": False}, indent=1))
    cat = DEMO_CATEGORIES.index(category)
    for split_no, (split, n) in enumerate(counts.items()):
        for i in range(n):
            rng = np.random.default_rng([seed, cat, split_no, i])
            img, region = _normal(category, rng, size)
            if split_no >= 2:
                kind = DEFECT_TYPES[split_no - 2]
                img, mask = _add_defect(img, region, kind, rng, _FOREIGN[category])
                _save(folder / "ground_truth" / kind / f"{i:03d}_mask.png", mask * 255.0)
            _save(folder / split / f"{i:03d}.png", img)
    meta_file.write_text(json.dumps({**meta, "complete": True}, indent=1))
