import warnings

import numpy as np
import pytest
import torch
from conftest import SHARED_TILE
from PIL import Image

from patchlab.data import load_folder, load_mvtec
from patchlab.images import IMAGENET_MEAN, IMAGENET_STD, load_masks, preprocess, read_rgb


def test_settings_on_demo(tiny_demo):
    mix = load_mvtec(tiny_demo, "brick", "mix")
    test = load_mvtec(tiny_demo, "brick", "test")
    ano = load_mvtec(tiny_demo, "brick", "ano")
    train = load_mvtec(tiny_demo, "brick", "train")
    assert (len(mix), len(test), len(ano), len(train)) == (9, 6, 3, 3)
    assert sorted(test.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert ano.labels.all() and not train.labels.any()
    assert all(
        (m is None) == (t == "good") for m, t in zip(mix.mask_paths, mix.defect_types, strict=True)
    )
    # a category folder can be passed directly
    assert load_mvtec(tiny_demo / "brick", None, "test").paths == test.paths


@pytest.mark.skipif(not SHARED_TILE.is_dir(), reason="../shared/data/magnetic_tile not present")
@pytest.mark.parametrize(
    "setting, n, n_defective", [("mix", 1344, 392), ("test", 582, 392), ("ano", 392, 392)]
)
def test_magnetic_tile_loads_in_every_setting(setting, n, n_defective):
    images = load_mvtec(SHARED_TILE.parent, "magnetic_tile", setting)
    assert len(images) == n and int(images.labels.sum()) == n_defective
    empty = [i for i, p in enumerate(images.paths) if p.stem == "exp3_num_45042"]
    masks = load_masks(images.subset(empty + [0]))  # an all-zero mask of a defective image
    assert masks.shape == (2, 224, 224) and masks[0].sum() == 0 and images.labels[empty[0]] == 1


def test_preprocess_normalises_and_crops():
    img = Image.new("RGB", (300, 200), (255, 0, 128))
    x = preprocess(img)
    assert x.shape == (3, 224, 224)
    expect = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(
        IMAGENET_STD
    )
    assert torch.allclose(x[:, 100, 100], expect, atol=1e-5)
    assert preprocess(img, resize=224, crop=None).shape == (3, 224, 224)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "I"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    arr = np.linspace(0, 255, 64 * 64).reshape(64, 64)
    if mode in ("I;16", "I"):  # 16-bit greyscale, as PNG (I;16) or TIFF (I, 32-bit int)
        img = Image.fromarray((arr * 257).astype(np.uint16))
        img = img.convert("I") if mode == "I" else img
    else:
        img = Image.fromarray(arr.astype(np.uint8)).convert(mode)
    path = tmp_path / ("x.tif" if mode == "I" else "x.png")
    img.save(path)
    rgb = read_rgb(path)
    assert rgb.mode == "RGB" and rgb.size == (64, 64)
    out = np.asarray(rgb)
    assert out[..., 0].max() >= 250 and out[..., 0].min() <= 5  # full range kept


def test_truncated_image_names_the_file(tmp_path):
    path = tmp_path / "broken.png"
    buf = tmp_path / "full.png"
    Image.new("RGB", (64, 64), (10, 20, 30)).save(buf)
    path.write_bytes(buf.read_bytes()[:60])
    with pytest.raises(ValueError, match="broken.png"):
        read_rgb(path)


def test_mask_size_mismatch_names_both_files(tiny_demo, tmp_path):
    import shutil

    cat = tmp_path / "cat"
    shutil.copytree(tiny_demo / "brick", cat)
    mask = next((cat / "ground_truth").rglob("*_mask.png"))
    Image.new("L", (10, 12)).save(mask)
    with pytest.raises(ValueError, match=f"{mask.name}.*10x12"):
        load_masks(load_mvtec(cat, None, "ano"))


def test_masks_are_binary_and_cropped(tiny_demo):
    images = load_mvtec(tiny_demo, "brick", "test")
    masks = load_masks(images)
    assert masks.dtype == np.uint8 and set(np.unique(masks)) <= {0, 1}
    assert (masks.reshape(len(images), -1).sum(1) > 0).tolist() == (images.labels == 1).tolist()
    assert load_masks(images, resize=224, crop=None).shape == (6, 224, 224)


def test_bad_input_errors(tiny_demo, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mvtec(tmp_path / "nope", "brick")
    with pytest.raises(FileNotFoundError, match="category 'carpet' not found.*brick"):
        load_mvtec(tiny_demo, "carpet")
    with pytest.raises(ValueError, match="setting='train_all' is unknown"):
        load_mvtec(tiny_demo, "brick", "train_all")
    with pytest.raises(FileNotFoundError, match="holds no images"):
        load_folder(tmp_path)
    (tmp_path / "cat" / "test" / "good").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="holds no images"):
        load_mvtec(tmp_path / "cat", None, "test")


def test_missing_mask_is_an_error(tiny_demo, tmp_path):
    import shutil

    cat = tmp_path / "cat"
    shutil.copytree(tiny_demo / "brick", cat)
    mask = next((cat / "ground_truth").rglob("*_mask.png"))
    mask.unlink()
    with pytest.raises(FileNotFoundError, match=f"expected .*{mask.name}"):
        load_mvtec(cat, None, "test")


def test_folder_is_recursive_and_warns_about_other_files(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "a" / "one.png")
    Image.new("L", (32, 32)).save(tmp_path / "a" / "b" / "two.jpg")
    (tmp_path / "notes.txt").write_text("hello")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = load_folder(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in images.paths] == [
        "a/b/two.jpg",
        "a/one.png",
    ]
    assert (images.labels == -1).all() and not images.has_labels
    assert any("1 non-image file" in str(w.message) for w in caught)
