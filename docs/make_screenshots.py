"""Make the README's two widget images from a real run on the demo data.

    python docs/make_screenshots.py        # writes docs/img/scoring_widget.png, neighbours.png

Each image is the widget's own plotly figure (its ``FigureWidget``) after the controls were set
in Python, exported with kaleido (``patchlab.viz.export_png``); the ipywidgets controls above the
figures are not part of the images. Random weights (``none``): ImageNet weights cannot be
downloaded where this ran.
"""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go

from patchlab import viz
from patchlab.config import RunConfig
from patchlab.demo import demo_path, make_demo_data
from patchlab.experiment import run
from patchlab.widgets import NeighbourExplorer, ScoringWidget

OUT = Path(__file__).resolve().parent / "img"


def main() -> None:
    data = make_demo_data(
        demo_path().parent / "demo_small",
        categories=["brick"],
        n_train=10,
        n_test_good=10,
        n_defective=12,
    )
    config = RunConfig(
        data=str(data), category="brick", setting="test", weights="none", k=10, k_max=50
    )
    result = run(config, progress=False)

    widget = ScoringWidget.from_result(result, n_show=8, pixel_metrics=True)
    widget.k.value = 10
    m = widget.result.metrics
    fig = go.Figure(widget.figure)
    fig.update_layout(
        title=dict(
            text=f"ScoringWidget: brick/test, PatchCluster K={widget.k.value}: pixel AUROC "
            f"{m['pixel_auroc']:.3f}, PRO {m['pro']:.3f} (random weights)",
            font=dict(size=15),
        ),
        margin=dict(t=70),
    )
    print(viz.export_png(fig, OUT / "scoring_widget.png", height=560))

    explorer = NeighbourExplorer(result, k=config.k)
    explorer.picker.value = explorer.queries["anomalous patch"]
    crops = go.Figure(explorer.crops_figure)
    print(viz.export_png(crops, OUT / "neighbour_crops.png"))
    umap = go.Figure(explorer.umap_figure)
    umap.update_layout(
        title=dict(
            text="NeighbourExplorer: UMAP of the bank, the anomalous patch (star) and "
            "its K neighbours",
            font=dict(size=14),
        ),
        width=820,
    )
    print(viz.export_png(umap, OUT / "neighbours_umap.png"))


if __name__ == "__main__":
    main()
