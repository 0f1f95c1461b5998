"""Image sets: an MVTec AD category under a blind setting, or a plain folder of images.

An :class:`ImageSet` holds paths, labels and mask paths only; pixels are read when needed, by
:mod:`patchlab.images` (images as a viewer shows them, the paper's preprocessing, masks).

Blind settings on an MVTec-layout category (nobody tells the method which image is normal):

========  ===========================================  ===========
setting   images in the set (and in the memory bank)   image AUROC
========  ===========================================  ===========
``mix``   train/good + every test image                yes
``test``  every test image                             yes
``ano``   the defective test images only               no (all defective)
``train`` train/good only (the one-class bank)         no (all good)
========  ===========================================  ===========
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SETTINGS = ("mix", "test", "ano", "train")
BLIND_SETTINGS = SETTINGS[:3]  # the set is the bank: nobody says which image is normal
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
GOOD, DEFECTIVE, UNKNOWN = 0, 1, -1


@dataclass(frozen=True)
class ImageSet:
    """A list of images with what is known about them.

    Attributes
    ----------
    paths : tuple of Path, length n
        Image files, in a fixed (sorted) order.
    labels : np.ndarray, shape (n,), int8
        1 defective, 0 good, -1 unknown (an unlabelled folder).
    mask_paths : tuple of (Path or None), length n
        Ground-truth mask of each defective image; None for good or unlabelled images.
    defect_types : tuple of str, length n
        The sub-folder name (``"good"``, ``"crack"``, ...); ``""`` when unlabelled.
    name : str
        A short description, e.g. ``"magnetic_tile/test"``.
    """

    paths: tuple[Path, ...]
    labels: np.ndarray
    mask_paths: tuple[Path | None, ...]
    defect_types: tuple[str, ...]
    name: str

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def has_labels(self) -> bool:
        """True when every image is labelled good or defective (metrics can be computed)."""
        return bool(len(self)) and bool((self.labels != UNKNOWN).all())

    def subset(self, index: np.ndarray | list[int]) -> ImageSet:
        """The images at ``index``, in that order."""
        index = [int(i) for i in index]
        return ImageSet(
            tuple(self.paths[i] for i in index),
            self.labels[index],
            tuple(self.mask_paths[i] for i in index),
            tuple(self.defect_types[i] for i in index),
            self.name,
        )


def load_mvtec(root: str | Path, category: str | None = None, setting: str = "test") -> ImageSet:
    """An MVTec AD layout category under a blind setting.

    Parameters
    ----------
    root : str or Path
        The data set folder holding categories (``root/<category>/{train,test,ground_truth}``),
        or a category folder itself when ``category`` is None.
    category : str, optional
        The category's folder name.
    setting : {"mix", "test", "ano", "train"}
        Which images form the set; see the module docstring.

    Returns
    -------
    ImageSet
        Sorted by folder then file name; every defective image has a mask path (checked).
    """
    if setting not in SETTINGS:
        raise ValueError(f"setting={setting!r} is unknown; choose one of {SETTINGS}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist; check the path")
    folder = root if category is None else root / category
    if category is not None and not folder.is_dir():
        found = sorted(p.name for p in root.iterdir() if (p / "test").is_dir())
        raise FileNotFoundError(
            f"category {category!r} not found in {root}; categories there: {found or 'none'}"
        )
    if not (folder / "test").is_dir() and setting != "train":
        found = sorted(p.name for p in folder.iterdir() if (p / "test").is_dir())
        hint = f"pass --category, one of {found}" if found else "is it an MVTec AD category?"
        if not found and _image_files(folder, recursive=True):
            hint = "it holds images: pass --unlabeled to rank a plain folder of images"
        raise FileNotFoundError(f"{folder} has no test/ folder; {hint}")

    parts: list[tuple[Path, str]] = []  # (folder of images, defect type)
    if setting in ("mix", "train"):
        parts.append((folder / "train" / "good", "good"))
    if setting in ("mix", "test", "ano"):
        for sub in sorted(p for p in (folder / "test").iterdir() if p.is_dir()):
            if not (setting == "ano" and sub.name == "good"):
                parts.append((sub, sub.name))

    paths, labels, masks, types = [], [], [], []
    for sub, kind in parts:
        files = _image_files(sub, recursive=False)
        if not files:
            raise FileNotFoundError(f"{sub} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        for path in files:
            mask = None
            if kind != "good":
                mask = folder / "ground_truth" / kind / f"{path.stem}_mask.png"
                if not mask.is_file():
                    raise FileNotFoundError(f"no mask for defective image {path}: expected {mask}")
            paths.append(path)
            labels.append(GOOD if kind == "good" else DEFECTIVE)
            masks.append(mask)
            types.append(kind)
    _check_names([*paths, *(m for m in masks if m is not None)])
    name = f"{folder.name}/{setting}"
    return ImageSet(tuple(paths), np.array(labels, np.int8), tuple(masks), tuple(types), name)


def load_folder(root: str | Path) -> ImageSet:
    """Every image under ``root`` (recursively), unlabelled.

    Folders that hold no images of the set are left out, and the warning says so: MVTec
    ``ground_truth/`` mask folders, and patchlab run folders (a folder holding
    ``image_scores.csv`` or ``maps.npz``: its overlays and report). Files whose suffix is not an
    image suffix, and macOS resource forks (``._name.png``), are ignored with a warning that
    counts them; a file with an image suffix that cannot be decoded raises an error when it is
    loaded, and a link that points nowhere raises one at once.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; check the path")
    entries = sorted(root.rglob("*"))  # one walk of the folder
    skipped = _not_images(p for p in entries if p.is_dir())
    kept = [p for p in entries if not _under(p, skipped)]
    files = [p for p in _images_among(entries) if not _under(p, skipped)]
    if not files:
        raise FileNotFoundError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    chosen = set(files)
    others = [p for p in kept if p.is_file() and p not in chosen]
    if skipped:
        names = ", ".join(str(p.relative_to(root)) for p in skipped[:3])
        warnings.warn(
            f"{len(skipped)} folder(s) under {root} left out: mask folders (ground_truth) and "
            f"patchlab run folders are not images to rank ({names})",
            stacklevel=2,
        )
    if others:
        warnings.warn(
            f"{len(others)} non-image file(s) under {root} ignored, e.g. {others[0]}", stacklevel=2
        )
    _check_names(files)
    n = len(files)
    return ImageSet(tuple(files), np.full(n, UNKNOWN, np.int8), (None,) * n, ("",) * n, root.name)


