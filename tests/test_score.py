"""Score the next batch: a run's saved memory bank (patchlab run --save-bank) and new images
scored against it (patchlab score), checked against brute-force distances."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from patchlab.cli import main
from patchlab.config import PAPER_SETTINGS, RunConfig
from patchlab.data import load_folder, load_paths
from patchlab.demo import make_demo_data
from patchlab.experiment import feature_options, run
from patchlab.features import extract_features
from patchlab.saved import load_bank, save_bank, score_images

FAST = dict(weights="none", **PAPER_SETTINGS)  # seeded random weights: equalities, not quality


def batches(root: Path, tmp: Path) -> tuple[Path, Path]:
    """Batch 1: train/good and every other defective image; batch 2: test/good and the rest
    (file names keep the defect type: ``hole_001.png``)."""
    one, two = tmp / "batch1", tmp / "batch2"
    one.mkdir()
    two.mkdir()
    for path in sorted((root / "train" / "good").iterdir()):
        shutil.copy(path, one / f"train_{path.name}")
    defective = sorted(p for p in (root / "test").glob("*/*.png") if p.parent.name != "good")
    for j, path in enumerate(defective):
        shutil.copy(path, (one if j % 2 == 0 else two) / f"{path.parent.name}_{path.name}")
    for path in sorted((root / "test" / "good").iterdir()):
        shutil.copy(path, two / f"good_{path.name}")
    return one, two


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("score")
    root = make_demo_data(
        tmp / "demo", categories=["brick"], n_train=4, n_test_good=3, n_defective=4
    )
    return batches(root / "brick", tmp)


def features(folder: Path, config: RunConfig) -> torch.Tensor:
    return extract_features(load_folder(folder), **feature_options(config))


def saved(folder: Path, tmp: Path, **settings) -> tuple[RunConfig, Path]:
    """Batch 1 run blind and its bank saved, then its cache removed."""
    cache = tmp / "cache1"
    config = RunConfig(data=str(folder), unlabeled=True, cache_dir=str(cache), **settings)
    result = run(config, progress=False)
    bank = save_bank(result, tmp / "run1" / "bank")
    shutil.rmtree(cache)
    return config, bank


def brute(queries: torch.Tensor, bank: torch.Tensor, k: int, skip=None) -> torch.Tensor:
    """Mean of the k smallest float64 distances of each query to the bank (``skip``: a
    boolean (queries, bank) mask of excluded pairs)."""
    d = torch.cdist(queries.double(), bank.double())
    if skip is not None:
        d[skip] = math.inf
    return d.topk(k, largest=False).values.mean(1)


def test_against_the_bank_equals_a_bank_rebuilt_from_batch_one(demo, tmp_path):
    one, two = demo
    config, folder = saved(one, tmp_path, k=3, **FAST)
    f1, f2 = features(one, config), features(two, config)  # the reference, from the images
    copy = tmp_path / "batch1-gone"
    shutil.move(one, copy)  # the first batch's images are gone: the bank is self-contained
    try:
        result = score_images(
            load_bank(folder), load_paths([two]), progress=False, cache_dir=str(tmp_path / "cache2")
        )
    finally:
        shutil.move(copy, one)
    want = brute(f2.reshape(-1, f2.shape[-1]), f1.reshape(-1, f1.shape[-1]), 3)
    np.testing.assert_allclose(result.patch_scores.reshape(-1).double(), want, rtol=1e-5)
    assert result.metrics["n_bank"] == f1[..., 0].numel() and result.images.paths[0].parent == two


def test_added_to_the_bank_is_blind_on_the_union(demo, tmp_path):
    one, two = demo
    config, folder = saved(one, tmp_path, k=3, **FAST)
    f1, f2 = features(one, config), features(two, config)
    result = score_images(
        load_bank(folder),
        load_paths([two]),
        add=True,
        progress=False,
        cache_dir=str(tmp_path / "cache2"),
    )
    q = f2.reshape(-1, f2.shape[-1])
    union = torch.cat([q, f1.reshape(-1, f1.shape[-1])])
    itself = torch.zeros(len(q), len(union), dtype=torch.bool)
    itself[torch.arange(len(q)), torch.arange(len(q))] = True  # exclude="self"
    want = brute(q, union, 3, itself)
    np.testing.assert_allclose(result.patch_scores.reshape(-1).double(), want, rtol=1e-5)


def test_mutual_scoring_against_the_bank_images(demo, tmp_path):
    one, two = demo
    settings = dict(FAST, method="mutual", mutual_ratio=0.5)
    config, folder = saved(one, tmp_path, **settings)
    f1, f2 = features(one, config), features(two, config)
    result = score_images(
        load_bank(folder), load_paths([two]), progress=False, cache_dir=str(tmp_path / "cache2")
    )
    n1, h, w, d = f1.shape
    q = f2.reshape(-1, d).double()
    minima = torch.stack(
        [torch.cdist(q, f1[j].reshape(-1, d).double()).amin(1) for j in range(n1)], 1
    )  # (patches, bank images)
    keep = math.ceil(0.5 * n1)  # no own image among the bank's
    want = minima.topk(keep, largest=False).values.mean(1)
    # mutual's per-image minima are float32 GEMM-form distances (the method's own precision;
    # 6e-5 relative on these random-weight features), the rest exact
    np.testing.assert_allclose(result.patch_scores.reshape(-1).double(), want, rtol=1e-3)


def test_the_demo_batches_through_the_command_line(demo, tmp_path, capsys):
    """The issue's check: a bank saved from one unlabelled batch (train/good and half of the
    defective images) ranks the second batch's defects above its goods, after the cache and
    the first batch's images are removed. The defaults of patchlab run, pretrained Lite0."""
    one, two = demo
    first = tmp_path / "one"
    shutil.copytree(one, first)
    cache = tmp_path / "cache"

    def patchlab(*words) -> None:
        assert main([*map(str, words), "--cache-dir", str(cache), "--quiet"]) == 0

    patchlab("run", first, "--unlabeled", "--save-bank", "--out", tmp_path / "run1")
    shutil.rmtree(cache)
    shutil.rmtree(first)
    out = tmp_path / "run2"
    patchlab("score", two, "--bank", tmp_path / "run1", "--out", out, "--report")
    said = capsys.readouterr().out
    assert "scored against the bank of" in said
    rows = (out / "image_scores.csv").read_text().splitlines()[1:]
    names = [r.split(",")[0] for r in rows]
    scores = [float(r.split(",")[-1]) for r in rows]
    defective = [0 if Path(n).name.startswith("good_") else 1 for n in names]
    assert roc_auc_score(defective, scores) == 1.0, rows
    assert (out / "report.html").is_file() and not (out / "bank").exists()
    # --add --save-bank: the grown bank scores the next batch in its turn
    grown = tmp_path / "run3"
    patchlab("score", two, "--bank", tmp_path / "run1", "--add", "--save-bank", "--out", grown)
    bank = load_bank(grown)
    assert len(bank) == len(list(one.iterdir())) + len(list(two.iterdir()))
    patchlab("score", two, "--bank", grown, "--out", tmp_path / "run4")
    # one image alone (MuSc's batch methods cannot score one): against the bank
    single = sorted(two.iterdir())[0]
    patchlab("score", single, "--bank", grown, "--out", tmp_path / "run5")
    assert len((tmp_path / "run5" / "image_scores.csv").read_text().splitlines()) == 2


