"""Figures of the coreset step (notebook 2): coverage radius, picked patches."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from patchlab.viz._common import PATCH, data_uri, hide_axes


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
    hide_axes(fig)
    fig.update_layout(height=250 * rows, width=250 * cols, margin=dict(l=10, r=10, t=40, b=10))
    return fig
