"""The scoring widget: K, method, image score, setting, category and backbone; anomaly-map
overlays of the most anomalous images.

Moving K or changing the method only re-scores: the callback calls
:func:`patchlab.experiment.rescore` on the stored neighbour table, never a new kNN. A new
setting, category or backbone needs new features and a new table: they are computed on first
use (:func:`patchlab.experiment.prepare`, with a progress bar) and kept.
"""

from __future__ import annotations

import html
import time
from dataclasses import replace

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go
import torch

import patchlab.viz as viz
from patchlab.backbones import BACKBONES
from patchlab.config import RunConfig
from patchlab.data import BLIND_SETTINGS, ImageSet
from patchlab.experiment import Result, prepare, rescore
from patchlab.images import load_display
from patchlab.maps import IMAGE_SCORES
from patchlab.methods import ScoringInputs
from patchlab.metrics import evaluate_pixels, format_metric
from patchlab.widgets._base import Displays

TABLE_METHODS = ("patchcluster", "patchcore", "patchcore_lof")
K_FREE_METHODS = ("patchcore", "padim", "spade", "mutual")  # methods whose scores ignore K
Prepared = tuple[ImageSet, ScoringInputs, np.ndarray]


class ScoringWidget(Displays):
    """Anomaly maps of the most anomalous images, re-scored as the controls move.

    Parameters
    ----------
    config : RunConfig
        The starting point; its ``table_k`` (``k_max``) bounds the K slider.
    categories : category names offered (default: the config's category only)
    methods : methods offered (default: the neighbour-table methods, which re-score in ms)
    n_show : images shown, the most anomalous first
    cols : images per row
    stride : show every ``stride``-th pixel of the maps
    pixel_metrics : pixel AUROC and PRO on or off at the start; None (default): on when the
        first set has masks. They sort every pixel of the set (about 1 s per 100 images here),
        after the figure is drawn, so the maps never wait for them.
    prepared : {(backbone, category, setting): (images, inputs, masks)} already computed

    Attributes
    ----------
    result : Result
        The last re-score; the figure shows ``result.maps[shown]``.
    shown : np.ndarray, shape (<= n_show,)
        Image indices in the figure, by descending image score.
    rescore_ms : float
        Wall time of the last :func:`rescore` call, in milliseconds.
    figure : plotly.graph_objects.FigureWidget
        The :func:`patchlab.viz.overlay_grid` of the shown images.
    """

    def __init__(
        self,
        config: RunConfig,
        *,
        categories: list[str] | None = None,
        methods: tuple[str, ...] = TABLE_METHODS,
        n_show: int = 8,
        cols: int = 4,
        stride: int = 2,
        pixel_metrics: bool | None = None,
        prepared: dict[tuple[str, str | None, str], Prepared] | None = None,
    ) -> None:
        self.base = config
        self.n_show, self.cols, self.stride = n_show, cols, stride
        self.prepared: dict[tuple[str, str | None, str], Prepared] = dict(prepared or {})
        self._kept: dict[tuple, torch.Tensor] = {}  # scores of K-free methods, per prepared set
        self._uris: dict[str, str] = {}
        self._pixel_auto = pixel_metrics is None  # decided by the first set's masks
        if config.method not in methods:
            methods = (config.method, *methods)
        self._make_controls(config, methods, categories or [config.category], pixel_metrics)
        self.status = W.HTML()
        self.log = W.Output()  # progress bars of prepare() appear here
        self.figure = go.FigureWidget()
        self.widget = W.VBox(
            [
                W.HBox([self.category, self.setting, self.backbone]),
                W.HBox([self.method]),
                W.HBox([self.k, self.image_score, self.pixel]),
                self.status,
                self.log,
                self.figure,
            ]
        )
        for control in self.controls:
            control.observe(self._changed, names="value")
        self.update()

    def _make_controls(self, config, methods, categories, pixel_metrics) -> None:
        """The sliders, dropdowns and the checkbox, set from ``config``."""
        style = {"description_width": "initial"}
        self.k = W.IntSlider(
            value=config.k,
            min=1,
            max=config.table_k,
            description="K",
            continuous_update=False,
            style=style,
        )
        self.method = W.Dropdown(options=list(methods), value=config.method, description="method")
        self.image_score = W.Dropdown(
            options=list(IMAGE_SCORES), value=config.image_score, description="image score"
        )
        self.setting = W.Dropdown(
            options=list(BLIND_SETTINGS), value=config.setting, description="setting"
        )
        self.category = W.Dropdown(
            options=categories, value=config.category, description="category"
        )
        self.backbone = W.Dropdown(
            options=list(BACKBONES), value=config.backbone, description="backbone"
        )
        self.pixel = W.Checkbox(
            value=bool(pixel_metrics), description="pixel AUROC and PRO", style=style
        )
        self.controls = (
            self.k,
            self.method,
            self.image_score,
            self.pixel,
            self.setting,
            self.category,
            self.backbone,
        )

    @classmethod
    def from_result(cls, result: Result, **kwargs) -> ScoringWidget:
        """A widget that starts from a run's result (its features and table are reused)."""
        key = (result.config.backbone, result.config.category, result.config.setting)
        prepared = {key: (result.images, result.inputs, result.masks)}
        config = result.config
        if result.inputs.neighbours is not None and config.k_max != result.inputs.neighbours.k:
            config = replace(config, k_max=result.inputs.neighbours.k)
        return cls(config, prepared=prepared, **kwargs)

    def config(self) -> RunConfig:
        """The run configuration the controls describe."""
        return replace(
            self.base,
            k=int(self.k.value),
            method=self.method.value,
            image_score=self.image_score.value,
            setting=self.setting.value,
            category=self.category.value,
            backbone=self.backbone.value,
            k_max=max(self.base.table_k, int(self.k.value)),
        )

    def inputs(self, backbone: str, category: str | None, setting: str) -> Prepared:
        """Images, scoring inputs and masks of (backbone, category, setting); computed on
        first use."""
        key = (backbone, category, setting)
        if key not in self.prepared:
            config = replace(self.config(), backbone=backbone, category=category, setting=setting)
            self.status.value = (
                f"computing {backbone} features and neighbours for {category}/{setting}..."
            )
            with self.log:
                images, inputs, masks, _ = prepare(config, progress=True)
            self.log.clear_output()
            self.prepared[key] = (images, inputs, masks)
        return self.prepared[key]

    def _changed(self, change) -> None:
        self.update()

    def update(self) -> None:
        """Re-score with the controls' values and redraw the figure."""
        # K has no effect on PatchCore (its one nearest neighbour): the slider says so
        self.k.disabled = self.method.value in K_FREE_METHODS
        config = self.config()
        try:
            images, inputs, masks = self.inputs(config.backbone, config.category, config.setting)
        except (RuntimeError, ValueError, FileNotFoundError) as err:  # e.g. weights offline
            self.status.value = f"<span style='color:#b00'>{html.escape(str(err))}</span>"
            return
        if self._pixel_auto:  # the first view shows the pixel metrics where masks exist
            self._pixel_auto = False
            self.pixel.unobserve(self._changed, names="value")
            self.pixel.value = bool(masks.any())
            self.pixel.observe(self._changed, names="value")
        t0 = time.perf_counter()
        # a method that ignores K is scored once per prepared set (mutual scoring takes seconds)
        memo = (config.backbone, config.category, config.setting, config.method)
        kept = self._kept.get(memo) if config.method in K_FREE_METHODS else None
        result = rescore(config, images, inputs, masks, pixel_metrics=False, patch_scores=kept)
        if config.method in K_FREE_METHODS:
            self._kept[memo] = result.patch_scores.reshape(-1)
        self.rescore_ms = (time.perf_counter() - t0) * 1e3
        self.result = result
        self.shown = np.argsort(-result.image_scores, kind="stable")[: self.n_show]
        self._draw(result)
        self.update_ms = (time.perf_counter() - t0) * 1e3
        if not (images.has_labels and masks.any()):
            self.status.value = self._summary(result)  # no masks: n/a
        elif not self.pixel.value:
            self.status.value = self._summary(result, "off")
        else:  # after the figure: the maps never wait for the sort of every pixel
            self.status.value = self._summary(result, "pending")
            result.metrics |= evaluate_pixels(masks, result.maps)  # one sort for both
            self.status.value = self._summary(result)

    def _draw(self, result: Result) -> None:
        zrange = viz.map_range(result.maps)
        titles = [self._title(result, rank, i) for rank, i in enumerate(self.shown)]
        pictures = [self._display(result.images.paths[i]) for i in self.shown]
        if len(self.figure.data) != 3 * len(self.shown):  # first draw, or a new image count
            fig = viz.overlay_grid(
                pictures,
                result.maps[self.shown],
                titles,
                result.masks[self.shown],
                self.cols,
                zrange,
                self.stride,
            )
            self.figure = go.FigureWidget(fig)
            self.widget.children = (*self.widget.children[:-1], self.figure)
            return
        with self.figure.batch_update():
            for j, i in enumerate(self.shown):
                image, heat, mask = (self.figure.data[t] for t in viz.cell_traces(j))
                image.source = self._uri(self.result.images.paths[self.shown[j]])
                heat.z = result.maps[i][:: self.stride, :: self.stride]
                heat.zmin, heat.zmax = zrange
                mask.z = result.masks[i][:: self.stride, :: self.stride].astype(np.float32)
                self.figure.layout.annotations[j].text = titles[j]

    def _display(self, path) -> np.ndarray:
        """An image as the model sees it (the shared display cache)."""
        return load_display(path, self.base.resize, self.base.crop)

    def _uri(self, path) -> str:
        """Its PNG data URI, kept: re-encoding every shown image at each update is slow."""
        key = str(path)
        if key not in self._uris:
            self._uris[key] = viz.data_uri(self._display(path))
        return self._uris[key]

    @staticmethod
    def _title(result: Result, rank: int, i: int) -> str:
        images = result.images
        return viz.tile_title(rank, images.paths[i], images.labels[i], result.image_scores[i])

    def _summary(self, result: Result, pixels: str = "done") -> str:
        """The status line. ``pixels``: ``"pending"`` (being computed), ``"off"`` (the box
        unticked) or ``"done"`` (computed, or n/a where the set has no masks)."""
        m = result.metrics

        said = {
            "pending": "pixel AUROC and PRO: computing…",
            "off": "pixel AUROC and PRO: tick the box",
            "done": f"pixel AUROC {format_metric(m['pixel_auroc'])}, PRO {format_metric(m['pro'])}",
        }[pixels]
        note = ""
        if result.config.weights == "none":
            note = " (random weights: the numbers show the pipeline, not the paper's)"
        config = result.config
        k = "" if config.method in K_FREE_METHODS else f", K = {config.k}"
        return (
            f"<b>{result.images.name}</b>, {m['n_images']} images, {m['n_patches']} patches; "
            f"{config.method}{k}: image AUROC {format_metric(m['image_auroc'])}, {said}; "
            f"re-scored in {self.rescore_ms:.0f} ms "
            f"(figure {self.update_ms - self.rescore_ms:.0f} ms){note}"
        )


def explore(result: Result, **kwargs) -> ScoringWidget:
    """Open the scoring widget on a run's result: ``patchlab.explore(run(config))``.

    Keyword arguments go to :class:`ScoringWidget` (``n_show``, ``cols``, ``categories``...).
    """
    return ScoringWidget.from_result(result, **kwargs)
