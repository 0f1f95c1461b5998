"""Bad inputs and faults, one test per row of docs/reliability.md: each asserts the one-line
message (naming the file or argument) or the recovered result."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchlab.cli import main
from patchlab.data import load_mvtec
from patchlab.images import load_masks

RUN = ["run", "--category", "brick", "--k", "3", "--quiet"]


@pytest.fixture
def demo(tiny_demo, tmp_path) -> Path:
    """A private copy of the tiny demo data set, free to damage."""
    root = tmp_path / "data"
    shutil.copytree(tiny_demo, root)
    return root


def run_cli(data: Path, out: Path, *extra: str) -> int:
    return main([RUN[0], str(data), *RUN[1:], "--out", str(out), *extra])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# --- bad images and masks --------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage, message",
    [
        ("empty", "it is empty (0 bytes)"),
        ("text", "cannot read image"),
        ("truncated", "cannot read image"),
    ],
)
def test_a_bad_defective_image_is_named(demo, tmp_path, capsys, damage, message):
    bad = demo / "brick" / "test" / "hole" / "000.png"
    data = bad.read_bytes()
    bad.write_bytes({"empty": b"", "text": b"not an image\n", "truncated": data[:60]}[damage])
    assert run_cli(demo, tmp_path / "out") == 2
    err = one_line_error(capsys)
    assert str(bad) in err and message in err


def test_a_decompression_bomb_is_named(demo, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # every 256 x 256 image is a "bomb"
    assert run_cli(demo, tmp_path / "out") == 2
    err = one_line_error(capsys)
    assert "larger than PIL's safety limit" in err and ".png" in err


@pytest.mark.parametrize("kind", ["0/1", "0/255", "RGB red"])
def test_masks_in_any_two_level_encoding(demo, kind):
    images = load_mvtec(demo, "brick", "ano")
    path = images.mask_paths[0]
    reference = load_masks(images.subset([0]))[0]
    level = np.asarray(Image.open(path).convert("L")) >= 128
    if kind == "0/1":
        Image.fromarray(level.astype(np.uint8)).save(path)
    elif kind == "RGB red":
        rgb = np.zeros((*level.shape, 3), np.uint8)
        rgb[level, 0] = 255
        Image.fromarray(rgb).save(path)
    got = load_masks(images.subset([0]))[0]
    assert got.any() and np.array_equal(got, reference)


def test_faint_mask_noise_is_not_defect(demo):
    """Compression noise at low levels (as the magnetic-tile masks carry) is not defect."""
    images = load_mvtec(demo, "brick", "ano")
    path = images.mask_paths[0]
    clean = load_masks(images.subset([0]))[0]
    level = np.asarray(Image.open(path).convert("L"))
    noisy = level.copy()
    noisy[level == 0] = np.random.default_rng(0).integers(0, 20, int((level == 0).sum()))
    Image.fromarray(noisy).save(path)
    assert np.array_equal(load_masks(images.subset([0]))[0], clean)


def test_an_empty_mask_of_a_defective_image_warns_with_its_name(demo):
    images = load_mvtec(demo, "brick", "ano")
    path = images.mask_paths[1]
    Image.fromarray(np.zeros((256, 256), np.uint8)).save(path)
    with pytest.warns(UserWarning, match=f"empty mask.*{path.name}"):
        masks = load_masks(images)
    assert not masks[1].any() and masks[0].any()


def test_an_unreadable_mask_is_named(demo, tmp_path, capsys):
    images = load_mvtec(demo, "brick", "ano")
    images.mask_paths[0].write_bytes(b"")
    assert run_cli(demo, tmp_path / "out") == 2
    err = one_line_error(capsys)
    assert f"cannot read mask {images.mask_paths[0]}" in err


# --- weights files ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, message",
    [
        (b"text, not weights\n", "cannot be read as a torch state dict"),
        (bytes(range(256)) * 8, "cannot be read as a torch state dict"),
        ("pickled-model", "cannot be read as a torch state dict"),
        ("list", "holds a list"),
        ("tensor", "holds a Tensor"),
    ],
)
def test_a_bad_weights_file_is_named(demo, tmp_path, capsys, content, message):
    path = tmp_path / "weights.pth"
    if content == "pickled-model":  # a whole pickled object: refused by weights_only loading
        path.write_bytes(pickle.dumps(torch.nn.Linear(2, 2)))
    elif content == "list":
        torch.save([1, 2, 3], path)
    elif content == "tensor":
        torch.save(torch.zeros(3), path)
    else:
        path.write_bytes(content)
    assert run_cli(demo, tmp_path / "out", "--weights", str(path)) == 2
    err = one_line_error(capsys)
    assert str(path) in err and message in err


# --- folders and arguments -------------------------------------------------------------------


@pytest.mark.parametrize("case", ["existing file", "inside a file", "foreign files"])
def test_a_bad_out_is_found_before_the_work(demo, tmp_path, capsys, monkeypatch, case):
    import patchlab.experiment as experiment

    monkeypatch.setattr(experiment, "prepare", lambda *a, **k: pytest.fail("work was done"))
    target = tmp_path / "a_file"
    target.write_text("x")
    out = {
        "existing file": target,
        "inside a file": target / "out",
        "foreign files": tmp_path / "mine",
    }[case]
    if case == "foreign files":
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
    assert run_cli(demo, out) == 2
    err = one_line_error(capsys)
    assert f"--out {out}" in err
    if case == "foreign files":
        assert (out / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--coreset", "0.0001", "--method", "patchcluster"],
            "--coreset 0.0001 keeps 1 patch features, too few",
        ),
        (["--category", "carpet"], "category 'carpet' not found"),
    ],
)
def test_arguments_that_cannot_work_are_named(demo, tmp_path, capsys, args, message):
    argv = ["run", str(demo), "--out", str(tmp_path / "out"), "--quiet"]
    argv += args if "--category" in args else ["--category", "brick", *args]
    assert main(argv) == 2
    assert message in one_line_error(capsys)


def test_spade_defaults_adapt_to_a_small_set_and_are_recorded(demo, tmp_path):
    assert run_cli(demo, tmp_path / "out", "--method", "spade") == 0  # k_img 50 > 6 - 1
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["k_img"] == 5 and metrics["config"]["k_img"] == 50


def test_ctrl_c_ends_in_one_line_and_exit_130(demo, tmp_path, capsys, monkeypatch):
    import patchlab.experiment as experiment

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "run", interrupted)
    assert run_cli(demo, tmp_path / "out") == 130
    assert "interrupted" in one_line_error(capsys)


# --- the cache -------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
@pytest.mark.parametrize("entry", ["features", "neighbours"])
def test_a_broken_cache_entry_is_replaced(demo, tmp_path, damage, entry):
    from patchlab.config import PAPER_SETTINGS, RunConfig
    from patchlab.experiment import run

    cache = tmp_path / "cache"
    config = RunConfig(
        data=str(demo), category="brick", k=3, cache_dir=str(cache), **PAPER_SETTINGS
    )
    first = run(config, progress=False)
    (path,) = cache.glob(f"{entry}-*")
    data = path.read_bytes()
    path.write_bytes(
        {"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"x" * 999}[damage]
    )
    with pytest.warns(UserWarning, match=f"cache entry {path} is broken"):
        again = run(config, progress=False)
    np.testing.assert_array_equal(again.maps, first.maps)
    assert path.is_file() and path.read_bytes() != b""  # written again


def test_orphan_temporary_files_are_removed(demo, tmp_path):
    from patchlab.config import RunConfig
    from patchlab.experiment import run

    cache = tmp_path / "cache"
    cache.mkdir()
    old, fresh = cache / "tmpabc.tmp", cache / "tmpdef.tmp"
    old.write_bytes(b"half")
    fresh.write_bytes(b"being written")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    run(RunConfig(data=str(demo), category="brick", k=3, cache_dir=str(cache)), progress=False)
    assert not old.exists() and fresh.exists()  # a recent one may belong to a live writer


def test_an_edit_keeping_size_and_mtime_is_seen(demo, tmp_path):
    from patchlab.data import load_mvtec
    from patchlab.features import extract_features

    images = load_mvtec(demo, "brick", "ano")
    before = extract_features(images, cache_dir=tmp_path, progress=False)
    path = images.paths[0]
    stat = os.stat(path)
    pixels = np.asarray(Image.open(path)).copy()
    pixels[:64, :64] = 0  # a visible edit ...
    Image.fromarray(pixels).save(path)
    with open(path, "r+b") as f:  # ... padded or cut back to the same size
        f.truncate(stat.st_size)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size and os.stat(path).st_mtime_ns == stat.st_mtime_ns
    after = extract_features(images, cache_dir=tmp_path, progress=False)
    assert not torch.equal(before[0], after[0]) and torch.equal(before[1:], after[1:])


# --- outputs under interruption --------------------------------------------------------------

KILLED_SAVE = """
import sys, time
from pathlib import Path
import patchlab.outputs as outputs
from patchlab.config import RunConfig
from patchlab.experiment import run

