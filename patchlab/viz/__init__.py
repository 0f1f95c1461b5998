"""Plotly figures of every step, one module per step of the pipeline:

========================  ============================================================
``viz.features``          tapped maps, a patch's receptive field (notebook 1)
``viz.coreset``           coverage radius against the ratio, picked patches (notebook 2)
``viz.neighbours``        a patch's neighbours as crops, a UMAP of the bank, the
                          explorer's image and hover pictures (notebook 3, Fig. 5)
``viz.scoring``           anomaly maps over their images, in a grid (notebook 4)
``viz.evaluation``        ROC and PRO curves, K sweeps (notebook 5)
``viz._common``           the patch grid, PNG images and data URIs, crops, PNG export,
                          the names and titles of images
========================  ============================================================

Every builder takes plain arrays and returns a ``plotly.graph_objects.Figure`` whose trace data
are those arrays (maps shown at a ``stride`` are ``maps[:, ::stride, ::stride]``), so a test can
compare a figure with the values it was built from. Nothing here computes neighbours or scores:
the numbers come from :mod:`patchlab.experiment` and :mod:`patchlab.metrics`. The widgets
(:mod:`patchlab.widgets`) compose these figures and handle the events.

Imported only on demand (``import patchlab`` does not import plotly).
"""

from patchlab.viz._common import (
    MAP_COLORS,
    PATCH,
    data_uri,
    export_png,
    hide_axes,
    image_name,
    outline,
    patch_crop,
    png_bytes,
    tile_title,
)
from patchlab.viz.coreset import coreset_picks_figure, coverage_figure
from patchlab.viz.evaluation import (
    curves_figure,
    decimate,
    k_sweep_figure,
    pro_figure,
    roc_figure,
)
from patchlab.viz.features import layer_maps_figure, receptive_field_figure
from patchlab.viz.neighbours import (
    hover_picture,
    neighbour_crops_figure,
    patch_scores_figure,
    umap_embedding,
    umap_figure,
)
from patchlab.viz.scoring import MASK_RGB, cell_traces, map_range, overlay_grid, overlay_image

__all__ = [
    "MAP_COLORS",
    "MASK_RGB",
    "PATCH",
    "outline",
    "cell_traces",
    "coreset_picks_figure",
    "coverage_figure",
    "curves_figure",
    "data_uri",
    "decimate",
    "export_png",
    "hide_axes",
    "hover_picture",
    "image_name",
    "k_sweep_figure",
    "layer_maps_figure",
    "map_range",
    "neighbour_crops_figure",
    "overlay_grid",
    "overlay_image",
    "patch_crop",
    "patch_scores_figure",
    "png_bytes",
    "pro_figure",
    "receptive_field_figure",
    "roc_figure",
    "tile_title",
    "umap_embedding",
    "umap_figure",
]
