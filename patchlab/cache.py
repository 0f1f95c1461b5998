"""The on-disk cache of expensive results: features, coreset picks, neighbour tables.

Every entry is named by a hash of everything that changes its content, and written atomically
(a temporary file in the same folder, then a rename), so an interrupted run never leaves a
half-written entry behind:

    features-<key>.npy, global-<key>.npy       key: the image files (path, content hash), the
                                               backbone and its weights, the preprocessing
    coreset-<key>-m<M>.npy                     key: the features, seed, projection, device;
                                               the first M greedy picks (any shorter prefix
                                               is read from it)
    neighbours-<key>-k<K>.npz                  key: the query and bank features, exclusion,
                                               bank rows, kNN version; K columns (any narrower
                                               table is read from it)

Greedy picks and neighbour tables are *prefix-complete*: the first m picks and the first k
columns are the same whatever longer run produced them, so :func:`find_prefix` returns the
shortest cached entry that is long enough, and the caller slices it. Entries are checked when
read (:func:`read_entry`): a broken one is removed, with a warning, and recomputed; the
temporary files of killed writes are removed (:func:`remove_orphans`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from patchlab.atomic import TMP_SUFFIX, atomic_file, writable
from patchlab.backbones import get_backbone, weights_identity
from patchlab.hashing import file_digest

T = TypeVar("T")

FEATURE_VERSION = 4  # bump whenever the features computed for the same settings change
_STARTED = time.time()  # temporary files older than this process belong to killed runs


def default_cache_dir() -> Path:
    """``$PATCHLAB_CACHE`` if set, else ``~/.cache/patchlab``."""
    return Path(os.environ.get("PATCHLAB_CACHE", Path.home() / ".cache" / "patchlab"))


def cache_folder(cache_dir: str | Path | None) -> Path:
    """``cache_dir``, or the default one when None."""
    return Path(cache_dir) if cache_dir is not None else default_cache_dir()


def check_cache_folder(folder: Path) -> Path:
    """``folder`` once it is known to be a writable folder (created if missing): checked before
    any work, so that a bad cache fails in a second, not after the feature extraction.

    Raises
    ------
    ValueError
        Naming the cache folder, why, and what to do.
    """
    err = writable(folder)
    if err is not None:
        raise ValueError(
            f"the cache folder {folder} cannot be used ({err.strerror or err}); pass --cache-dir "
            "(or set $PATCHLAB_CACHE) to a writable folder"
        ) from err
    return folder


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is CUDA when available, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cache_key(record: dict) -> str:
    """A short stable hash of a JSON-serialisable record."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:24]


def feature_key(
    paths,
    *,
    backbone: str,
    weights: str | Path,
    seed: int,
    resize: int,
    crop: int | None,
    local: int = 3,
) -> str:
    """Hash of everything that changes the features of the images at ``paths``: the files
    (path and a hash of their bytes, so an edit that keeps the size and modification time is
    seen), the backbone (name, taps, width, input normalisation, weights) and the
    preprocessing, and the locally aware neighbourhood size ``local`` (recorded only when it is
    not the default 3, so that the keys of default features stay what they were)."""
    files = [(str(Path(p).resolve()), file_digest(p)) for p in paths]
    spec = get_backbone(backbone)
    record = {
        "version": FEATURE_VERSION,
        "backbone": backbone,
        "taps": spec.tap_names,
        "dim": spec.dim,
        "normalisation": [spec.mean, spec.std],
        "weights": weights_identity(backbone, weights, seed),
        "seed": seed,
        "resize": resize,
        "crop": crop,
        "files": files,
    }
    if local != 3:
        record["local"] = local
    return cache_key(record)


def rows_id(rows: torch.Tensor | None) -> str:
    """A short name of a set of bank rows (a coreset), or ``"all"``."""
    return "all" if rows is None else hashlib.sha256(rows.numpy()).hexdigest()[:16]


def find_prefix(folder: Path, stem: str, tag: str, need: int) -> Path | None:
    """The cached ``<stem>-<tag><n>.*`` with the smallest n >= ``need``, or None.

    For prefix-complete entries (greedy picks, neighbour tables): the caller reads the first
    ``need`` of it.
    """

    def length(path: Path) -> int:
        return int(path.name[len(stem) + 1 + len(tag) :].split(".")[0])

    found = sorted(
        (p for p in folder.glob(f"{stem}-{tag}*") if not p.name.endswith(TMP_SUFFIX)), key=length
    )
    return next((p for p in found if length(p) >= need), None)


