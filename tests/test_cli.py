"""The command line end to end on tiny demo data."""

import csv
import json

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from patchlab.cli import main


def test_run_writes_metrics_scores_and_maps(tiny_demo, tmp_path):
    out = tmp_path / "out"
    code = main(
        [
            "run",
            str(tiny_demo),
            "--category",
            "brick",
            "--setting",
            "mix",
            "--k",
            "5",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == 9 and metrics["n_patches"] == 9 * 28 * 28
    assert set(metrics["seconds"]) >= {"features", "neighbours", "scores"}
    # the defaults measured on real data: mutual scoring with LNAMD and RsCIN, the top-1 % score
    config = metrics["config"]
    assert config["method"] == "mutual" and config["local_sizes"] == [3, 1, 5]
    assert config["rscin"] == [2, 3] and metrics["image_score"] == "top"
    # the configured image score is reported beside every other rule this method allows
    by_score = metrics["image_auroc_by_score"]
    assert set(by_score) == {"max", "top", "max_median"} and metrics["negative_weights"] == 0
    assert metrics["image_auroc"] == by_score["top"]
    # the pretrained offline backbone by default, recorded with its feature width
    assert metrics["backbone"] == "efficientnet_lite0" and metrics["weights"] == "imagenet"
    assert metrics["feature_dim"] == 152 and metrics["config"]["backbone"] == "efficientnet_lite0"
    maps = np.load(out / "maps.npz")
    assert maps["maps"].shape == (9, 224, 224) and maps["maps"].dtype == np.float32
    assert maps["masks"].dtype == np.uint8 and len(maps["paths"]) == 9
    # the stored metrics agree with an independent computation from the stored arrays
    assert metrics["image_auroc"] == pytest.approx(
        roc_auc_score(maps["labels"], maps["image_scores"])
    )
    assert metrics["pixel_auroc"] == pytest.approx(
        roc_auc_score(maps["masks"].ravel(), maps["maps"].ravel()), abs=1e-9
    )
    with open(out / "image_scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["label"] for r in rows} == {"0", "1"}  # 1 defective, 0 good
    assert len(rows) == 9 and [float(r["score"]) for r in rows] == sorted(
        (float(r["score"]) for r in rows), reverse=True
    )


def test_run_on_an_unlabelled_folder(tiny_demo, tmp_path, capsys):
    folder = tiny_demo / "brick" / "test"
    assert (
        main(["run", str(folder), "--unlabeled", "--k", "3", "--out", str(tmp_path), "--quiet"])
        == 0
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["image_auroc"] is None and metrics["n_images"] == 6
    assert (np.load(tmp_path / "maps.npz")["labels"] == -1).all()
    with open(tmp_path / "image_scores.csv") as f:  # no label: an empty cell, not -1
        assert {row["label"] for row in csv.DictReader(f)} == {""}


def test_demo_prints_a_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATCHLAB_DEMO", str(tmp_path / "demo"))
    assert main(["demo", "--categories", "brick", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "brick patchcluster K=25" in out and "brick patchcore" in out
    assert (tmp_path / "demo" / "brick" / "test").is_dir()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--setting", "all"], "invalid choice: 'all'"),
        (["--method", "magic"], "invalid choice: 'magic'"),
        (["--k", "0"], "k must be >= 1"),
        (["--k", "5000", "--method", "patchcluster"], "k=5000 is larger than the bank"),
        (["--k", "30", "--k-max", "20"], "k_max=20 must be >= k=30"),
        (["--category", "carpet"], "category 'carpet' not found"),
    ],
)
def test_bad_arguments_give_clear_errors(tiny_demo, tmp_path, capsys, args, message):
    argv = ["run", str(tiny_demo), "--category", "brick", "--out", str(tmp_path), "--quiet"]
    if "--category" in args:
        argv = argv[:2] + argv[4:]
    try:
        code = main(argv + args)
    except SystemExit as exc:  # argparse's own choices
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_truncated_image_is_named(tiny_demo, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (64, 64)).save(folder / "ok.png")
    (folder / "cut.png").write_bytes((folder / "ok.png").read_bytes()[:50])
    assert main(["run", str(folder), "--unlabeled", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "cut.png" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra",
    [
        ["--method", "padim"],
        ["--method", "spade", "--k-img", "3"],
        ["--method", "spade_cluster", "--k", "4", "--k-img", "3"],
        ["--method", "patchcore_lof", "--k", "5"],
        ["--method", "mutual", "--mutual-ratio", "0.5"],
        ["--method", "patchcluster", "--k", "5", "--coreset", "0.25"],
        ["--method", "patchcore", "--coreset", "0.1", "--exclude", "nearest"],
    ],
)
def test_every_method_runs_from_the_command_line(tiny_demo, tmp_path, extra):
    argv = ["run", str(tiny_demo), "--category", "brick", "--out", str(tmp_path), "--quiet"]
    assert main(argv + extra) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0 <= metrics["pixel_auroc"] <= 1 and 0 <= metrics["pro"] <= 1
    if "--coreset" in extra:
        ratio = float(extra[extra.index("--coreset") + 1])
        assert metrics["n_bank"] == int(metrics["n_patches"] * ratio)
    assert metrics["image_score"] == "top"  # the default rule needs no table: every method has it


def test_coreset_and_lof_bad_arguments(tiny_demo, tmp_path, capsys):
    argv = ["run", str(tiny_demo), "--category", "brick", "--out", str(tmp_path), "--quiet"]
    assert main(argv + ["--coreset", "1.5"]) == 2
    assert "coreset ratio must lie in (0, 1]" in capsys.readouterr().err
    assert main(argv + ["--coreset", "0.01"]) == 2  # mutual scoring reads no table
    assert "method='mutual' reads none: use patchcluster" in capsys.readouterr().err
    argv += ["--method", "patchcluster"]
    assert main(argv + ["--coreset", "0.01", "--k", "100"]) == 2  # 47 patches in the coreset
    assert "--coreset 0.01 keeps 47 patch features, too few" in capsys.readouterr().err
    assert main(argv + ["--method", "patchcore_lof", "--k", "6000"]) == 2
    assert "larger than the bank" in capsys.readouterr().err


def test_missing_weights_file_is_named(tiny_demo, tmp_path, capsys):
    argv = [
        "run",
        str(tiny_demo),
        "--category",
        "brick",
        "--out",
        str(tmp_path),
        "--quiet",
        "--weights",
        str(tmp_path / "nope.pth"),
    ]
    assert main(argv) == 2
    assert "nope.pth does not exist" in capsys.readouterr().err


def test_reproduce_without_the_papers_weights_names_the_file_and_the_way_out(
    tiny_demo, tmp_path, capsys, monkeypatch
):
    """`patchlab reproduce` keeps the paper's backbone; offline its weights are missing."""
    import torch
    import torchvision

    from patchlab.backbones import WRN_IMAGENET_FILE

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    argv = ["reproduce", str(tiny_demo), "--table", "5", "--settings", "ano"]
    assert main([*argv, "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert str(tmp_path / "hub" / "checkpoints" / WRN_IMAGENET_FILE) in err
    assert "--backbone efficientnet_lite0" in err


def test_random_weights_run_and_are_recorded(tiny_demo, tmp_path):
    argv = ["run", str(tiny_demo), "--category", "brick", "--out", str(tmp_path), "--quiet"]
    assert main(argv + ["--weights", "none", "--k", "3"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["weights"] == "none" and metrics["feature_dim"] == 152


def test_the_command_line_sets_the_malloc_thresholds(tiny_demo, tmp_path, monkeypatch):
    """The CLI process tunes glibc's malloc for the backbone's buffers (patchlab.malloc)."""
    import platform

    import patchlab.malloc as malloc

    if platform.libc_ver()[0] == "glibc":
        assert malloc.tune_malloc() is True
    calls = []
    monkeypatch.setattr(malloc, "tune_malloc", lambda: calls.append(1) or True)
    assert main(["demo-data", str(tmp_path / "d"), "--categories", "brick"]) == 0
    assert calls == [1]


def test_no_crop_keeps_the_crop_side():
    """--no-crop resizes straight to the crop side asked for (224 by default), no centre crop:
    the same input size, nothing cut away (it hard-coded 224 whatever --crop said)."""
    from patchlab.cli import _config, build_parser

    base = ["run", "data", "--category", "c", "--out", "o", "--no-crop"]
    for extra, side in (([], 224), (["--crop", "192"], 192)):
        config = _config(build_parser().parse_args([*base, *extra]))
        assert (config.resize, config.crop) == (side, None)