result = run(RunConfig(data=sys.argv[1], category="brick", k=3), progress=False)
write = outputs._write

def slow(result, folder):
    write(result, folder)
    print("written", flush=True)
    time.sleep(60)  # killed here: the new set is complete but not yet in place

outputs._write = slow
outputs.save_result(result, Path(sys.argv[2]))
"""


def test_a_killed_save_keeps_the_previous_run(demo, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(demo, out) == 0
    before = {name: (out / name).read_bytes() for name in ("metrics.json", "maps.npz")}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_SAVE, str(demo), str(out)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PATCHLAB_CACHE": os.environ["PATCHLAB_CACHE"]},
    )
    assert proc.stdout.readline().strip() == "written"
    proc.kill()
    proc.wait()
    assert {name: (out / name).read_bytes() for name in before} == before  # the old set, whole
    assert list(tmp_path.glob(".out.new-*"))  # what the killed save left beside it ...
    assert run_cli(demo, out, "--k", "4") == 0  # ... is cleaned by the next run, which succeeds
    assert [p.name for p in tmp_path.glob(".out.*")] == [".out.lock"]  # the lock file only
    assert json.loads((out / "metrics.json").read_text())["config"]["k"] == 4


def test_a_save_killed_between_its_renames_is_repaired(demo, tmp_path):
    out = tmp_path / "out"
    assert run_cli(demo, out) == 0
    first = (out / "metrics.json").read_text()
    aside = tmp_path / ".out.old-xyz"  # the old set moved aside, the new one not yet in place
    aside.mkdir()
    os.replace(out, aside / "run")
    assert run_cli(demo, out, "--k", "4") == 0
    assert json.loads((out / "metrics.json").read_text())["config"]["k"] == 4
    assert not aside.exists() and first != (out / "metrics.json").read_text()


# --- knn at its public boundary --------------------------------------------------------------


def test_knn_validates_its_inputs():
    from patchlab.knn import knn

    x = torch.randn(50, 4)
    with pytest.raises(ValueError, match="non-empty 2-D"):
        knn(torch.zeros(0, 4), 3, progress=False)
    with pytest.raises(ValueError, match="query_groups must hold one entry per row"):
        knn(x, 3, exclude="image", query_groups=torch.zeros(7, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="torch tensor or numpy array"):
        knn([[1.0, 2.0]], 1, progress=False)
    with pytest.raises(ValueError, match="must hold numbers"):
        knn(torch.ones(5, 2, dtype=torch.bool), 1, progress=False)
    from_numpy = knn(x.numpy(), 3, progress=False)
    assert torch.equal(from_numpy.indices, knn(x, 3, progress=False).indices)


@pytest.mark.parametrize("magnitude", [1e19, 1e-30])
def test_knn_is_exact_at_extreme_magnitudes(magnitude):
    from patchlab.knn import knn

    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(0)) * magnitude
    nb = knn(x, 4, progress=False)
    d = torch.cdist(x.double(), x.double())
    d.fill_diagonal_(float("inf"))
    ref = d.topk(4, largest=False)
    assert torch.isfinite(nb.distances).all() and (nb.indices >= 0).all()
    assert torch.equal(nb.indices.sort(1).values, ref.indices.sort(1).values)
    torch.testing.assert_close(nb.distances.double(), ref.values, rtol=1e-6, atol=0)


def test_an_unknown_method_option_is_an_error_not_dropped():
    from patchlab.methods import ScoringInputs, score_patches

    feats = torch.randn(4, 3, 3, 5)
    with pytest.raises(
        ValueError, match="method 'spade' takes no option ratio; its options: k_img"
    ):
        score_patches(
            "spade", ScoringInputs(feats, global_features=torch.randn(4, 2)), 1, ratio=0.5
        )


# --- numeric options: type and finiteness at the boundary (issue 21) ---------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("k", 2.5, "k must be an integer, got 2.5 (float)"),
        ("k", "5", "k must be an integer, got '5' (str)"),
        ("k", True, "k must be an integer, got True (bool)"),
        ("k_max", 30.0, "k_max must be an integer"),
        ("sigma", float("nan"), "sigma must be a finite number, got nan"),
        ("sigma", float("inf"), "sigma must be a finite number, got inf"),
        ("coreset", "0.5", "coreset must be a finite number"),
    ],
)
def test_run_config_names_a_bad_number(field, value, message):
    """Before: k=2.5 was accepted and failed later naming `b`; k='5' raised a bare TypeError;
    sigma=nan wrote invalid JSON."""
    from patchlab.config import RunConfig

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RunConfig(data="x", **{field: value})
    assert RunConfig(data="x", k=np.int64(5), sigma=np.float32(2.0)).k == 5  # numpy numbers


def test_cli_refuses_sigma_nan(demo, tmp_path, capsys):
    assert run_cli(demo, tmp_path / "out", "--sigma", "nan") != 0
    assert "sigma must be a finite number, got nan" in one_line_error(capsys)
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_a_second_run_into_the_same_out_stops_before_its_work(demo, tmp_path, capsys):
    """Before: two runs into one --out at once, one always failed after all its work (the
    other's clean-up removed its temporary folder). Now the second stops at once, and the lock
    goes with the process that held it."""
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from patchlab.outputs import out_lock\n"
            f"with out_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        t = time.perf_counter()
        assert run_cli(demo, out) != 0
        assert "another patchlab run is writing to --out" in one_line_error(capsys)
        assert time.perf_counter() - t < 5 and not out.exists()  # before any feature work
    finally:
        holder.kill()
        holder.wait()
    assert run_cli(demo, out) == 0  # killed: its lock is gone with it
    assert (out / "metrics.json").is_file()


def test_a_cache_folder_that_is_a_file_fails_before_the_work(demo, tmp_path, capsys):
    """Before: the run failed only after the feature extraction, with a bare OS message."""
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    t = time.perf_counter()
    assert run_cli(demo, tmp_path / "out", "--cache-dir", str(cache)) != 0
    err = one_line_error(capsys)
    assert f"the cache folder {cache} cannot be used" in err and "--cache-dir" in err
    assert time.perf_counter() - t < 10


def test_a_full_disk_while_the_cache_is_written_is_named(demo, tmp_path, capsys, monkeypatch):
    """The cache write fails as on a full disk (ENOSPC from the array writer: no full disk can
    be had here): one line naming the cache file and what to do, no temporary file left."""
    import errno

    import patchlab.cache as cache_module

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cache_module.np, "save", full)
    cache = tmp_path / "cache"
    assert run_cli(demo, tmp_path / "out", "--cache-dir", str(cache)) == 2
    err = one_line_error(capsys)
    assert f"cannot write the cache file {cache}" in err and "No space left on device" in err
    assert "free space there" in err and "--cache-dir" in err
    assert not list(cache.glob("*.tmp")) and not (tmp_path / "out").exists()


def test_cache_files_are_readable_like_run_folders(demo, tmp_path):
    """Before: cache files were created 0600 (mkstemp), so a shared cache broke."""
    old = os.umask(0o022)
    try:
        assert run_cli(demo, tmp_path / "out", "--cache-dir", str(tmp_path / "cache")) == 0
    finally:
        os.umask(old)
    files = list((tmp_path / "cache").glob("*.np*"))
    assert files and all(p.stat().st_mode & 0o777 == 0o644 for p in files)


def test_a_plain_image_folder_without_unlabeled_suggests_it(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a.png")
    assert main(["run", str(folder), "--out", str(tmp_path / "out"), "--quiet"]) != 0
    assert "pass --unlabeled to rank a plain folder of images" in one_line_error(capsys)


def test_a_killed_report_leftover_does_not_block_the_next_run(demo, tmp_path):
    """Before: a killed `patchlab report` left .report-* in the run folder, and every later
    run into it refused ("holds other files")."""
    out = tmp_path / "out"
    assert run_cli(demo, out) == 0
    (out / ".report-x1y2").mkdir()
    (out / ".report-x1y2" / "report.html").write_text("half")
    assert run_cli(demo, out, "--k", "4") == 0
    assert not list(out.glob(".report-*"))


def test_a_rerun_keeps_the_report_drawn_for_its_results(demo, tmp_path):
    """Before: re-running into an --out that held a report deleted the report without a word.
    Now it is drawn again, for the new results."""
    out = tmp_path / "out"
    assert run_cli(demo, out, "--report") == 0
    first = (out / "report.html").read_text()
    with pytest.warns(UserWarning, match="held a report of the run it replaces"):
        assert run_cli(demo, out, "--k", "4") == 0
    second = (out / "report.html").read_text()
    assert second != first and json.loads((out / "metrics.json").read_text())["config"]["k"] == 4
    assert list((out / "overlays").glob("*.png"))


def test_a_one_image_run_warns(demo, tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(next((demo / "brick" / "test" / "good").iterdir()), folder / "a.png")
    one = ["run", str(folder), "--unlabeled", "--method", "patchcluster", "--rscin"]
    with pytest.warns(UserWarning, match="holds one image"):
        assert main([*one, "--k", "3", "--quiet", "--out", str(tmp_path / "out")]) == 0


def test_help_shows_the_defaults_of_none_options(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: the set itself, blind" in text
    assert "default $PATCHLAB_CACHE, else ~/.cache/patchlab" in text
    assert "default: none, all in this process" in text


def test_a_report_killed_between_its_renames_does_not_block_the_next_run(demo, tmp_path):
    """replace_folder leaves `.overlays.old-*` when killed between its renames: the next
    report puts the old overlays back, and the next run is not refused ("other files")."""
    out = tmp_path / "out"
    assert run_cli(demo, out, "--report") == 0
    aside = out / ".overlays.old-x"
    aside.mkdir()
    os.replace(out / "overlays", aside / "run")  # killed: the old overlays aside, none in place
    assert main(["report", str(out), "--quiet"]) == 0
    assert (out / "overlays").is_dir() and not aside.exists()
    (out / ".overlays.old-y").mkdir()
    assert run_cli(demo, out) == 0
    assert not (out / ".overlays.old-y").exists()
