"""Figures of the features step (notebook 1): tapped maps, a patch's receptive field."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from patchlab.viz._common import PATCH, data_uri, hide_axes, outline


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
    hide_axes(fig)
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
    outline(fig, *box, color="cyan", name="theoretical receptive field")
    top, left = row * PATCH, col * PATCH
    outline(fig, top, left, top + PATCH, left + PATCH, color="lime", name=f"patch ({row}, {col})")
    hide_axes(fig)
    fig.update_layout(
        height=480,
        width=560,
        margin=dict(l=10, r=10, t=40, b=10),
        title=f"patch ({row}, {col}): receptive field {box[2] - box[0]} x {box[3] - box[1]} px",
        legend=dict(orientation="h"),
    )
    return fig
