"""Images and masks as a viewer shows them, folders that hold only images (issue 21): each case
failed silently before (a wrong image, a wrong mask, extra images ranked, a file dropped)."""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchlab.data import load_folder, load_mvtec
from patchlab.images import load_masks, read_rgb

ROTATE_90_CW = 6  # EXIF orientation: the stored pixels are shown turned 90 degrees clockwise


def asymmetric(h: int = 24, w: int = 40) -> np.ndarray:
    """An (h, w, 3) uint8 image with no symmetry: a ramp along x, a bright top-left block."""
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.linspace(0, 200, w, dtype=np.uint8)[None, :]
    img[:8, :10] = 255
    return img


def save_rotated(path: Path, pixels: np.ndarray) -> None:
    exif = Image.Exif()
    exif[0x0112] = ROTATE_90_CW
    Image.fromarray(pixels).save(path, exif=exif)


def test_an_exif_rotated_image_is_read_as_shown(tmp_path):
    pixels = asymmetric()
    save_rotated(tmp_path / "phone.png", pixels)
    shown = np.asarray(read_rgb(tmp_path / "phone.png"))
    np.testing.assert_array_equal(shown, np.rot90(pixels, k=-1))  # numpy: k=-1 is clockwise


def test_an_exif_rotated_mask_stays_on_its_image(tmp_path):
    """Image and mask both carry the tag: the mask is turned like the image, and the size
    check compares the turned sizes."""
    cat = tmp_path / "cat"
    for sub in ("test/crack", "ground_truth/crack"):
        (cat / sub).mkdir(parents=True)
    pixels = asymmetric()
    save_rotated(cat / "test/crack/000.png", pixels)
    mask = np.zeros(pixels.shape[:2], np.uint8)
    mask[:8, :10] = 255  # the bright block
    exif = Image.Exif()
    exif[0x0112] = ROTATE_90_CW
    Image.fromarray(mask).save(cat / "ground_truth/crack/000_mask.png", exif=exif)
    images = load_mvtec(cat, setting="test")
    got = load_masks(images, resize=40, crop=None)[0].astype(bool)
    shown = np.asarray(read_rgb(images.paths[0]).resize((40, 40), Image.NEAREST))
    bright = shown.min(axis=2) == 255
    assert got.sum() > 0 and (got == bright).mean() > 0.97


def test_a_mask_in_the_alpha_channel(tmp_path):
    """Flat colour, the defect in alpha: read from alpha (before: all defect)."""
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere
    rgba[5:9, 10:20, 3] = 255  # opaque only on the defect
    cat = tmp_path / "cat"
    for sub in ("test/crack", "ground_truth/crack"):
        (cat / sub).mkdir(parents=True)
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(cat / "test/crack/000.png")
    Image.fromarray(rgba, "RGBA").save(cat / "ground_truth/crack/000_mask.png")
    got = load_masks(load_mvtec(cat, setting="test"), resize=30, crop=None)[0]
    expected = np.asarray(Image.fromarray(rgba[..., 3]).resize((30, 30), Image.NEAREST)) >= 128
    np.testing.assert_array_equal(got.astype(bool), expected)


def test_a_coloured_rgba_mask_keeps_its_colour_channels(tmp_path):
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 3] = 255  # opaque everywhere
    rgba[5:9, 10:20, :3] = 255  # the defect in colour
    Image.fromarray(rgba, "RGBA").save(tmp_path / "m.png")
    from patchlab.images import _read_mask

    np.testing.assert_array_equal(_read_mask(tmp_path / "m.png"), rgba[..., 0] == 255)


def test_a_12_bit_image_in_a_16_bit_png_keeps_its_contrast(tmp_path):
    ramp = np.tile(np.linspace(0, 4095, 64).astype(np.uint16), (8, 1))  # 12-bit sensor data
    Image.fromarray(ramp).save(tmp_path / "raw.png")
    got = np.asarray(read_rgb(tmp_path / "raw.png"))[..., 0].astype(float)
    np.testing.assert_allclose(got, ramp * 255.0 / 4095, atol=0.5)  # before: / 257, max 16
    full = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    Image.fromarray(full).save(tmp_path / "full.png")
    got = np.asarray(read_rgb(tmp_path / "full.png"))[..., 0].astype(float)
    np.testing.assert_allclose(got, full / 257.0, atol=0.5)  # a true 16-bit image: as before


def test_a_dangling_link_is_named(tmp_path):
    Image.fromarray(asymmetric()).save(tmp_path / "a.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "b.png")
    with pytest.raises(FileNotFoundError, match=r"b\.png is a link to .*gone\.png"):
        load_folder(tmp_path)


def test_macos_resource_forks_are_skipped_with_a_count(tmp_path):
    Image.fromarray(asymmetric()).save(tmp_path / "a.png")
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    with pytest.warns(UserWarning, match="1 non-image file"):
        images = load_folder(tmp_path)
    assert [p.name for p in images.paths] == ["a.png"]


def test_unlabeled_skips_masks_and_run_folders(tmp_path):
    """An MVTec category given as a plain folder, with an earlier run written inside it: only
    the category's images are ranked, and the warning names what was left out."""
    cat = tmp_path / "cat"
    for sub in ("train/good", "test/good", "test/crack", "ground_truth/crack", "run1/overlays"):
        (cat / sub).mkdir(parents=True)
    for i, sub in enumerate(("train/good", "test/good", "test/crack")):
        Image.fromarray(asymmetric() + i).save(cat / sub / "000.png")
    Image.fromarray(np.zeros((24, 40), np.uint8)).save(cat / "ground_truth/crack/000_mask.png")
    (cat / "run1/image_scores.csv").write_text("path,score\n")
    Image.fromarray(asymmetric()).save(cat / "run1/overlays/000.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = load_folder(cat)
    assert sorted(str(p.relative_to(cat)) for p in images.paths) == [
        "test/crack/000.png",
        "test/good/000.png",
        "train/good/000.png",
    ]
    text = " ".join(str(w.message) for w in caught)
    assert "2 folder(s)" in text and "ground_truth" in text and "run1" in text


@pytest.mark.skipif(sys.platform != "linux", reason="file names as raw bytes: Linux")
@pytest.mark.parametrize("layout", ["mvtec", "folder"])
def test_a_file_name_that_is_not_utf8_is_named_before_the_work(tiny_demo, tmp_path, capsys, layout):
    """A Latin-1 name (b"caf\\xe9.png") failed after the whole computation, naming no file, when
    image_scores.csv was written. Now the run stops at once, naming it with its bad byte."""
    from patchlab.cli import main

    root = tmp_path / "data"
    shutil.copytree(tiny_demo, root)
    good = root / "brick" / "test" / "good"
    first = sorted(good.iterdir())[0]
    os.rename(os.fsencode(first), os.fsencode(good) + b"/caf\xe9.png")
    args = [str(root), "--category", "brick"] if layout == "mvtec" else [str(good), "--unlabeled"]
    cache = tmp_path / "cache"
    code = main(["run", *args, "--quiet", "--cache-dir", str(cache), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "1 file name(s) are not valid UTF-8" in err and "good/caf\\xe9.png" in err
    assert not any(cache.glob("features-*")), "the check comes before the feature extraction"