def read_through(
    folder: Path,
    stem: str,
    load: Callable[[Path], T],
    check: Callable[[T], bool],
    compute: Callable[[], T],
    save: Callable[[Path, T], None],
    grows: tuple[str, int] | None = None,
) -> T:
    """The cache's one loop: look the entry up, read it, check it; else compute and save it.

    The entry is ``folder/<stem><suffix>`` (``.npz`` for neighbour tables, ``.npy`` for the
    rest). A prefix-complete entry (greedy picks, neighbour tables) ``grows``: with ``(tag,
    need)`` any cached ``<stem>-<tag><n>`` with n >= need serves (``load`` cuts it to
    ``need``), and a computed one is saved as ``<stem>-<tag><need>``. A broken entry is
    removed with a warning (:func:`read_entry`) and the next candidate tried.
    """
    suffix = ".npz" if stem.startswith("neighbours-") else ".npy"
    if grows is None:
        candidates = iter([folder / f"{stem}{suffix}"])
        name = f"{stem}{suffix}"
    else:
        tag, need = grows
        candidates = iter(lambda: find_prefix(folder, stem, tag, need), None)
        name = f"{stem}-{tag}{need}{suffix}"
    for path in candidates:
        value = read_entry(path, load, check)
        if value is not None:
            return value
    value = compute()
    save(folder / name, value)
    return value


def feature_stem(kind: str, key: str) -> str:
    """Name of the patch (``kind="patch"``) or global features of the images named ``key``."""
    return f"{'features' if kind == 'patch' else 'global'}-{key}"


def read_entry(path: Path, load, check=lambda value: True):
    """A cached entry read with ``load(path)``, or None when it is missing or broken.

    A broken entry (truncated, empty, corrupt, or failing ``check``) is removed with a warning
    naming it, so that the caller recomputes it.
    """
    if path is None or not path.is_file():
        return None
    try:
        value = load(path)
        if check(value):
            return value
        reason = "its contents do not match what was asked for"
    except Exception as err:  # numpy, zipfile and OS errors all mean the same here
        reason = f"{type(err).__name__}: {err}"
    warnings.warn(
        f"cache entry {path} is broken ({reason}); it is removed and recomputed", stacklevel=3
    )
    path.unlink(missing_ok=True)
    return None


def remove_orphans(folder: Path, older_than_s: float = 600.0) -> int:
    """Remove the temporary files that killed writes left in the cache (``*.tmp`` not touched
    for ``older_than_s`` seconds and older than this process); returns how many."""
    if not folder.is_dir():
        return 0
    limit = min(time.time() - older_than_s, _STARTED)
    removed = 0
    for tmp in folder.glob(f"*{TMP_SUFFIX}"):
        try:
            if tmp.stat().st_mtime < limit:
                tmp.unlink()
                removed += 1
        except FileNotFoundError:  # another process finished or removed it
            continue
    return removed


def atomic_save(path: Path, **arrays: np.ndarray) -> None:
    """Write one array (``.npy``) or several (``.npz``) as one atomic file
    (:func:`patchlab.atomic.atomic_file`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_file(path) as f:
            if path.suffix == ".npy":
                (array,) = arrays.values()
                np.save(f, array)
            else:
                np.savez(f, **arrays)
    except OSError as err:
        raise OSError(
            f"cannot write the cache file {path} ({err.strerror or err}); free space there, "
            "or pass --cache-dir (or set $PATCHLAB_CACHE) to another folder"
        ) from err


def coreset_stem(key: str, seed: int, device: torch.device) -> str:
    """Name of the greedy picks of the features named ``key`` (followed by ``-m<M>``)."""
    from patchlab.coreset import CORESET_VERSION, N_STARTS, PROJECTION_DIM

    record = {
        "f": key,
        "seed": seed,
        "starts": N_STARTS,
        "dim": PROJECTION_DIM,
        "version": CORESET_VERSION,
        "device": device.type,  # CPU and CUDA round apart
    }
    return f"coreset-{cache_key(record)}"


def neighbour_stem(
    key: str, exclude: str, rows: torch.Tensor | None, bank_key: str | None = None
) -> str:
    """Name of the neighbour table of the features named ``key`` against a bank (followed by
    ``-k<K>``): the bank is ``rows`` (a coreset, or all) of the same features, or of the
    features named ``bank_key`` (one-class)."""
    from patchlab.knn import KNN_VERSION

    bank = "" if bank_key is None else f"bank{bank_key}-"
    return f"neighbours-{key}-{bank}{exclude}-{rows_id(rows)}-v{KNN_VERSION}"
