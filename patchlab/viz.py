"""Plotly figures of every step: feature maps, receptive fields, coreset picks, neighbours,
UMAP of the memory bank, anomaly-map overlays, ROC / PRO curves, K sweeps; PNG export.

Every builder takes plain arrays and returns a ``plotly.graph_objects.Figure`` whose trace data
are those arrays (maps shown at a ``stride`` are ``maps[:, ::stride, ::stride]``), so a test can
compare a figure with the values it was built from. Nothing here computes neighbours or scores:
the numbers come from :mod:`patchlab.experiment` and :mod:`patchlab.metrics`.

Imported only on demand (``import patchlab`` does not import plotly).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from PIL import Image
from plotly.subplots import make_subplots

PATCH = 8  # pixels per feature-grid step (the stride of layer2)
MAP_COLORS = "Inferno"


# ---------------------------------------------------------------------------- images and crops
def data_uri(image: np.ndarray) -> str:
    """A PNG data URI of an image (compact in a figure's JSON, unlike a list of pixels).

    Parameters
    ----------
    image : np.ndarray, shape (H, W, 3) or (H, W), uint8
    """
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def patch_crop(image: np.ndarray, row: int, col: int, size: int = 32) -> np.ndarray:
    """The ``size`` x ``size`` pixels centred on patch (row, col), zero padded at the border.

    Parameters
    ----------
    image : np.ndarray, shape (S, S, 3), uint8
        The image as the model sees it (:func:`patchlab.data.load_display`).
    row, col : int
        Position on the feature grid (one step = 8 pixels).

    Returns
    -------
    np.ndarray, shape (size, size, 3), uint8
    """
    half = size // 2
    padded = np.pad(image, ((half, half), (half, half), (0, 0)))
    cy, cx = row * PATCH + PATCH // 2 + half, col * PATCH + PATCH // 2 + half
    return padded[cy - half : cy - half + size, cx - half : cx - half + size]


def _hide_axes(fig: go.Figure) -> None:
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False)


def _box(
    fig: go.Figure,
    top: float,
    left: float,
    bottom: float,
    right: float,
    color: str,
    row: int | None = None,
    col: int | None = None,
    name: str = "",
) -> None:
    """A rectangle outline (pixel edges) as a scatter trace, so it is part of ``fig.data``."""
    xs = [left - 0.5, right - 0.5, right - 0.5, left - 0.5, left - 0.5]
    ys = [top - 0.5, top - 0.5, bottom - 0.5, bottom - 0.5, top - 0.5]
    trace = go.Scatter(
        x=xs,
        y=ys,
        mode="lines",
        line=dict(color=color, width=2),
        name=name,
        showlegend=bool(name),
        hoverinfo="skip",
    )
    if row is None:
        fig.add_trace(trace)
    else:
        fig.add_trace(trace, row=row, col=col)


# ------------------------------------------------------------------------------ 01 features
def layer_maps_figure(image: np.ndarray, maps: Mapping[str, np.ndarray]) -> go.Figure:
    """The image beside one (h, w) map per named layer (e.g. the mean activation).

    Parameters
    ----------
    image : np.ndarray, shape (S, S, 3), uint8
    maps : name -> np.ndarray of shape (h, w)
    """
    names = list(maps)
    fig = make_subplots(
        1, len(names) + 1, subplot_titles=["image", *names], horizontal_spacing=0.03
    )
    fig.add_trace(go.Image(source=data_uri(image)), 1, 1)
    for j, name in enumerate(names, start=2):
        m = np.asarray(maps[name], dtype=np.float32)
        fig.add_trace(go.Heatmap(z=m, colorscale="Viridis", showscale=False, name=name), 1, j)
        fig.update_yaxes(autorange="reversed", scaleanchor=f"x{j}", row=1, col=j)
    _hide_axes(fig)
    fig.update_layout(height=320, width=320 * (len(names) + 1), margin=dict(l=10, r=10, t=40, b=10))
    return fig


def receptive_field_figure(
    image: np.ndarray, weight: np.ndarray, box: tuple[int, int, int, int], row: int, col: int
) -> go.Figure:
    """What one patch feature sees: its 8 x 8 patch, the effective receptive field (gradient
    magnitude, as a heat map over the image) and the theoretical one (the box).

    Parameters
    ----------
    image : np.ndarray, shape (S, S, 3), uint8
    weight : np.ndarray, shape (S, S), float
        :func:`patchlab.features.receptive_field`'s gradient magnitude.
    box : (top, left, bottom, right), pixels
    row, col : the patch on the feature grid
    """
    fig = go.Figure(go.Image(source=data_uri(image), name="image"))
    fig.add_trace(
        go.Heatmap(
            z=np.sqrt(np.asarray(weight, np.float32)),
            colorscale="Hot",
            opacity=0.55,
            showscale=False,
            name="effective receptive field",
            hovertemplate="x=%{x} y=%{y} sqrt(grad)=%{z:.3f}<extra></extra>",
        )
    )
    _box(fig, *box, color="cyan", name="theoretical receptive field")
    top, left = row * PATCH, col * PATCH
    _box(fig, top, left, top + PATCH, left + PATCH, color="lime", name=f"patch ({row}, {col})")
    _hide_axes(fig)
    fig.update_layout(
        height=480,
        width=560,
        margin=dict(l=10, r=10, t=40, b=10),
        title=f"patch ({row}, {col}): receptive field {box[2] - box[0]} x {box[3] - box[1]} px",
        legend=dict(orientation="h"),
    )
    return fig


# ------------------------------------------------------------------------------- 02 coreset
def coverage_figure(ratios: Sequence[float], radii: Sequence[float]) -> go.Figure:
    """Coverage radius max_f min_{c in C} ||f - c|| against the coreset ratio |C| / |M|.

    Parameters
    ----------
    ratios, radii : sequences of the same length
    """
    fig = go.Figure(
        go.Scatter(x=list(ratios), y=list(radii), mode="lines+markers", name="coverage radius")
    )
    fig.update_layout(
        xaxis=dict(title="coreset ratio |C| / |M|", type="log"),
        yaxis_title="max over patches of the distance to C",
        height=380,
        width=560,
        margin=dict(l=10, r=10, t=40, b=10),
        title="greedy coreset coverage",
    )
    return fig


def coreset_picks_figure(
    images: Sequence[np.ndarray],
    picks: Sequence[np.ndarray],
    titles: Sequence[str] | None = None,
    cols: int = 4,
) -> go.Figure:
    """Images with the patches a coreset picked marked at their centres.

    Parameters
    ----------
    images : sequence of np.ndarray, shape (S, S, 3), uint8
    picks : sequence (one per image) of np.ndarray, shape (p, 2), int: (row, col) on the grid
    """
    rows = -(-len(images) // cols)
    fig = make_subplots(
        rows,
        cols,
        subplot_titles=list(titles) if titles else None,
        horizontal_spacing=0.01,
        vertical_spacing=0.06,
    )
    for j, (img, rc) in enumerate(zip(images, picks, strict=True)):
        r, c = j // cols + 1, j % cols + 1
        fig.add_trace(go.Image(source=data_uri(img)), r, c)
        rc = np.asarray(rc).reshape(-1, 2)
        fig.add_trace(
            go.Scatter(
                x=rc[:, 1] * PATCH + PATCH / 2 - 0.5,
                y=rc[:, 0] * PATCH + PATCH / 2 - 0.5,
                mode="markers",
                marker=dict(symbol="square-open", size=6, color="cyan"),
                showlegend=False,
                hoverinfo="skip",
            ),
            r,
            c,
        )
    _hide_axes(fig)
    fig.update_layout(height=250 * rows, width=250 * cols, margin=dict(l=10, r=10, t=40, b=10))
    return fig


# ---------------------------------------------------------------------------- 03 neighbours
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
    _hide_axes(fig)
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
) -> go.Figure:
    """A 2-D scatter of patch features, one trace per group (in order of first appearance).

    Parameters
    ----------
    embedding : np.ndarray, shape (m, 2)
    groups : m group names (legend entries), e.g. "bank", "normal query", "its neighbours"
    hover : m hover texts (source image and patch position)
    customdata : m ints (e.g. bank rows) for callbacks
    """
    embedding = np.asarray(embedding)
    groups = np.asarray(groups)
    hover = np.asarray(hover)
    custom = np.asarray(customdata if customdata is not None else np.arange(len(embedding)))
    fig = go.Figure()
    styles = {"bank": dict(size=4, color="lightgrey", opacity=0.6)}
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


# ------------------------------------------------------------------------------- 04 scoring
def map_range(maps: np.ndarray) -> tuple[float, float]:
    """(min, max) of a stack of maps: one colour scale for every image of a set."""
    return float(np.min(maps)), float(np.max(maps))


def overlay_grid(
    images: Sequence[np.ndarray],
    maps: np.ndarray,
    titles: Sequence[str] | None = None,
    masks: np.ndarray | None = None,
    cols: int = 4,
    zrange: tuple[float, float] | None = None,
    stride: int = 2,
    opacity: float = 0.5,
) -> go.Figure:
    """Anomaly maps over their images, with the ground-truth outline, in a grid.

    Each cell holds three traces, in this order: the image (``go.Image``), the map
    (``go.Heatmap``, ``z = maps[j][::stride, ::stride]``) and the mask outline
    (``go.Contour`` at 0.5, ``z = masks[j][::stride, ::stride]``). :func:`cell_traces` gives
    their indices.

    Parameters
    ----------
    images : n arrays of shape (S, S, 3), uint8
    maps : np.ndarray, shape (n, S, S), float
    titles : n strings
    masks : np.ndarray, shape (n, S, S), optional
    zrange : colour range, default :func:`map_range` of ``maps``
    stride : display every ``stride``-th map pixel (smaller figures, faster updates)
    """
    n = len(images)
    rows = -(-n // cols)
    zmin, zmax = zrange or map_range(maps)
    fig = make_subplots(
        rows,
        cols,
        subplot_titles=list(titles) if titles else [""] * n,
        horizontal_spacing=0.01,
        vertical_spacing=0.05,
    )
    side = maps.shape[-1]
    for j in range(n):
        r, c = j // cols + 1, j % cols + 1
        fig.add_trace(go.Image(source=data_uri(images[j]), hoverinfo="skip"), r, c)
        fig.add_trace(_map_trace(maps[j], stride, zmin, zmax, opacity, showscale=j == 0), r, c)
        mask = np.zeros((side, side)) if masks is None else masks[j]
        fig.add_trace(_mask_trace(mask, stride), r, c)
    _hide_axes(fig)
    fig.update_annotations(font_size=11)
    fig.update_layout(
        height=230 * rows + 40, width=220 * cols + 80, margin=dict(l=5, r=5, t=40, b=5)
    )
    return fig


def cell_traces(j: int) -> tuple[int, int, int]:
    """Indices into ``fig.data`` of cell ``j`` of :func:`overlay_grid`: (image, map, mask)."""
    return 3 * j, 3 * j + 1, 3 * j + 2


def _strided(image: np.ndarray, stride: int) -> dict:
    """Every ``stride``-th pixel of ``image``, placed at the centre of the pixels it stands for
    (the ``z``, ``x0``, ``dx``, ``y0``, ``dy`` of a heatmap or contour trace)."""
    centre = (stride - 1) / 2
    z = np.asarray(image, np.float32)[::stride, ::stride]
    return dict(z=z, x0=centre, dx=stride, y0=centre, dy=stride)


def _map_trace(
    m: np.ndarray, stride: int, zmin: float, zmax: float, opacity: float, showscale: bool
) -> go.Heatmap:
    return go.Heatmap(
        **_strided(m, stride),
        zmin=zmin,
        zmax=zmax,
        colorscale=MAP_COLORS,
        opacity=opacity,
        showscale=showscale,
        colorbar=dict(thickness=12, len=0.6),
        name="anomaly map",
        hovertemplate="score %{z:.3f}<extra></extra>",
    )


def _mask_trace(mask: np.ndarray, stride: int) -> go.Contour:
    return go.Contour(
        **_strided(mask, stride),
        showscale=False,
        contours=dict(start=0.5, end=0.5, size=1, coloring="none"),
        line=dict(color="cyan", width=1.5),
        hoverinfo="skip",
        name="defect mask",
        showlegend=False,
    )


# ---------------------------------------------------------------------------- 05 evaluation
def decimate(x: np.ndarray, y: np.ndarray, max_points: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` points of a curve for display (first and last always kept).

    A curve with fewer points is returned unchanged; a longer one keeps evenly spaced points,
    which for a pixel ROC curve (a million steps) is indistinguishable on screen.
    """
    x, y = np.asarray(x), np.asarray(y)
    if x.size <= max_points:
        return x, y
    keep = np.unique(np.linspace(0, x.size - 1, max_points).round().astype(np.int64))
    return x[keep], y[keep]


def curves_figure(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    xaxis: str,
    yaxis: str,
    title: str,
    max_x: float | None = None,
    diagonal: bool = False,
    max_points: int = 2000,
) -> go.Figure:
    """One line per named curve (ROC, PRO, ...).

    Parameters
    ----------
    curves : name -> (x, y), e.g. from :func:`patchlab.metrics.roc_curve` / ``pro_curve``
    max_x : right end of the x axis (0.3 for PRO), or None
    diagonal : draw y = x (chance level of a ROC curve)
    """
    fig = go.Figure()
    for name, (x, y) in curves.items():
        xs, ys = decimate(x, y, max_points)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=name))
    if diagonal:
        fig.add_trace(
            go.Scatter(
                x=[0, 1], y=[0, 1], mode="lines", name="chance", line=dict(dash="dot", color="grey")
            )
        )
    fig.update_layout(
        title=title,
        xaxis_title=xaxis,
        yaxis_title=yaxis,
        height=420,
        width=560,
        margin=dict(l=10, r=10, t=40, b=10),
    )
    if max_x is not None:
        fig.update_xaxes(range=[0, max_x])
    fig.update_yaxes(range=[0, 1.02])
    return fig


