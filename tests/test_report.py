"""``patchlab run --report`` and ``patchlab report``: the HTML page and the PNG overlays.

The page is checked by reading the figures back out of its ``Plotly.newPlot`` calls (their
traces must hold the run's maps and curves) and the overlays by decoding their pixels against
the run's ``maps.npz``: the map's colour rises with the map, the outline is the mask's border.
"""

from __future__ import annotations

import base64
import csv
import json
import re

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from scipy.stats import spearmanr
from sklearn.metrics import roc_curve

from patchlab.cli import main
from patchlab.report import N_SHOW
from patchlab.viz import MASK_RGB as CYAN


@pytest.fixture(scope="module")
def reported_run(tiny_demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    args = ["run", str(tiny_demo), "--category", "brick", "--setting", "mix", "--k", "5"]
    assert main([*args, "--report", "--out", str(out), "--quiet"]) == 0
    return out


def plotly_figures(page: str) -> list[list[dict]]:
    """The trace lists of every ``Plotly.newPlot(id, traces, layout, config)`` on a page."""
    decoder = json.JSONDecoder()
    figures = []
    for call in re.finditer(r'Plotly\.newPlot\(\s*"[^"]+",\s*', page):
        traces, _ = decoder.raw_decode(page, call.end())
        figures.append(traces)
    return figures


def array(value) -> np.ndarray:
    """A trace array as plotly writes it: a list, or ``{"dtype", "bdata", "shape"}``."""
    if isinstance(value, dict):
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        shape = value.get("shape")
        if shape is None:
            return flat
        dims = [int(x) for x in str(shape).split(",")]
        return flat.reshape(dims)
    return np.asarray(value, dtype=float)


def test_report_files_and_page(reported_run):
    out = reported_run
    page = (out / "report.html").read_text()
    # offline: plotly.js is inline exactly once and nothing is fetched from the network
    assert page.count("plotly.js v") == 1
    assert not re.search(r"<script[^>]+src=", page)
    with np.load(out / "maps.npz") as z:
        maps = {key: z[key] for key in z.files}
    order = np.argsort(-maps["image_scores"], kind="stable")
    shown = order[:N_SHOW]
    assert (maps["shown"] == shown).all()
    figures = plotly_figures(page)
    assert len(figures) == 4  # overlays, image ROC, pixel ROC, PRO
    grid = figures[0]
    assert len(grid) == 3 * len(shown)  # image, map, mask outline per cell
    for j, i in enumerate(shown):
        image, heat, contour = grid[3 * j : 3 * j + 3]
        assert image["type"] == "image" and image["source"].startswith("data:image/png;base64,")
        assert heat["type"] == "heatmap" and contour["type"] == "contour"
        np.testing.assert_allclose(array(heat["z"]), maps["maps"][i][::2, ::2], rtol=1e-6)
        np.testing.assert_array_equal(array(contour["z"]), maps["masks"][i][::2, ::2])
    # the image ROC is sklearn's curve of the stored scores
    fpr, tpr, _ = roc_curve(maps["labels"], maps["image_scores"], drop_intermediate=False)
    curve = figures[1][0]
    np.testing.assert_allclose(array(curve["x"]), fpr)
    np.testing.assert_allclose(array(curve["y"]), tpr)
    # the metrics table shows metrics.json
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"<td>{metrics['pixel_auroc']:.3f}</td>" in page


def test_overlays_show_the_maps_and_the_defects(reported_run):
    out = reported_run
    with np.load(out / "maps.npz") as z:
        maps = {key: z[key] for key in z.files}
    with open(out / "image_scores.csv") as f:
        ranked = [row["path"] for row in csv.DictReader(f)]
    files = sorted((out / "overlays").glob("*.png"))
    assert len(files) == min(N_SHOW, len(ranked))
    low, high = float(maps["maps"].min()), float(maps["maps"].max())
    n_defective = 0
    for rank, (path, i) in enumerate(zip(files, maps["shown"], strict=True)):
        # named by rank, folder and stem, in the order of image_scores.csv
        assert path.name.startswith(f"{rank + 1:02d}_")
        assert path.stem.endswith(
            f"{ranked[rank].split('/')[-2]}_{ranked[rank].split('/')[-1][:-4]}"
        )
        png = np.asarray(Image.open(path).convert("RGB")).astype(np.float32)
        picture = maps["shown_images"][rank].astype(np.float32)
        mask = maps["masks"][i].astype(bool)
        assert png.shape == picture.shape
        cyan = (png == CYAN).all(-1)
        if mask.any():
            # the outline: every border pixel of the mask is cyan, and cyan lies only near it
            border = mask & ~ndimage.binary_erosion(mask, border_value=0)
            assert cyan[border].all()
            assert not (cyan & ~ndimage.binary_dilation(border, iterations=2)).any()
        else:
            assert not cyan.any()
        # the map's colour, recovered from the blend, brightens as the map rises (Inferno)
        colour = 2 * png - picture
        level = (maps["maps"][i] - low) / (high - low)
        keep = ~ndimage.binary_dilation(cyan, iterations=1)
        rho = spearmanr(colour.sum(-1)[keep], level[keep]).statistic
        assert rho > 0.98, path.name
        if mask.any():
            n_defective += 1
            # the defects are where the colour is hottest: pretrained features localise them
            assert colour.sum(-1)[mask & keep].mean() > colour.sum(-1)[~mask & keep].mean()
    assert n_defective >= 2


def test_report_command_redraws_a_finished_run(reported_run, tmp_path, capsys):
    out = tmp_path / "copy"
    out.mkdir()
    for name in ("maps.npz", "metrics.json", "image_scores.csv"):
        (out / name).write_bytes((reported_run / name).read_bytes())
    assert main(["report", str(out), "--quiet"]) == 0
    assert "report.html" in capsys.readouterr().out
    # the same pictures as the run's own report, without the data folder or the cache
    for path in sorted((reported_run / "overlays").glob("*.png")):
        again = np.asarray(Image.open(out / "overlays" / path.name))
        np.testing.assert_array_equal(again, np.asarray(Image.open(path)))
    assert len(plotly_figures((out / "report.html").read_text())) == 4


def test_report_of_an_unlabelled_run_has_no_curves(tiny_demo, tmp_path):
    folder = tiny_demo / "brick" / "test" / "good"
    out = tmp_path / "run"
    assert (
        main(
            [
                "run",
                str(folder),
                "--unlabeled",
                "--k",
                "2",
                "--report",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    page = (out / "report.html").read_text()
    figures = plotly_figures(page)
    assert len(figures) == 1 and len(figures[0]) == 3 * 3
    assert len(list((out / "overlays").glob("*.png"))) == 3
    # said as an unlabelled folder: no MVTec setting or category, no rows of n/a metrics
    head = page[page.index("<h1>") : page.index("<h2>")]  # the settings and the metrics
    assert "An unlabelled folder: the images ranked by score, no AUROC or PRO" in head
    assert "setting=" not in head and "category=" not in head and "n/a" not in head
    assert "<h2>The 3 most anomalous images</h2>" in page  # was 3 for any run (a reused name)


def test_report_heading_counts_the_images_shown(reported_run):
    with np.load(reported_run / "maps.npz") as z:
        n_shown = len(z["shown"])
    page = (reported_run / "report.html").read_text()
    assert n_shown != 3 and f"<h2>The {n_shown} most anomalous images</h2>" in page


def test_report_of_a_folder_without_a_run_names_it(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "maps.npz") in err and "--out folder of a patchlab run" in err


@pytest.mark.parametrize(
    "name, damage, message",
    [
        ("maps.npz", b"PK\x03\x04 truncated", "maps.npz cannot be read"),
        ("metrics.json", b'{"image_auroc": 1.0,', "metrics.json is not valid JSON"),
        # issue 21: before, a Python traceback, or a message about allow_pickle
        ("metrics.json", b"[1, 2]", "metrics.json holds list, not a run's metrics"),
        ("metrics.json", b"null", "metrics.json holds NoneType, not a run's metrics"),
        ("maps.npz", bytes(range(256)) * 8, "maps.npz cannot be read (not an .npz archive)"),
    ],
)
def test_report_of_a_damaged_run_names_the_file(
    reported_run, tmp_path, capsys, name, damage, message
):
    out = tmp_path / "copy"
    out.mkdir()
    for file in ("maps.npz", "metrics.json"):
        (out / file).write_bytes((reported_run / file).read_bytes())
    (out / name).write_bytes(damage)
    assert main(["report", str(out), "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not (out / "report.html").exists() and not list(out.glob(".report-*"))


def test_report_with_shown_indices_out_of_range_names_the_file(reported_run, tmp_path, capsys):
    """Issue 21: before, an IndexError traceback."""
    out = tmp_path / "copy"
    out.mkdir()
    (out / "metrics.json").write_bytes((reported_run / "metrics.json").read_bytes())
    with np.load(reported_run / "maps.npz") as z:
        maps = {key: z[key] for key in z.files}
    maps["shown"] = np.array([0, len(maps["paths"]) + 5])
    np.savez(out / "maps.npz", **maps)
    assert main(["report", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'shown' must index its" in err
