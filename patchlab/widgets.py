"""Interactive explorers (ipywidgets + plotly ``FigureWidget``) on top of the core.

:class:`ScoringWidget`: K slider, method, image score, setting and category; anomaly-map
overlays of the most anomalous images. Moving K or changing the method only re-scores: the
callback calls :func:`patchlab.experiment.rescore` on the stored neighbour table, never a new
kNN. A new setting or category needs new features and a new table: they are computed on first
use (:func:`patchlab.experiment.prepare`, with a progress bar) and kept per (category, setting).

:class:`NeighbourExplorer`: the paper's Fig. 5. A normal and an anomalous patch (dropdown, or
a click on the image), their K nearest neighbours as crops, and a 2-D UMAP of the bank where
hovering a point shows its crop and source image.

``patchlab.explore(result)`` opens the scoring widget on any run's result.
"""

from __future__ import annotations

import html
import time
from dataclasses import replace
from pathlib import Path

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go

from patchlab import viz
from patchlab.backbones import BACKBONES
from patchlab.config import RunConfig
from patchlab.data import SETTINGS, ImageSet, load_display
from patchlab.experiment import Result, prepare, rescore
from patchlab.maps import IMAGE_SCORES
from patchlab.methods import ScoringInputs

TABLE_METHODS = ("patchcluster", "patchcore", "patchcore_lof")
Prepared = tuple[ImageSet, ScoringInputs, np.ndarray]


class _Displays:
    """Jupyter shows the object's ``widget`` (the ``VBox`` of all controls and figures)."""

    widget: W.Widget

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


class ScoringWidget(_Displays):
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
    pixel_metrics : start with pixel AUROC and PRO on (each update then sorts every pixel)
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
        pixel_metrics: bool = False,
        prepared: dict[tuple[str, str | None, str], Prepared] | None = None,
    ) -> None:
        self.base = config
        self.n_show, self.cols, self.stride = n_show, cols, stride
        self.prepared: dict[tuple[str, str | None, str], Prepared] = dict(prepared or {})
        self._displays: dict[str, np.ndarray] = {}
        self._uris: dict[str, str] = {}
        if config.method not in methods:
            methods = (config.method, *methods)
        cats = categories or [config.category]
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
            options=[s for s in SETTINGS if s != "train"],
            value=config.setting,
            description="setting",
        )
        self.category = W.Dropdown(options=cats, value=config.category, description="category")
        self.backbone = W.Dropdown(
            options=list(BACKBONES), value=config.backbone, description="backbone"
        )
        self.pixel = W.Checkbox(value=pixel_metrics, description="pixel AUROC and PRO", style=style)
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
        for control in (
            self.k,
            self.method,
            self.image_score,
            self.pixel,
            self.setting,
            self.category,
            self.backbone,
        ):
            control.observe(self._changed, names="value")
        self.update()

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
        config = self.config()
        try:
            images, inputs, masks = self.inputs(config.backbone, config.category, config.setting)
        except (RuntimeError, ValueError, FileNotFoundError) as err:  # e.g. weights offline
            self.status.value = f"<span style='color:#b00'>{html.escape(str(err))}</span>"
            return
        t0 = time.perf_counter()
        result = rescore(config, images, inputs, masks, pixel_metrics=self.pixel.value)
        self.rescore_ms = (time.perf_counter() - t0) * 1e3
        self.result = result
        self.shown = np.argsort(-result.image_scores, kind="stable")[: self.n_show]
        self._draw(result)
        self.update_ms = (time.perf_counter() - t0) * 1e3
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

    def _display(self, path: Path) -> np.ndarray:
        key = str(path)
        if key not in self._displays:
            self._displays[key] = load_display(path, self.base.resize, self.base.crop)
        return self._displays[key]

    def _uri(self, path: Path) -> str:
        key = f"uri:{path}"
        if key not in self._uris:
            self._uris[key] = viz.data_uri(self._display(path))
        return self._uris[key]

    @staticmethod
    def _title(result: Result, rank: int, i: int) -> str:
        label = {0: "good", 1: "defect"}.get(int(result.images.labels[i]), "?")
        return f"#{rank + 1} {label} {result.image_scores[i]:.3g}"

    def _summary(self, result: Result) -> str:
        m = result.metrics

        def fmt(v) -> str:
            return "n/a" if v is None else f"{v:.3f}"

        weights = result.config.weights
        note = (
            " (random weights: the numbers show the pipeline, not the paper's)"
            if weights == "none"
            else ""
        )
        return (
            f"<b>{result.images.name}</b>, {m['n_images']} images, {m['n_patches']} patches; "
            f"image AUROC {fmt(m['image_auroc'])}, pixel AUROC {fmt(m['pixel_auroc'])}, "
            f"PRO {fmt(m['pro'])}; re-scored in {self.rescore_ms:.0f} ms "
            f"(figure {self.update_ms - self.rescore_ms:.0f} ms){note}"
        )


