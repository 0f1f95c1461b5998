"""Image sets: an MVTec AD category under a blind setting, or a plain folder of images.

An :class:`ImageSet` holds paths, labels and mask paths only; pixels are read when needed by
:func:`load_images` and :func:`load_masks`, which apply the paper's preprocessing: resize to
256 x 256, centre-crop 224 x 224 (or, with ``crop=None``, resize straight to 224 x 224 so that
nothing near the border is cut away), and the backbone's input normalisation.

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

import functools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

SETTINGS = ("mix", "test", "ano", "train")
BLIND_SETTINGS = SETTINGS[:3]  # the set is the bank: nobody says which image is normal
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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
    n = len(files)
    return ImageSet(tuple(files), np.full(n, UNKNOWN, np.int8), (None,) * n, ("",) * n, root.name)


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


def read_rgb(path: Path) -> Image.Image:
    """Read an image as 8-bit RGB, oriented as its EXIF tag says (as a viewer shows it):
    greyscale, palette, RGBA and 16-bit images are converted (a 16-bit image by the bits its
    values use, from 8 to 16: a 12-bit image in a 16-bit PNG keeps its contrast).

    Raises
    ------
    ValueError
        Naming the file, if it cannot be decoded (corrupt, truncated, empty, not an image, or
        larger than PIL's decompression-bomb limit).
    """
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)  # as a viewer shows it (phones, cameras)
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit greyscale
                arr = np.asarray(img, dtype=np.float64)
                # the bits in use: a 12-bit sensor's values (up to 4095) in a 16-bit PNG span
                # 0-255 like a 16-bit image's; dividing by 257 would leave them nearly black
                bits = min(16, max(8, int(arr.max()).bit_length()))
                arr = arr * 255.0 / (2**bits - 1)
                img = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))
            elif img.mode == "F":
                arr = np.asarray(img, dtype=np.float64)
                img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
            return img.convert("RGB")
    except Exception as err:  # PIL raises OSError, SyntaxError, DecompressionBombError, ...
        raise ValueError(_unreadable("image", path, err)) from err


def _unreadable(what: str, path: Path, err: Exception) -> str:
    """The one-line message for a file that PIL cannot read."""
    if isinstance(err, Image.DecompressionBombError):
        return (
            f"{what} {path} is larger than PIL's safety limit of {Image.MAX_IMAGE_PIXELS} "
            "pixels (a decompression bomb?); resize it, or raise PIL.Image.MAX_IMAGE_PIXELS "
            "if you trust it"
        )
    size = Path(path).stat().st_size if Path(path).exists() else 0
    reason = "it is empty (0 bytes)" if size == 0 else f"{type(err).__name__}: {err}"
    return f"cannot read {what} {path}: {reason}. Replace or remove the file and run again."


def _resize_crop(img: Image.Image, resample: int, resize: int, crop: int | None) -> Image.Image:
    """Resize to resize x resize (aspect ratio not kept, as in the paper), then centre-crop."""
    if crop is None:
        return img.resize((resize, resize), resample)
    img = img.resize((resize, resize), resample)
    left = (resize - crop) // 2
    return img.crop((left, left, left + crop, left + crop))


def preprocess(
    img: Image.Image,
    resize: int = 256,
    crop: int | None = 224,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> torch.Tensor:
    """One RGB image to a normalised backbone input.

    Parameters
    ----------
    img : PIL image, RGB
    resize, crop : int
        Resize side, then centre-crop side (None: no crop).
    mean, std : per-channel statistics on [0, 1] RGB the backbone was trained with
        (:attr:`patchlab.backbones.Backbone.mean`); ImageNet's by default.

    Returns
    -------
    torch.Tensor, shape (3, S, S), float32
        S = ``crop`` (or ``resize`` when ``crop`` is None); (x - mean) / std.
    """
    arr = np.asarray(_resize_crop(img, Image.BILINEAR, resize, crop), dtype=np.float32) / 255.0
    x = torch.from_numpy(arr).permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def load_display(path: Path, resize: int = 256, crop: int | None = 224) -> np.ndarray:
    """The image as the model sees it, for plotting: (S, S, 3) uint8, read-only.

    Kept in one in-memory cache for every figure and widget (the last 512 images), keyed by
    the file's path, size and modification time, so an edited file is read again.
    """
    stat = os.stat(path)
    return _display(str(path), stat.st_size, stat.st_mtime_ns, resize, crop)


@functools.lru_cache(maxsize=512)
def _display(path: str, size: int, mtime_ns: int, resize: int, crop: int | None) -> np.ndarray:
    image = np.asarray(_resize_crop(read_rgb(path), Image.BILINEAR, resize, crop))
    image.setflags(write=False)
    return image


def load_masks(images: ImageSet, resize: int = 256, crop: int | None = 224) -> np.ndarray:
    """Ground-truth masks, binarised and cropped like the images.

    A pixel is defect when its value (the largest of its channels) reaches half the mask's
    largest value: 0/1, 0/255, greyscale and coloured masks all work, and the faint
    compression noise some data sets carry (magnetic tile: values 1-127 around and away
    from the defects) is not counted as defect.

    Returns
    -------
    np.ndarray, shape (n, S, S), uint8 in {0, 1}
        All zero for good and unlabelled images (and for a defective image whose mask is
        empty, which a warning names).

    Raises
    ------
    ValueError
        If a mask or its image cannot be read, or their sizes differ (both files named).
    """
    side = crop or resize
    out = np.zeros((len(images), side, side), np.uint8)
    empty = []
    for i, (path, mask_path) in enumerate(zip(images.paths, images.mask_paths, strict=True)):
        if mask_path is None:
            continue
        mask = _read_mask(mask_path)
        try:
            with Image.open(path) as img:
                size = img.size[::-1] if _turned(img) else img.size  # as shown
        except Exception as err:
            raise ValueError(_unreadable("image", path, err)) from err
        if mask.shape[::-1] != size:
            raise ValueError(
                f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image {path} is "
                f"{size[0]}x{size[1]}; masks must match their image's size"
            )
        if not mask.any():
            empty.append(mask_path)
        resized = _resize_crop(
            Image.fromarray(mask.astype(np.uint8) * 255), Image.NEAREST, resize, crop
        )
        out[i] = np.asarray(resized) >= 128
    if empty:
        warnings.warn(
            f"{len(empty)} defective image(s) have an empty mask (no defect pixel), e.g. "
            f"{empty[0]}: they count in image AUROC, not in the pixel metrics",
            stacklevel=2,
        )
    return out


ORIENTATION = 0x0112  # the EXIF orientation tag; its values 5 to 8 turn the image a quarter


def _turned(img: Image.Image) -> bool:
    """Whether an image's EXIF orientation swaps its width and height (read from the tag,
    without decoding the pixels)."""
    return img.getexif().get(ORIENTATION, 1) in (5, 6, 7, 8)


def _read_mask(path: Path) -> np.ndarray:
    """A mask file as a boolean (H, W) array: value >= half the mask's maximum, EXIF-oriented.

    An RGBA (or LA) mask whose colour channels are flat (one value everywhere) keeps its defect
    in the alpha channel, and is read from it."""
    try:
        with Image.open(path) as m:
            m.load()
            m = ImageOps.exif_transpose(m)
            if m.mode in ("RGBA", "LA", "PA") or (m.mode == "P" and "transparency" in m.info):
                rgba = np.asarray(m.convert("RGBA"))
                colour = rgba[..., :3]
                flat = (colour == colour.reshape(-1, 3)[0]).all()
                arr = rgba[..., 3] if flat else colour
            else:
                arr = np.asarray(m.convert("RGB") if m.mode not in ("L", "1", "I", "I;16") else m)
    except Exception as err:
        raise ValueError(_unreadable("mask", path, err)) from err
    level = arr.max(axis=-1) if arr.ndim == 3 else arr
    top = level.max() if level.size else 0
    return level >= top / 2 if top > 0 else np.zeros(level.shape, bool)
