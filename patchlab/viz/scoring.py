"""Figures of the scoring step (notebook 4): anomaly maps over their images, in a grid."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from patchlab.viz._common import MAP_COLORS, data_uri, hide_axes


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
    hide_axes(fig)
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