def test_a_damaged_or_foreign_bank_is_refused(demo, tmp_path, capsys):
    one, two = demo
    config, folder = saved(one, tmp_path, k=3, **FAST)
    score = ["score", str(two), "--bank", str(tmp_path / "run1"), "--out", str(tmp_path / "o")]

    def refused(*extra) -> str:
        assert main([*score, *extra, "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    assert "saved with resize=256, not 320" in refused("--resize", "320")
    assert "saved with backbone='efficientnet_lite0'" in refused("--backbone", "wide_resnet50_2")
    arrays = folder / "features.npz"
    good = arrays.read_bytes()
    arrays.write_bytes(good[: len(good) // 2])
    assert "is damaged" in refused() and "--save-bank" in refused()
    arrays.write_bytes(good)
    meta = json.loads((folder / "bank.json").read_text())
    (folder / "bank.json").write_text(json.dumps({**meta, "format": 0}))
    assert "this patchlab reads format 1" in refused()
    shutil.rmtree(folder)
    assert "holds no saved bank" in refused()


def test_a_bank_saved_with_a_weights_file_needs_that_file(tmp_path, demo, capsys):
    from patchlab.backbones import build_backbone

    one, two = demo
    for name, seed in (("a.pt", 1), ("b.pt", 2)):
        torch.save(build_backbone("efficientnet_lite0", "none", seed).state_dict(), tmp_path / name)
    settings = dict(PAPER_SETTINGS, weights=str(tmp_path / "a.pt"), k=3)
    config, folder = saved(one, tmp_path, **settings)
    score = ["score", str(two), "--bank", str(folder), "--quiet"]
    assert main([*score, "--weights", str(tmp_path / "b.pt"), "--out", str(tmp_path / "o")]) == 2
    assert "pass --weights with the file it was saved with" in capsys.readouterr().err
    moved = tmp_path / "moved.pt"
    shutil.move(tmp_path / "a.pt", moved)  # another machine: the same file elsewhere
    assert main([*score, "--weights", str(moved), "--out", str(tmp_path / "o2")]) == 0
    # the grown bank records the file where it now lies, with the bank's identity
    grow = ["--add", "--save-bank", "--weights", str(moved), "--out", str(tmp_path / "o3")]
    assert main([*score, *grow]) == 0
    grown = load_bank(tmp_path / "o3")
    assert grown.config.weights == str(moved)
    assert grown.weights_identity == load_bank(folder).weights_identity


def test_save_bank_is_refused_before_the_work_for_a_method_without_one(demo, tmp_path, capsys):
    one, _ = demo
    code = main(
        [
            "run",
            str(one),
            "--unlabeled",
            "--method",
            "padim",
            "--save-bank",
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ]
    )
    assert code == 2 and "does not score against a memory bank" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_bank_killed_while_saving_leaves_the_old_one(demo, tmp_path, monkeypatch):
    import patchlab.saved as saved_module

    one, _ = demo
    config = RunConfig(data=str(one), unlabeled=True, cache_dir=str(tmp_path / "c"), k=3, **FAST)
    result = run(config, progress=False)
    folder = save_bank(result, tmp_path / "bank")
    before = (folder / "features.npz").read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(saved_module.np, "savez", killed)
    with pytest.raises(KeyboardInterrupt):
        save_bank(result, folder)
    monkeypatch.undo()
    assert (folder / "features.npz").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank", "c"]  # no half folder
    load_bank(folder)


def test_a_rerun_without_save_bank_says_the_bank_goes(demo, tmp_path):
    one, _ = demo
    args = [
        "run",
        str(one),
        "--unlabeled",
        "--k",
        "3",
        "--weights",
        "none",
        "--quiet",
        "--method",
        "patchcluster",
        "--local-sizes",
        "3",
        "--out",
        str(tmp_path / "o"),
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    assert main([*args, "--save-bank"]) == 0 and (tmp_path / "o" / "bank").is_dir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(args) == 0
    assert any("held the saved bank" in str(w.message) for w in caught)
    assert not (tmp_path / "o" / "bank").exists()


def test_the_scoring_widget_shows_a_scored_batch(demo, tmp_path, monkeypatch):
    from patchlab import bank as bank_module
    from patchlab import knn as knn_module
    from patchlab.widgets import explore

    one, two = demo
    config, folder = saved(one, tmp_path, k=3, k_max=6, **FAST)
    result = score_images(
        load_bank(folder), load_paths([two]), progress=False, cache_dir=str(tmp_path / "cache2")
    )
    widget = explore(result, n_show=3)

    def no_knn(*args, **kwargs):
        raise AssertionError("moving K must not compute a neighbour table")

    monkeypatch.setattr(knn_module, "knn", no_knn)
    monkeypatch.setattr(bank_module, "knn", no_knn)
    widget.k.value = 6
    f1, f2 = features(one, config), features(two, config)
    want = brute(f2.reshape(-1, f2.shape[-1]), f1.reshape(-1, f1.shape[-1]), 6)
    np.testing.assert_allclose(widget.result.patch_scores.reshape(-1).double(), want, rtol=1e-5)


def test_lnamd_with_a_coreset_keeps_each_sizes_own_coreset(demo, tmp_path):
    """Each locally aware size picks its own greedy coreset: the bank keeps every size's rows
    (review finding: only the first size's were saved, and used for every size)."""
    one, two = demo
    settings = dict(FAST, local_sizes=(3, 1), coreset=0.5, k=3)
    config = RunConfig(data=str(one), unlabeled=True, cache_dir=str(tmp_path / "c"), **settings)
    first = run(config, progress=False)
    folder = save_bank(first, tmp_path / "bank")
    bank = load_bank(folder)
    own = {x.local: x.bank.rows for x in (first.inputs, *first.inputs.others)}
    assert not torch.equal(own[3], own[1])
    for r in (3, 1):
        assert torch.equal(bank.rows[r], own[r])
    result = score_images(bank, load_paths([two]), progress=False, cache_dir=str(tmp_path / "c2"))
    want = 0
    for r in (3, 1):
        sized = replace(config, local_sizes=(r,))
        f1, f2 = features(one, sized), features(two, sized)
        f1 = f1.reshape(-1, f1.shape[-1])[own[r]]
        want = want + brute(f2.reshape(-1, f2.shape[-1]), f1, 3) / 2  # LNAMD: the mean
    np.testing.assert_allclose(result.patch_scores.reshape(-1).double(), want, rtol=1e-5)


def test_score_refuses_to_overwrite_its_own_bank(demo, tmp_path, capsys):
    one, two = demo
    saved(one, tmp_path, k=3, **FAST)
    run1 = tmp_path / "run1"
    (run1 / "metrics.json").write_text("{}")
    code = main(["score", str(two), "--bank", str(run1), "--out", str(run1), "--quiet"])
    assert code == 2 and "holds the bank scored against" in capsys.readouterr().err
    assert (run1 / "bank" / "features.npz").is_file()


def test_a_bank_with_missing_fields_is_named_damaged(demo, tmp_path):
    one, _ = demo
    _, folder = saved(one, tmp_path, k=3, **FAST)
    meta = json.loads((folder / "bank.json").read_text())
    del meta["grid"]
    (folder / "bank.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="is damaged .*KeyError"):
        load_bank(folder)
    (folder / "bank.json").write_text(json.dumps({**meta, "format": 99, "config": {"x": 1}}))
    with pytest.raises(ValueError, match="this patchlab reads format 1"):
        load_bank(folder)  # the format is named before the fields are read


def test_the_neighbour_explorer_refuses_a_scored_batch(demo, tmp_path):
    from patchlab.widgets import NeighbourExplorer

    one, two = demo
    _, folder = saved(one, tmp_path, k=3, **FAST)
    result = score_images(
        load_bank(folder), load_paths([two]), progress=False, cache_dir=str(tmp_path / "c2")
    )
    with pytest.raises(ValueError, match="the neighbour explorer shows a blind run"):
        NeighbourExplorer(result)


def test_images_given_as_arrays_score_as_their_files(demo, tmp_path):
    """Frames as uint8 arrays, or as a float (n, 3, H, W) tensor, score as the same images
    read from files (PNG is lossless: the same pixels, the same features)."""
    from PIL import Image

    from patchlab.saved import score_arrays

    one, two = demo
    _, folder = saved(one, tmp_path, k=3, **FAST)
    bank = load_bank(folder)
    files = sorted(two.iterdir())[:3]
    frames = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files])
    cache = str(tmp_path / "c2")
    want = score_images(bank, load_paths(files), progress=False, cache_dir=cache)
    got = score_arrays(bank, frames, tmp_path / "frames", progress=False, cache_dir=cache)
    torch.testing.assert_close(got.patch_scores, want.patch_scores)
    tensor = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    again = score_arrays(bank, tensor, progress=False, cache_dir=cache)
    torch.testing.assert_close(again.patch_scores, want.patch_scores)
    with pytest.raises(ValueError, match="arrays must be images"):
        score_arrays(bank, np.zeros((2, 5)), progress=False)
