"""Pixels: an image as a viewer shows it, the paper's preprocessing, and ground-truth masks.

Every image is read by :func:`read_rgb` (EXIF orientation applied, 16-bit and alpha images
converted), then resized to 256 x 256 and centre-cropped to 224 x 224 (or, with ``crop=None``,
resized straight to ``resize`` x ``resize``, so that nothing near the border is cut away) and
normalised with the backbone's statistics (:func:`preprocess`). Masks are read, binarised and
cropped the same way (:func:`load_masks`); :func:`load_display` is the image as the model sees
it, for figures.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageOps

if TYPE_CHECKING:
    from patchlab.data import ImageSet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
