"""Figures of the scoring step (notebook 4): anomaly maps over their images, in a grid."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.colors import hex_to_rgb, sequential
from plotly.subplots import make_subplots
from scipy import ndimage

from patchlab.viz._common import MAP_COLORS, data_uri, hide_axes

MASK_RGB = (0, 255, 255)  # the defect outline (cyan) in figures and overlay images


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
        line=dict(color=f"rgb{MASK_RGB}", width=1.5),
        hoverinfo="skip",
        name="defect mask",
        showlegend=False,
    )


def overlay_image(
    picture: np.ndarray,
    amap: np.ndarray,
    mask: np.ndarray | None = None,
    zrange: tuple[float, float] | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """An image with its anomaly map blended over it and the mask outlined, as pixels: what
    :func:`overlay_grid` draws, for a PNG (the report's ``overlays/``).

    Parameters
    ----------
    picture : (S, S, 3) uint8
    amap : (S, S) float, the anomaly map
    mask : (S, S), optional; its outline (the mask's border pixels) is drawn in ``MASK_RGB``
    zrange : (low, high) of the colour scale (the whole set's, so images compare)
    alpha : weight of the map's colour

    Returns
    -------
    (S, S, 3) uint8
    """
    low, high = zrange or (float(amap.min()), float(amap.max()))
    level = np.clip((amap - low) / max(high - low, 1e-12), 0, 1)
    colour = _colour_table()[np.round(level * 255).astype(int)]
    out = (1 - alpha) * picture.astype(np.float32) + alpha * colour
    out = np.clip(out, 0, 255).astype(np.uint8)
    if mask is not None and mask.any():
        inside = mask.astype(bool)
        border = inside & ~ndimage.binary_erosion(inside, border_value=0)
        out[ndimage.binary_dilation(border)] = MASK_RGB
    return out


@functools.cache
def _colour_table() -> np.ndarray:
    """plotly's :data:`MAP_COLORS` scale (the figures' and widgets') as 256 RGB entries."""
    stops = np.array([hex_to_rgb(c) for c in getattr(sequential, MAP_COLORS)], np.float32)
    x = np.linspace(0, 1, len(stops))
    grid = np.linspace(0, 1, 256)
    return np.stack([np.interp(grid, x, stops[:, c]) for c in range(3)], 1)
