"""Figures of the neighbour step (notebook 3, the paper's Fig. 5): crops of a patch's
neighbours, a UMAP of the memory bank."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from patchlab.viz._common import MAP_COLORS, PATCH, data_uri, hide_axes, patch_crop


def neighbour_crops_figure(
    query: np.ndarray,
    crops: Sequence[np.ndarray],
    distances: Sequence[float],
    title: str = "",
    cols: int = 13,
) -> go.Figure:
    """A query patch crop followed by the crops of its K nearest neighbours.

    Parameters
    ----------
    query : np.ndarray, shape (c, c, 3), uint8
    crops : K arrays of shape (c, c, 3), uint8, nearest first
    distances : K floats, ||f - m|| of each neighbour
    """
    n = len(crops) + 1
    cols = min(cols, n)
    rows = -(-n // cols)
    names = ["query"] + [f"{d:.2f}" for d in distances]
    fig = make_subplots(
        rows, cols, subplot_titles=names, horizontal_spacing=0.005, vertical_spacing=0.08
    )
    for j, img in enumerate([query, *crops]):
        fig.add_trace(go.Image(source=data_uri(img), name=names[j]), j // cols + 1, j % cols + 1)
    hide_axes(fig)
    fig.update_annotations(font_size=10)
    fig.update_layout(
        height=90 * rows + 50, width=80 * cols, title=title, margin=dict(l=5, r=5, t=50, b=5)
    )
    return fig


def umap_embedding(
    features: np.ndarray, n_neighbors: int = 15, seed: int = 0, pca_dim: int = 50
) -> tuple[np.ndarray, object]:
    """A 2-D UMAP of patch features (after a PCA to ``pca_dim`` dimensions).

    Parameters
    ----------
    features : np.ndarray, shape (m, d)

    Returns
    -------
    embedding : np.ndarray, shape (m, 2), float32
    transform : callable mapping new (p, d) features to (p, 2) in the same embedding
    """
    import umap  # heavy (numba): imported when used
    from sklearn.decomposition import PCA

    x = np.asarray(features, dtype=np.float32)
    pca = PCA(min(pca_dim, *x.shape), random_state=seed).fit(x)
    reducer = umap.UMAP(n_neighbors=n_neighbors, random_state=seed, n_jobs=1)
    embedding = reducer.fit_transform(pca.transform(x)).astype(np.float32)

    def transform(new: np.ndarray) -> np.ndarray:
        return reducer.transform(pca.transform(np.asarray(new, np.float32))).astype(np.float32)

    return embedding, transform


def umap_figure(
    embedding: np.ndarray,
    groups: Sequence[str],
    hover: Sequence[str],
    customdata: Sequence[int] | None = None,
    title: str = "UMAP of the memory bank",
    styles: dict[str, dict] | None = None,
) -> go.Figure:
    """A 2-D scatter of patch features, one trace per group (in order of first appearance).

    Parameters
    ----------
    embedding : np.ndarray, shape (m, 2)
    groups : m group names (legend entries), e.g. "bank", "normal query", "its neighbours"
    hover : m hover texts (source image and patch position)
    customdata : m ints (e.g. bank rows) for callbacks
    styles : {group: plotly marker dict} for groups drawn otherwise than the default ("bank":
        small light grey; "query": a star; the rest: coloured circles)
    """
    embedding = np.asarray(embedding)
    groups = np.asarray(groups)
    hover = np.asarray(hover)
    custom = np.asarray(customdata if customdata is not None else np.arange(len(embedding)))
    fig = go.Figure()
    styles = {"bank": dict(size=4, color="lightgrey", opacity=0.6), **(styles or {})}
    palette = ["#1f77b4", "#2ca02c", "#d62728", "#ff7f0e", "#9467bd", "#8c564b"]
    for j, name in enumerate(dict.fromkeys(groups.tolist())):
        sel = groups == name
        marker = styles.get(
            name,
            dict(
                size=16 if name == "query" else 8,
                color=palette[j % len(palette)],
                symbol="star" if name == "query" else "circle",
            ),
        )
        fig.add_trace(
            go.Scattergl(
                x=embedding[sel, 0],
                y=embedding[sel, 1],
                mode="markers",
                name=name,
                marker=marker,
                text=hover[sel],
                customdata=custom[sel],
                hovertemplate="%{text}<extra>%{fullData.name}</extra>",
            )
        )
    fig.update_layout(
        title=title,
        height=520,
        width=700,
        margin=dict(l=10, r=10, t=40, b=10),
        xaxis_title="UMAP 1",
        yaxis_title="UMAP 2",
    )
    return fig


def patch_scores_figure(
    image: np.ndarray,
    scores: np.ndarray,
    query: tuple[int, int] | None = None,
    title: str = "",
) -> go.Figure:
    """An image under its patch-score grid (one cell per 8 x 8 patch), the query outlined.

    Parameters
    ----------
    image : np.ndarray, shape (S, S, 3), uint8
    scores : np.ndarray, shape (S / 8, S / 8)
        Patch scores; trace 1 is their heat map (clickable: ``points.point_inds`` are
        (grid row, grid col)).
    query : (grid row, grid col), optional
        The patch to outline.
    """
    fig = go.Figure(go.Image(source=data_uri(image), hoverinfo="skip"))
    fig.add_trace(
        go.Heatmap(
            z=np.asarray(scores, np.float32),
            x0=PATCH / 2 - 0.5,
            dx=PATCH,
            y0=PATCH / 2 - 0.5,
            dy=PATCH,
            opacity=0.35,
            colorscale=MAP_COLORS,
            showscale=False,
            hovertemplate="patch score %{z:.3f}<extra></extra>",
        )
    )
    if query is not None:
        qr, qc = query
        fig.add_trace(
            go.Scatter(
                x=[qc * PATCH + 3.5],
                y=[qr * PATCH + 3.5],
                mode="markers",
                marker=dict(symbol="square-open", size=14, color="lime"),
                hoverinfo="skip",
                showlegend=False,
            )
        )
    hide_axes(fig)
    fig.update_layout(width=360, height=340, margin=dict(l=5, r=5, t=30, b=5), title=title)
    return fig


def hover_picture(image: np.ndarray, row: int, col: int, crop: int = 32) -> np.ndarray:
    """The image with patch (row, col) outlined in green, beside the patch's crop at 3x.

    Returns
    -------
    np.ndarray, shape (S, S + 4 + 3 * crop, 3), uint8
    """
    picture = np.array(image, dtype=np.uint8)  # a copy: the outline is drawn into it
    top, left = row * PATCH, col * PATCH
    picture[top : top + PATCH, [left, left + PATCH - 1]] = (0, 255, 0)
    picture[[top, top + PATCH - 1], left : left + PATCH] = (0, 255, 0)
    zoom = np.kron(patch_crop(image, row, col, crop), np.ones((3, 3, 1), np.uint8))
    pad = ((0, max(0, picture.shape[0] - zoom.shape[0])), (4, 0), (0, 0))
    return np.concatenate([picture, np.pad(zoom, pad)[: picture.shape[0]]], 1)
