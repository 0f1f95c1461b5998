"""Figures of the evaluation step (notebook 5): ROC and PRO curves, K sweeps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go


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
