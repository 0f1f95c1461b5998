"""The neighbour explorer: the paper's Fig. 5.

A normal and an anomalous patch (dropdown, or a click on the image), their K nearest neighbours
as crops, and a 2-D UMAP of the bank where hovering a point shows its crop and source image.
Everything reads the stored neighbour table; the figures come from :mod:`patchlab.viz`.
"""

from __future__ import annotations

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go

import patchlab.viz as viz
from patchlab.experiment import Result
from patchlab.images import load_display
from patchlab.widgets._base import Displays, replace_figure


class NeighbourExplorer(Displays):
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
        bank = result.inputs.bank
        if bank is not None and not (bank.blind and bank.source is result.features):
            raise ValueError(
                "the neighbour explorer shows a blind run, whose bank is its own images; this "
                "result's bank is another set's (one-class, or a saved bank): use "
                "patchlab.explore(result) for its maps"
            )
        self.result = result
        self.table = result.inputs.table()
        self.k = min(k or result.config.k, self.table.k)
        self.crop = crop
        n, self.h, self.w, _ = result.features.shape
        self.queries = default_queries(result)
        self.query = self.queries["anomalous patch"]  # Fig. 5's point: the defect first
        self._syncing = False
        self._fit_umap(result.features.reshape(n * self.h * self.w, -1), n_background, seed)

        self.picker = W.Dropdown(options=self._choices(self.query), value=self.query)
        self.picker.description = "patch"
        self.image = W.Dropdown(
            options=[(f"{i}: {viz.image_name(result.images.paths[i])}", i) for i in range(n)],
            value=self.query // (self.h * self.w),
            description="image",
        )
        self.image_figure = go.FigureWidget()
        self.crops_figure = go.FigureWidget()
        self.umap_figure = go.FigureWidget(self._umap())
        self.hover_image = W.Image(format="png", width=224)
        self.hover_text = W.HTML("hover over a point of the UMAP")
        for trace in self.umap_figure.data:
            trace.on_hover(self._hovered)
        self.picker.observe(self._picked, names="value")
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

    def _fit_umap(self, bank, n_background: int, seed: int) -> None:
        """A UMAP of a sample of the bank (the queries' neighbours included), fitted once; every
        other patch is drawn at its nearest sampled patch (one kNN, no UMAP transform)."""
        from patchlab.knn import knn

        rng = np.random.default_rng(seed)
        pool = self.bank_rows()
        background = rng.choice(pool, min(n_background, len(pool)), replace=False)
        focus = [self.bank_row(self.table.indices[q, : self.k]) for q in self.queries.values()]
        rows = np.unique(np.concatenate([background, *focus, list(self.queries.values())]))
        self.embedding, _ = viz.umap_embedding(bank[rows].numpy(), seed=seed)
        self.rows = rows
        nearest = knn(bank, 1, bank[rows], exclude="none", progress=False)
        self._at = nearest.indices[:, 0].numpy()  # every patch -> its nearest sampled one

    def bank_rows(self) -> np.ndarray:
        """Patch rows of the memory bank's entries (every patch, or the coreset)."""
        return self.result.inputs.bank_ids().numpy()

    def bank_row(self, positions) -> np.ndarray:
        """Patch rows of bank entries (the table's indices; a coreset maps them)."""
        return self.bank_rows()[np.asarray(positions)]

    def position(self, row: int) -> tuple[int, int, int]:
        """(image, grid row, grid col) of a patch row."""
        i, p = divmod(int(row), self.h * self.w)
        return i, p // self.w, p % self.w

    def picture(self, i: int) -> np.ndarray:
        """Image ``i`` as the model sees it (the shared display cache)."""
        c = self.result.config
        return load_display(self.result.images.paths[i], c.resize, c.crop)

    def patch_crop(self, row: int) -> np.ndarray:
        i, r, c = self.position(row)
        return viz.patch_crop(self.picture(i), r, c, self.crop)

    def describe(self, row: int) -> str:
        i, r, c = self.position(row)
        return f"{viz.image_name(self.result.images.paths[i])} patch ({r}, {c})"

    def neighbours(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """The stored K nearest bank patches (their patch rows) of a patch and their distances
        (nearest first)."""
        return (
            self.bank_row(self.table.indices[row, : self.k].numpy()),
            self.table.distances[row, : self.k].numpy(),
        )

    def select(self, row: int) -> None:
        """Make patch ``row`` the query: its crops, its place in the UMAP and on its image, and
        the dropdown, all updated in place."""
        self.query = int(row)
        idx, dist = self.neighbours(self.query)
        score = float(dist.mean())
        title = f"{self.describe(self.query)}: s(f) = mean of {self.k} distances = {score:.3f}"
        if self.result.inputs.others:  # LNAMD: the run's score averages several sizes
            local = self.result.inputs.local
            title += f" (at size {local}; the run's average over sizes: "
            title += f"{float(self.result.patch_scores.reshape(-1)[self.query]):.3f})"
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
        if self.picker.value != self.query:  # the dropdown says what is shown
            self._syncing = True
            try:
                self.picker.options = self._choices(self.query)
                self.picker.value = self.query
            finally:
                self._syncing = False
        i, r, c = self.position(self.query)
        if self.image.value != i:
            self.image.value = i  # redraws the image via its observer
        elif len(self.image_figure.data) == 3:  # the same image: move the marker only
            marker = self.image_figure.data[2]
            marker.x, marker.y = [c * viz.PATCH + 3.5], [r * viz.PATCH + 3.5]
        else:
            self._show_image(i)
        self.hover_image.value = viz.png_bytes(viz.hover_picture(self.picture(i), r, c))
        self.hover_text.value = f"the query: {self.describe(self.query)}"

    def _choices(self, row: int) -> list[tuple[str, int]]:
        """The dropdown's options: the two named patches, and ``row`` when it is another."""
        named = list(self.queries.items())
        if row in self.queries.values():
            return named
        return [*named, (f"clicked: {self.describe(row)}", int(row))]

    def _picked(self, change) -> None:
        if self._syncing:  # select() itself updating the dropdown
            return
        if change["new"] is not None and int(change["new"]) != self.query:
            self.select(change["new"])

    def _embed(self, rows: list[int] | np.ndarray) -> np.ndarray:
        """UMAP coordinates of patch rows: their own, or their nearest sampled patch's."""
        return self.embedding[self._at[np.asarray(rows, dtype=np.int64)]]

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
        styles = {
            "bank: patch inside a defect": dict(size=5, color="#e377c2"),
            "bank: normal patch": dict(size=4, color="#bbbbbb"),
        }
        return viz.umap_figure(
            emb, groups_all, [*hover, "", ""], [*self.rows, -1, -1], styles=styles
        )

    def _show_image(self, i: int) -> None:
        qi, qr, qc = self.position(self.query)
        fig = viz.patch_scores_figure(
            self.picture(i),
            self.result.patch_scores[i].numpy(),
            query=(qr, qc) if qi == i else None,
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
        self.hover_image.value = viz.png_bytes(viz.hover_picture(self.picture(i), r, c, self.crop))
        self.hover_text.value = self.describe(row)

    def _replace(self, name: str, fig: go.Figure) -> None:
        replace_figure(getattr(self, name), fig)


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
