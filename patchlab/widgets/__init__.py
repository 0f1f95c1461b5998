"""Interactive explorers (ipywidgets + plotly ``FigureWidget``) on top of the core.

:class:`ScoringWidget` (:mod:`patchlab.widgets.scoring`): K slider, method, image score,
setting, category and backbone; anomaly-map overlays of the most anomalous images, re-scored
from the stored neighbour table as the controls move.

:class:`NeighbourExplorer` (:mod:`patchlab.widgets.neighbours`): the paper's Fig. 5, a patch's
nearest neighbours as crops and in a UMAP of the bank.

``patchlab.explore(result)`` opens the scoring widget on any run's result. The widgets compose
the figures of :mod:`patchlab.viz` and handle the events; they compute nothing themselves.
"""

from patchlab.widgets.neighbours import NeighbourExplorer, default_queries
from patchlab.widgets.scoring import TABLE_METHODS, ScoringWidget, explore

__all__ = ["TABLE_METHODS", "NeighbourExplorer", "ScoringWidget", "default_queries", "explore"]
