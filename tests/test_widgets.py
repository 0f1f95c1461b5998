"""Widgets and figures, without a browser: controls are set in Python, figures compared with
direct calls of the scoring functions."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("ipywidgets")
pytest.importorskip("plotly")

from patchlab import viz  # noqa: E402
from patchlab.config import PAPER_SETTINGS, RunConfig  # noqa: E402
from patchlab.experiment import rescore, run  # noqa: E402
from patchlab.methods import score_patches  # noqa: E402
from patchlab.metrics import (  # noqa: E402
    image_auroc,
    pixel_auroc,
    pixel_roc_curve,
    pro_curve,
    roc_curve,
)


@pytest.fixture(scope="module")
def result(tiny_demo):
    config = RunConfig(
        data=str(tiny_demo), category="brick", setting="test", k=3, k_max=20, **PAPER_SETTINGS
    )
    return run(config, progress=False)


def _area(x, y) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2)


def _expected(result, **changes):
    direct = rescore(replace(result.config, **changes), result.images, result.inputs, result.masks)
    return direct, np.argsort(-direct.image_scores, kind="stable")


def _assert_figure_shows(widget, direct, order):
    stride = widget.stride
    assert list(widget.shown) == list(order[: widget.n_show])
    for j, i in enumerate(widget.shown):
        _, heat, mask = (widget.figure.data[t] for t in viz.cell_traces(j))
        np.testing.assert_array_equal(heat.z, direct.maps[i][::stride, ::stride])
        np.testing.assert_array_equal(mask.z, direct.masks[i][::stride, ::stride])
    np.testing.assert_array_equal(widget.result.image_scores, direct.image_scores)


def test_import_patchlab_does_not_import_widgets():
    code = "import sys, patchlab; print('ipywidgets' in sys.modules or 'plotly' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_explore_opens_the_scoring_widget(result):
    import patchlab
    from patchlab.widgets import ScoringWidget

    widget = patchlab.explore(result, n_show=4)
    assert isinstance(widget, ScoringWidget)
    assert widget.k.max == 20 and widget.k.value == 3
    _assert_figure_shows(widget, *_expected(result))
    assert "brick/test" in widget.status.value
    assert "patchcluster, K = 3: image AUROC" in widget.status.value  # what it shows
    widget.method.value = "patchcore"
    assert "patchcore: image AUROC" in widget.status.value and "K =" not in widget.status.value
    assert widget._repr_mimebundle_()  # displayable


def test_k_slider_rescores_from_the_stored_table(result, monkeypatch):
    from patchlab import bank, knn
    from patchlab.widgets import explore

    widget = explore(result, n_show=6)
    before = widget.figure.data[1].z.copy()

    def no_knn(*args, **kwargs):
        raise AssertionError("moving K must not compute the neighbour table")

    monkeypatch.setattr(knn, "knn", no_knn)
    monkeypatch.setattr(bank, "knn", no_knn)
    widget.k.value = 12
    direct, order = _expected(result, k=12)
    _assert_figure_shows(widget, direct, order)
    assert not np.array_equal(before, widget.figure.data[1].z) or order[0] != 0
    # the patch scores are exactly score_patches' on the same table
    flat = score_patches("patchcluster", result.inputs, 12)
    np.testing.assert_array_equal(widget.result.patch_scores.reshape(-1), flat)
    assert widget.rescore_ms < 1000


def test_method_and_image_score_dropdowns(result):
    from patchlab.widgets import explore

    widget = explore(result, n_show=5)
    assert not widget.k.disabled
    widget.method.value = "patchcore"
    assert widget.k.disabled  # K changes nothing for PatchCore: the slider says so
    _assert_figure_shows(widget, *_expected(result, method="patchcore"))
    widget.image_score.value = "max"
    _assert_figure_shows(widget, *_expected(result, method="patchcore", image_score="max"))


def test_pixel_metrics_shown_at_first_where_masks_exist(result):
    """The first view shows pixel AUROC and PRO when the set has masks (it said "n/a" with
    the box off); unticked, the line says so; an unlabelled set says n/a."""
    from patchlab.widgets import explore

    widget = explore(result, n_show=2)
    assert widget.pixel.value
    for key in ("pixel_auroc", "pro", "image_auroc"):
        assert widget.result.metrics[key] == pytest.approx(result.metrics[key]), key
    assert f"pixel AUROC {result.metrics['pixel_auroc']:.3f}, PRO" in widget.status.value
    widget.pixel.value = False
    assert widget.result.metrics["pixel_auroc"] is None
    assert "pixel AUROC and PRO: tick the box" in widget.status.value
    assert widget.result.metrics["image_auroc"] == result.metrics["image_auroc"]
    widget.pixel.value = True
    assert widget.result.metrics["pro"] == pytest.approx(result.metrics["pro"])
    assert not explore(result, n_show=2, pixel_metrics=False).pixel.value  # asked for: kept


def test_tiles_are_titled_with_their_file_names(result):
    from patchlab.widgets import explore

    widget = explore(result, n_show=4)
    titles = [a.text for a in widget.figure.layout.annotations[:4]]
    for rank, (title, i) in enumerate(zip(titles, widget.shown, strict=True)):
        path = result.images.paths[i]
        label = "(defect)" if result.images.labels[i] == 1 else "(good)"
        assert title.startswith(f"#{rank + 1} {path.parent.name}/{path.name} {label} "), title
    widget.k.value = 7  # redrawn in place: the titles follow the new order
    i = widget.shown[0]
    assert widget.figure.layout.annotations[0].text.startswith(
        f"#1 {result.images.paths[i].parent.name}/{result.images.paths[i].name}"
    )


def test_setting_change_prepares_once_and_caches(result, monkeypatch):
    from patchlab.widgets import scoring as widgets

    widget = widgets.explore(result, n_show=8)
    calls = []
    real = widgets.prepare
    monkeypatch.setattr(widgets, "prepare", lambda *a, **k: calls.append(1) or real(*a, **k))
    widget.setting.value = "ano"  # 3 defective images: the grid shrinks to 3 cells
    assert len(calls) == 1 and len(widget.figure.data) == 3 * 3
    images, inputs, masks = widget.prepared[("efficientnet_lite0", "brick", "ano")]
    direct = rescore(replace(result.config, setting="ano"), images, inputs, masks)
    _assert_figure_shows(widget, direct, np.argsort(-direct.image_scores, kind="stable"))
    assert widget.result.metrics["image_auroc"] is None  # every image is defective
    widget.setting.value = "test"
    widget.setting.value = "ano"
    assert len(calls) == 1  # cached per (backbone, category, setting)


def test_backbone_dropdown_reports_missing_weights_and_keeps_the_view(
    result, monkeypatch, tmp_path
):
    import torch
    import torchvision

    from patchlab.widgets import explore

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    widget = explore(result, n_show=4)
    before = widget.result
    widget.backbone.value = "wide_resnet50_2"
    assert "--backbone efficientnet_lite0" in widget.status.value
    assert widget.result is before  # the last good view stays
    widget.backbone.value = "efficientnet_lite0"
    _assert_figure_shows(widget, *_expected(result))


def test_neighbour_explorer_reads_the_table(result):
    pytest.importorskip("umap")
    from patchlab.widgets import NeighbourExplorer, default_queries

    queries = default_queries(result)
    labels = result.images.labels
    hw = result.patch_scores[0].numel()
    assert labels[queries["anomalous patch"] // hw] == 1
    assert labels[queries["normal patch"] // hw] == 0
    explorer = NeighbourExplorer(result, k=5, n_background=200)
    # it opens on Fig. 5's anomalous patch, and its dropdown says so
    assert explorer.query == queries["anomalous patch"]
    assert explorer.picker.label == "anomalous patch"
    assert explorer.hover_image.value  # a picture from the start, not a broken-image icon
    for name in ("normal patch", "anomalous patch"):
        row = queries[name]
        explorer.picker.value = row
        idx = result.inputs.neighbours.indices[row, :5].numpy()
        assert explorer.query == row and explorer.picker.label == name
        assert list(explorer.umap_figure.data[-2].customdata) == list(idx)
        assert len(explorer.crops_figure.data) == 6  # the query and its 5 neighbours
    # a click elsewhere: the dropdown names the clicked patch, the crops and marker follow
    before = [t.source for t in explorer.crops_figure.data]
    other = queries["anomalous patch"] + 1
    explorer.select(other)
    assert explorer.picker.label.startswith("clicked: ") and explorer.query == other
    assert [t.source for t in explorer.crops_figure.data] != before
    i, r, c = explorer.position(other)
    marker = explorer.image_figure.data[2]
    assert (marker.x[0], marker.y[0]) == (c * 8 + 3.5, r * 8 + 3.5)


def test_overlay_grid_data_equal_inputs():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (3, 16, 16, 3), dtype=np.uint8)
    maps = rng.random((3, 16, 16)).astype(np.float32)
    masks = (rng.random((3, 16, 16)) > 0.8).astype(np.uint8)
    fig = viz.overlay_grid(list(images), maps, ["a", "b", "c"], masks, cols=2, stride=1)
    assert len(fig.data) == 9
    for j in range(3):
        _, heat, mask = (fig.data[t] for t in viz.cell_traces(j))
        np.testing.assert_array_equal(heat.z, maps[j])
        np.testing.assert_array_equal(mask.z, masks[j])
        assert (heat.zmin, heat.zmax) == pytest.approx(viz.map_range(maps))
    assert [a.text for a in fig.layout.annotations] == ["a", "b", "c"]


def test_curve_figures_equal_the_metrics():
    rng = np.random.default_rng(1)
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = rng.random(6)
    fpr, tpr = roc_curve(labels, scores)
    assert _area(fpr, tpr) == pytest.approx(image_auroc(labels, scores))
    fig = viz.roc_figure({"m": (fpr, tpr)})
    np.testing.assert_array_equal(fig.data[0].x, fpr)
    np.testing.assert_array_equal(fig.data[0].y, tpr)

    masks = np.zeros((2, 8, 8), np.uint8)
    masks[1, 2:5, 2:5] = 1
    maps = rng.random((2, 8, 8)).astype(np.float32)
    pf, pt = pixel_roc_curve(masks, maps)
    assert _area(pf, pt) == pytest.approx(pixel_auroc(masks, maps))
    f, p = pro_curve(masks, maps)
    fig = viz.pro_figure({"m": (f, p)})
    np.testing.assert_array_equal(fig.data[0].y, p)
    assert tuple(fig.layout.xaxis.range) == (0, 0.3)
    with pytest.raises(ValueError, match="single class"):
        roc_curve(np.ones(3, int), np.arange(3.0))


def test_decimate_keeps_ends():
    x = np.linspace(0, 1, 10_001)
    xs, ys = viz.decimate(x, x**2, 100)
    assert len(xs) <= 100 and xs[0] == 0 and xs[-1] == 1
    np.testing.assert_array_equal(ys, xs**2)


def test_k_sweep_and_umap_figures():
    fig = viz.k_sweep_figure([1, 5, 25], {"pixel AUROC": [0.8, 0.9, None]})
    assert list(fig.data[0].x) == [1, 5, 25]
    assert np.isnan(fig.data[0].y[2]) and fig.data[0].y[1] == 0.9
    emb = np.arange(8.0).reshape(4, 2)
    fig = viz.umap_figure(emb, ["bank", "bank", "query", "bank"], list("abcd"), [7, 8, 9, 10])
    assert [t.name for t in fig.data] == ["bank", "query"]
    np.testing.assert_array_equal(fig.data[0].x, emb[[0, 1, 3], 0])
    assert list(fig.data[1].customdata) == [9] and list(fig.data[1].text) == ["c"]


def test_patch_crop_and_receptive_field_figure():
    image = np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)
    crop = viz.patch_crop(image, 1, 1, size=8)
    np.testing.assert_array_equal(crop, image[8:16, 8:16])
    assert viz.patch_crop(image, 0, 0, size=32).shape == (32, 32, 3)  # zero padded
    fig = viz.receptive_field_figure(image, np.ones((32, 32)), (0, 0, 20, 20), 1, 1)
    box = fig.data[2]
    assert max(box.x) == 19.5 and min(box.y) == -0.5


def test_receptive_field_grows_with_the_patch_position():
    import torch

    from patchlab.backbones import build_backbone
    from patchlab.features import receptive_field

    model = build_backbone("efficientnet_lite0", "imagenet")
    x = torch.randn(3, 224, 224)
    weight, (top, left, bottom, right) = receptive_field(model, x, 14, 14, dim=152)
    assert weight.shape == (224, 224) and weight.max() == pytest.approx(1.0)
    assert top < 14 * 8 < 15 * 8 < bottom and left < 14 * 8 < 15 * 8 < right
    assert weight[14 * 8 : 15 * 8, 14 * 8 : 15 * 8].mean() > weight.mean()


def test_export_png_writes_a_png(tmp_path):
    pytest.importorskip("kaleido")
    fig = viz.k_sweep_figure([1, 10], {"x": [0.1, 0.2]})
    path = viz.export_png(fig, tmp_path / "sub" / "sweep.png", width=300, height=200)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_a_k_free_method_is_scored_once(result, monkeypatch):
    """Mutual scoring ignores K: the widget keeps its scores, so changing the image score
    re-scores without computing it again, and shows what a direct rescore shows."""
    from patchlab import methods
    from patchlab.widgets import explore

    calls = []
    original = methods.METHODS["mutual"]
    counted = replace(original, fn=lambda *a, **kw: calls.append(1) or original.fn(*a, **kw))
    monkeypatch.setitem(methods.METHODS, "mutual", counted)
    widget = explore(result, n_show=4, methods=("patchcluster", "mutual"))
    widget.method.value = "mutual"
    assert len(calls) == 1
    widget.image_score.value = "top"
    assert len(calls) == 1  # kept
    _assert_figure_shows(widget, *_expected(result, method="mutual", image_score="top"))


def test_an_unlabelled_set_opens_with_pixel_metrics_off(tiny_demo):
    from patchlab.widgets import explore

    config = RunConfig(
        data=str(tiny_demo / "brick" / "test"), unlabeled=True, k=3, k_max=5, **PAPER_SETTINGS
    )
    widget = explore(run(config, progress=False), n_show=3)
    assert not widget.pixel.value
    assert "image AUROC n/a, pixel AUROC n/a, PRO n/a" in widget.status.value
    title = widget.figure.layout.annotations[0].text
    assert "(good)" not in title and "(defect)" not in title  # unknown labels: none said