def load_paths(paths: list[str | Path]) -> ImageSet:
    """Image files and folders (each read by :func:`load_folder`), unlabelled, in the order
    given: the new images of ``patchlab score``.

    Raises
    ------
    FileNotFoundError
        Naming a path that does not exist or is not an image file.
    """
    files: list[Path] = []
    for given in map(Path, paths):
        if given.is_dir():
            files += load_folder(given).paths
        elif given.is_file() and given.suffix.lower() in IMAGE_SUFFIXES:
            files.append(given)
        else:
            raise FileNotFoundError(
                f"{given} is not an image file ({', '.join(IMAGE_SUFFIXES)}) nor a folder"
            )
    _check_names(files)
    n, name = len(files), Path(paths[0]).name if len(paths) == 1 else f"{len(paths)} paths"
    return ImageSet(tuple(files), np.full(n, UNKNOWN, np.int8), (None,) * n, ("",) * n, name)


def _check_names(paths: list[Path]) -> None:
    """Refuse, before any work, paths that are not valid UTF-8 (bytes from another encoding,
    e.g. Latin-1 names from an old system): a run writes its image names into UTF-8 files
    (``image_scores.csv``, ``metrics.json``, the report) and failed there, after all its work,
    naming no file. The message shows the bad bytes as ``\\xe9``."""
    bad = []
    for path in paths:
        try:
            str(path).encode("utf-8")
        except UnicodeEncodeError:  # os.fsdecode kept the undecodable bytes as surrogates
            bad.append(os.fsencode(path).decode("utf-8", "backslashreplace"))
    if bad:
        raise ValueError(
            f"{len(bad)} file name(s) are not valid UTF-8, e.g. {bad[0]}; patchlab writes image "
            "names into UTF-8 files (image_scores.csv, metrics.json, the report): rename them "
            "(convmv -f latin1 -t utf-8 -r --notest FOLDER converts Latin-1 names) and run again"
        )


RUN_FILES = ("image_scores.csv", "maps.npz")  # a folder holding one is a patchlab run folder


def _not_images(folders) -> list[Path]:
    """Of ``folders`` (sorted), those whose files are not images to rank: MVTec mask folders
    and patchlab run folders (their overlays and report), outermost first."""
    found = []
    for folder in folders:
        if _under(folder, found):
            continue
        if folder.name == "ground_truth" or any((folder / f).is_file() for f in RUN_FILES):
            found.append(folder)
    return found


def _under(path: Path, folders: list[Path]) -> bool:
    return any(f in path.parents for f in folders)


def _image_files(folder: Path, recursive: bool) -> list[Path]:
    """Image files in folder (sorted): :func:`_images_among` its entries."""
    return _images_among(folder.rglob("*") if recursive else folder.iterdir())


def _images_among(paths) -> list[Path]:
    """The image files among ``paths``, sorted; a link that points nowhere is an error, and
    macOS resource forks (``._name.png``) are not images."""
    found = []
    for p in paths:
        if p.suffix.lower() not in IMAGE_SUFFIXES or p.name.startswith("._"):
            continue
        if p.is_symlink() and not p.exists():
            raise FileNotFoundError(
                f"{p} is a link to {os.readlink(p)}, which does not exist; fix or remove it"
            )
        if p.is_file():
            found.append(p)
    return sorted(found)
