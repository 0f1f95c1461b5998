"""What every figure shares: the patch grid, PNG images and data URIs, crops, axes, outlines,
PNG export."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from PIL import Image

PATCH = 8  # pixels per feature-grid step (the stride of the finest tap)
MAP_COLORS = "Inferno"


def data_uri(image: np.ndarray) -> str:
    """A PNG data URI of an image (compact in a figure's JSON, unlike a list of pixels).

    Parameters
    ----------
    image : np.ndarray, shape (H, W, 3) or (H, W), uint8
    """
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_name(path) -> str:
    """``folder/file`` of an image path (``hole/003.png``): short, and in MVTec AD the defect
    type. The one name of an image in every figure, widget and report."""
    path = Path(str(path))
    return f"{path.parent.name}/{path.name}"


def tile_title(rank: int, path, label: int, score: float) -> str:
    """The title of an overlay tile: ``#1 hole/003.png (defect) 2.31`` (rank from 0; the label
    left out when unknown, -1)."""
    said = {0: "(good) ", 1: "(defect) "}.get(int(label), "")
    return f"#{rank + 1} {image_name(path)} {said}{score:.3g}"


def patch_crop(image: np.ndarray, row: int, col: int, size: int = 32) -> np.ndarray:
    """The ``size`` x ``size`` pixels centred on patch (row, col), zero padded at the border.

    Parameters
    ----------
    image : np.ndarray, shape (S, S, 3), uint8
        The image as the model sees it (:func:`patchlab.images.load_display`).
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


def hide_axes(fig: go.Figure) -> None:
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False)


def outline(
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


def png_bytes(image: np.ndarray) -> bytes:
    """An image as PNG bytes (for an ``ipywidgets.Image``).

    Parameters
    ----------
    image : np.ndarray, shape (H, W, 3) or (H, W), uint8
    """
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