def explore(result: Result, **kwargs) -> ScoringWidget:
    """Open the scoring widget on a run's result: ``patchlab.explore(run(config))``.

    Keyword arguments go to :class:`ScoringWidget` (``n_show``, ``cols``, ``categories``...).
    """
    return ScoringWidget.from_result(result, **kwargs)


class NeighbourExplorer(_Displays):
    """The paper's Fig. 5: a patch's K nearest neighbours as crops and in a UMAP of the bank.

    Parameters
    ----------
    result : Result of a neighbour-table method (its table is read, nothing is recomputed)
    k : neighbours shown (default: the result's K)
    n_background : bank patches sampled for the UMAP (besides the queries' neighbours)
    crop : side of the crops, in pixels
    seed : seed of the sample and of UMAP

    Attributes
    ----------
    queries : {name: patch row}, the dropdown's choices ("normal patch", "anomalous patch")
    query : the selected patch row (``image * h * w + row * w + col``)
    crops_figure : FigureWidget of :func:`patchlab.viz.neighbour_crops_figure`
    umap_figure : FigureWidget of :func:`patchlab.viz.umap_figure`
    """

    def __init__(
        self,
        result: Result,
        k: int | None = None,
        n_background: int = 1500,
        crop: int = 32,
        seed: int = 0,
    ) -> None:
        self.result = result
        self.table = result.inputs.table()
        self.k = min(k or result.config.k, self.table.k)
        self.crop = crop
        n, self.h, self.w, _ = result.features.shape
        self.queries = default_queries(result)
        self.query = next(iter(self.queries.values()))
        self._pictures: dict[int, np.ndarray] = {}

        rng = np.random.default_rng(seed)
        bank = result.features.reshape(n * self.h * self.w, -1)
        pool = self.bank_rows()
        background = rng.choice(pool, min(n_background, len(pool)), replace=False)
        focus = {q: self.table.indices[q, : self.k].numpy() for q in self.queries.values()}
        rows = np.unique(np.concatenate([background, *focus.values(), list(focus)]))
        self.embedding, self._transform = viz.umap_embedding(bank[rows].numpy(), seed=seed)
        self.rows = rows
        self._where = {int(r): j for j, r in enumerate(rows)}
        self._bank = bank

        self.picker = W.Dropdown(
            options=list(self.queries.items()), value=self.query, description="patch"
        )
        self.image = W.Dropdown(
            options=[
                (f"{i}: {result.images.paths[i].parent.name}/{result.images.paths[i].name}", i)
                for i in range(n)
            ],
            value=self.query // (self.h * self.w),
            description="image",
        )
        self.image_figure = go.FigureWidget()
        self.crops_figure = go.FigureWidget()
        self.umap_figure = go.FigureWidget(self._umap())
        self.hover_image = W.Image(format="png", width=224)
        self.hover_text = W.HTML("hover over a point of the UMAP")
        self.umap_figure.data[0].on_hover(self._hovered)
        for trace in self.umap_figure.data[1:]:
            trace.on_hover(self._hovered)
        self.picker.observe(lambda c: self.select(c["new"]), names="value")
        self.image.observe(lambda c: self._show_image(c["new"]), names="value")
        self.widget = W.VBox(
            [
                W.HBox([self.picker, self.image]),
                W.HTML("click a patch of the image to make it the query"),
                W.HBox([self.image_figure, W.VBox([self.hover_text, self.hover_image])]),
                self.crops_figure,
                self.umap_figure,
            ]
        )
        self.select(self.query)

    def bank_rows(self) -> np.ndarray:
        """Rows of the memory bank (every patch, or the coreset)."""
        n_all = len(self.table)
        rows = self.result.inputs.bank_rows
        return np.arange(n_all) if rows is None else rows.numpy()

    def position(self, row: int) -> tuple[int, int, int]:
        """(image, grid row, grid col) of a patch row."""
        i, p = divmod(int(row), self.h * self.w)
        return i, p // self.w, p % self.w

    def picture(self, i: int) -> np.ndarray:
        if i not in self._pictures:
            c = self.result.config
            self._pictures[i] = load_display(self.result.images.paths[i], c.resize, c.crop)
        return self._pictures[i]

    def patch_crop(self, row: int) -> np.ndarray:
        i, r, c = self.position(row)
        return viz.patch_crop(self.picture(i), r, c, self.crop)

    def describe(self, row: int) -> str:
        i, r, c = self.position(row)
        path = self.result.images.paths[i]
        return f"{path.parent.name}/{path.name} patch ({r}, {c})"

    def neighbours(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """The stored K nearest bank rows of a patch and their distances (nearest first)."""
        return (
            self.table.indices[row, : self.k].numpy(),
            self.table.distances[row, : self.k].numpy(),
        )

    def select(self, row: int) -> None:
        """Make patch ``row`` the query: redraw its crops and highlight it in the UMAP."""
        self.query = int(row)
        idx, dist = self.neighbours(self.query)
        score = float(dist.mean())
        title = f"{self.describe(self.query)}: s(f) = mean of {self.k} distances = {score:.3f}"
        fig = viz.neighbour_crops_figure(
            self.patch_crop(self.query), [self.patch_crop(j) for j in idx], dist, title
        )
        self._replace("crops_figure", fig)
        with self.umap_figure.batch_update():
            xy = self._embed([self.query, *idx])
            self.umap_figure.data[-2].x, self.umap_figure.data[-2].y = xy[1:, 0], xy[1:, 1]
            self.umap_figure.data[-2].text = [self.describe(j) for j in idx]
            self.umap_figure.data[-2].customdata = idx
            self.umap_figure.data[-1].x, self.umap_figure.data[-1].y = xy[:1, 0], xy[:1, 1]
            self.umap_figure.data[-1].text = [self.describe(self.query)]
            self.umap_figure.data[-1].customdata = [self.query]
        i = self.position(self.query)[0]
        if self.image.value != i:
            self.image.value = i  # redraws the image via its observer
        else:
            self._show_image(i)

    def _embed(self, rows: list[int] | np.ndarray) -> np.ndarray:
        """UMAP coordinates of patch rows (those outside the fitted sample are transformed)."""
        rows = [int(r) for r in rows]
        out = np.zeros((len(rows), 2), np.float32)
        missing = [j for j, r in enumerate(rows) if r not in self._where]
        for j, r in enumerate(rows):
            if r in self._where:
                out[j] = self.embedding[self._where[r]]
        if missing:
            out[missing] = self._transform(self._bank[[rows[j] for j in missing]].numpy())
        return out

    def _umap(self) -> go.Figure:
        masks = self.result.masks
        groups, hover = [], []
        for r in self.rows:
            i, gr, gc = self.position(r)
            centre = masks[i, gr * viz.PATCH + viz.PATCH // 2, gc * viz.PATCH + viz.PATCH // 2]
            groups.append("bank: patch inside a defect" if centre else "bank: normal patch")
            hover.append(self.describe(r))
        groups_all = [*groups, "neighbours of the query", "query"]
        emb = np.concatenate([self.embedding, np.zeros((2, 2), np.float32)])
        fig = viz.umap_figure(emb, groups_all, [*hover, "", ""], [*self.rows, -1, -1])
        for trace in fig.data[:-2]:
            inside = "defect" in trace.name
            trace.marker.update(size=5 if inside else 4, color="#e377c2" if inside else "#bbbbbb")
        return fig

    def _show_image(self, i: int) -> None:
        picture = self.picture(i)
        fig = go.Figure(go.Image(source=viz.data_uri(picture), hoverinfo="skip"))
        scores = self.result.patch_scores[i].numpy()
        fig.add_trace(
            go.Heatmap(
                z=scores,
                x0=viz.PATCH / 2 - 0.5,
                dx=viz.PATCH,
                y0=viz.PATCH / 2 - 0.5,
                dy=viz.PATCH,
                opacity=0.35,
                colorscale=viz.MAP_COLORS,
                showscale=False,
                hovertemplate="patch score %{z:.3f}<extra></extra>",
            )
        )
        qi, qr, qc = self.position(self.query)
        if qi == i:
            fig.add_trace(
                go.Scatter(
                    x=[qc * viz.PATCH + 3.5],
                    y=[qr * viz.PATCH + 3.5],
                    mode="markers",
                    marker=dict(symbol="square-open", size=14, color="lime"),
                    hoverinfo="skip",
                    showlegend=False,
                )
            )
        viz._hide_axes(fig)
        fig.update_layout(
            width=360,
            height=340,
            margin=dict(l=5, r=5, t=30, b=5),
            title=f"image {i}: click a patch",
        )
        self._replace("image_figure", fig)
        self.image_figure.data[1].on_click(self._clicked)

    def _clicked(self, trace, points, state) -> None:
        if not points.point_inds:
            return
        r, c = points.point_inds[0]
        i = int(self.image.value)
        self.select(i * self.h * self.w + int(r) * self.w + int(c))

    def _hovered(self, trace, points, state) -> None:
        if not points.point_inds:
            return
        row = int(trace.customdata[points.point_inds[0]])
        if row < 0:
            return
        i, r, c = self.position(row)
        picture = self.picture(i).copy()
        top, left = r * viz.PATCH, c * viz.PATCH
        picture[top : top + viz.PATCH, [left, left + viz.PATCH - 1]] = (0, 255, 0)
        picture[[top, top + viz.PATCH - 1], left : left + viz.PATCH] = (0, 255, 0)
        crop = np.kron(self.patch_crop(row), np.ones((3, 3, 1), np.uint8))  # 3x larger
        pad = ((0, max(0, picture.shape[0] - crop.shape[0])), (4, 0), (0, 0))
        both = np.concatenate([picture, np.pad(crop, pad)[: picture.shape[0]]], 1)
        self.hover_image.value = _png(both)
        self.hover_text.value = self.describe(row)

    def _replace(self, name: str, fig: go.Figure) -> None:
        """Swap a figure in place (``FigureWidget``s keep their place in the layout)."""
        current = getattr(self, name)
        with current.batch_update():
            current.data = ()
            current.layout = {}
        current.add_traces(list(fig.data))
        current.layout = fig.layout


def default_queries(result: Result) -> dict[str, int]:
    """Fig. 5's two patches: the most anomalous patch inside a defect, and a typical normal one.

    The anomalous patch is the highest-scoring patch of the defective image with the highest
    image score (of a good image's, when the set has no defect); the normal patch is the
    median-scoring patch of the good image with the lowest image score (of the least anomalous
    image, when the set has no good image).

    Returns
    -------
    {"normal patch": row, "anomalous patch": row}, rows of the (n * h * w) patch table
    """
    scores = result.patch_scores.reshape(len(result.images), -1).numpy()
    labels = result.images.labels
    image_scores = np.asarray(result.image_scores)
    defective = np.flatnonzero(labels == 1)
    good = np.flatnonzero(labels == 0)
    bad_img = (
        defective[np.argmax(image_scores[defective])]
        if len(defective)
        else int(np.argmax(image_scores))
    )
    good_img = good[np.argmin(image_scores[good])] if len(good) else int(np.argmin(image_scores))
    per = scores.shape[1]
    median = np.argsort(scores[good_img])[per // 2]
    return {
        "normal patch": int(good_img * per + median),
        "anomalous patch": int(bad_img * per + np.argmax(scores[bad_img])),
    }


def _png(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
