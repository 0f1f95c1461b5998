"""Tests for the offline demo data set (patchlab.demo)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchlab import demo
from patchlab.demo import DEFECT_TYPES, DEMO_CATEGORIES, demo_path, make_demo_data

SMALL = {"n_train": 3, "n_test_good": 2, "n_defective": 6, "size": 64}


def _load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def full_washer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One object category at the default counts and size."""
    return make_demo_data(tmp_path_factory.mktemp("full"), categories=["washer"]) / "washer"


def test_categories_and_defect_types() -> None:
    assert {"brick", "gravel", "grass"} <= set(DEMO_CATEGORIES)
    assert "washer" in DEMO_CATEGORIES
    assert len(DEFECT_TYPES) >= 3


def test_layout_counts_and_masks(tmp_path: Path) -> None:
    root = make_demo_data(tmp_path, categories=["brick", "washer"], **SMALL)
    assert root == tmp_path
    assert sorted(p.name for p in root.iterdir()) == ["brick", "washer"]
    for category in ("brick", "washer"):
        folder = root / category
        assert len(list((folder / "train" / "good").glob("*.png"))) == 3
        assert len(list((folder / "test" / "good").glob("*.png"))) == 2
        assert not (folder / "ground_truth" / "good").exists()
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["seed"] == 0 and meta["complete"] and meta["size"] == 64
        for good in sorted(folder.glob("*/good/*.png")):
            assert _load(good).shape[:2] == (64, 64)
        n_defective = 0
        for kind in DEFECT_TYPES:
            images = sorted((folder / "test" / kind).glob("*.png"))
            assert [p.name for p in images] == ["000.png", "001.png"]
            for image in images:
                mask = _load(folder / "ground_truth" / kind / f"{image.stem}_mask.png")
                assert mask.dtype == np.uint8 and mask.shape == _load(image).shape[:2]
                assert set(np.unique(mask)) == {0, 255}
                n_defective += 1
        assert n_defective == 6
    train = [p.read_bytes() for p in sorted((root / "brick" / "train" / "good").glob("*.png"))]
    assert len(set(train)) == len(train)


def test_full_category_counts_and_defect_area(full_washer: Path) -> None:
    assert len(list((full_washer / "train" / "good").glob("*.png"))) == 40
    assert len(list((full_washer / "test" / "good").glob("*.png"))) == 20
    masks = sorted((full_washer / "ground_truth").glob("*/*_mask.png"))
    assert len(list((full_washer / "test").glob("*/*.png"))) == 20 + len(masks) == 40
    assert {p.parent.name for p in masks} == set(DEFECT_TYPES)
    assert _load(full_washer / "test" / "good" / "000.png").shape == (256, 256, 3)
    fractions = [(_load(p) > 0).mean() for p in masks]
    assert min(fractions) > 0
    assert 0.01 <= np.mean(fractions) <= 0.03
    for path in masks:  # every defect lies inside the 224x224 centre crop the pipeline sees
        mask = _load(path) > 0
        mask[16:240, 16:240] = False
        assert not mask.any()


def test_object_moves_and_turns(full_washer: Path) -> None:
    grey = [_load(p).mean(axis=2) for p in sorted((full_washer / "train" / "good").glob("*.png"))]
    foreground = [g > 120 for g in grey]
    centroids = np.array([np.argwhere(f).mean(axis=0) for f in foreground])
    assert centroids.std(axis=0).min() > 2
    assert len({tuple(np.round(c)) for c in centroids}) > len(centroids) // 2
    first = foreground[0]
    ious = [(first & f).sum() / (first | f).sum() for f in foreground[1:]]
    assert max(ious) < 0.97


@pytest.mark.parametrize("category", DEMO_CATEGORIES)
def test_masks_are_exact_and_contrasted(category: str) -> None:
    for k, kind in enumerate(DEFECT_TYPES):
        rng = np.random.default_rng([7, k])
        clean, region = demo._normal(category, rng, 128)
        defective, mask = demo._add_defect(clean, region, kind, rng, demo._FOREIGN[category])
        before, after = np.rint(np.clip(clean, 0, 255)), np.rint(np.clip(defective, 0, 255))
        changed = (before != after).any(axis=2)
        assert mask.any() and not (changed & ~mask).any()
        assert changed[mask].mean() > 0.95
        assert np.abs(after - before)[mask].mean() > (30 if kind == "stain" else 60)
        assert not (mask & ~region).any()


def test_deterministic(tmp_path: Path) -> None:
    kwargs = {"categories": ["grass", "washer"], **SMALL}
    first = _tree(make_demo_data(tmp_path / "a", seed=3, **kwargs))
    again = _tree(make_demo_data(tmp_path / "b", seed=3, **kwargs))
    other = _tree(make_demo_data(tmp_path / "c", seed=4, **kwargs))
    assert first == again
    assert first.keys() == other.keys()
    assert all(first[name] != other[name] for name in first if "train" in name)


def test_smaller_counts_give_a_prefix(tmp_path: Path) -> None:
    big = _tree(make_demo_data(tmp_path / "big", categories=["gravel"], **SMALL))
    small = _tree(
        make_demo_data(
            tmp_path / "small",
            categories=["gravel"],
            n_train=1,
            n_test_good=1,
            n_defective=3,
            size=64,
        )
    )
    assert small.items() <= big.items()


def test_skip_overwrite_and_foreign_folders(tmp_path: Path) -> None:
    kwargs = {"categories": ["brick"], **SMALL}
    make_demo_data(tmp_path, **kwargs)
    image = tmp_path / "brick" / "train" / "good" / "000.png"
    original = image.read_bytes()
    image.write_bytes(b"edited")
    make_demo_data(tmp_path, **kwargs)
    assert image.read_bytes() == b"edited"  # complete: skipped
    make_demo_data(tmp_path, overwrite=True, **kwargs)
    assert image.read_bytes() == original
    (tmp_path / "brick" / "test" / "good" / "001.png").unlink()
    make_demo_data(tmp_path, **kwargs)
    assert (tmp_path / "brick" / "test" / "good" / "001.png").is_file()  # incomplete: redone
    make_demo_data(tmp_path, **{**kwargs, "n_train": 1})
    assert len(list((tmp_path / "brick" / "train" / "good").glob("*.png"))) == 1
    (tmp_path / "gravel").mkdir()
    (tmp_path / "gravel" / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="overwrite"):
        make_demo_data(tmp_path, categories=["gravel"], **SMALL)
    assert (tmp_path / "gravel" / "mine.txt").is_file()


def test_unknown_category(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="marble") as info:
        make_demo_data(tmp_path, categories=["brick", "marble"])
    assert all(name in str(info.value) for name in DEMO_CATEGORIES)
    assert not (tmp_path / "brick").exists()


@pytest.mark.parametrize("argument", ["n_train", "n_test_good", "n_defective"])
def test_counts_below_one(tmp_path: Path, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        make_demo_data(tmp_path, **{argument: 0})


def test_bad_size_and_seed(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="size"):
        make_demo_data(tmp_path, size=8)
    with pytest.raises(ValueError, match="seed"):
        make_demo_data(tmp_path, seed=-1)


def test_demo_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PATCHLAB_DEMO", raising=False)
    repo = Path(demo.__file__).resolve().parents[1]
    if (repo / "pyproject.toml").is_file():
        assert demo_path() == repo / "data" / "demo"
    else:
        assert demo_path() == Path.home() / ".cache" / "patchlab" / "demo"
    monkeypatch.setenv("PATCHLAB_DEMO", str(tmp_path))
    assert demo_path() == tmp_path
    assert demo_path(tmp_path / "x") == tmp_path / "x"