def roc_figure(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str = "ROC", level: str = "image"
) -> go.Figure:
    """ROC curves (fpr, tpr) of :func:`patchlab.metrics.roc_curve` or ``pixel_roc_curve``."""
    return curves_figure(
        curves, f"{level} false positive rate", f"{level} true positive rate", title, diagonal=True
    )


def pro_figure(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]], max_fpr: float = 0.3, title: str = "PRO"
) -> go.Figure:
    """PRO(FPR) curves of :func:`patchlab.metrics.pro_curve`, shown up to ``max_fpr``."""
    return curves_figure(
        curves, "pixel false positive rate", "per-region overlap", title, max_x=max_fpr
    )


def k_sweep_figure(
    ks: Sequence[int],
    values: Mapping[str, Sequence[float | None]],
    title: str = "K sweep",
    yaxis: str = "metric",
) -> go.Figure:
    """One line per named metric against K (the paper's Table 5 as a plot).

    Parameters
    ----------
    ks : the K values, shown on a log axis
    values : name -> one value per K (None where undefined)
    """
    fig = go.Figure()
    for name, ys in values.items():
        fig.add_trace(
            go.Scatter(
                x=list(ks),
                y=[np.nan if v is None else v for v in ys],
                mode="lines+markers",
                name=name,
            )
        )
    fig.update_layout(
        title=title,
        xaxis=dict(title="K (neighbours averaged, Eq. 2)", type="log"),
        yaxis_title=yaxis,
        height=420,
        width=620,
        margin=dict(l=10, r=10, t=40, b=10),
    )
    return fig


# ---------------------------------------------------------------------------------- export
_SCOPE = None


def export_png(
    fig: go.Figure,
    path: str | Path,
    width: int | None = None,
    height: int | None = None,
    scale: float = 1.0,
) -> Path:
    """Write a figure as a PNG image, offline.

    With kaleido 0.2.x (what the ``notebooks`` extra pins: it bundles its own headless Chromium)
    the figure is rendered with the plotly.js that ships inside the plotly package, so no
    network is needed. With kaleido >= 1 plotly's own ``write_image`` is used (it needs a
    Chrome on the machine).

    Returns
    -------
    Path of the written file.
    """
    global _SCOPE
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width = width or fig.layout.width or 700
    height = height or fig.layout.height or 500
    try:
        from kaleido.scopes.plotly import PlotlyScope  # kaleido 0.2.x
    except ImportError:
        fig.write_image(path, width=width, height=height, scale=scale)
        return path
    if _SCOPE is None:
        import plotly

        plotlyjs = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
        _SCOPE = PlotlyScope(plotlyjs=str(plotlyjs) if plotlyjs.is_file() else None)
    png = _SCOPE.transform(fig.to_dict(), format="png", width=width, height=height, scale=scale)
    path.write_bytes(png)
    return path
