"""What both widgets share: being shown by Jupyter, and swapping a figure in place."""

from __future__ import annotations

import ipywidgets as W
import plotly.graph_objects as go


class Displays:
    """Jupyter shows the object's ``widget`` (the ``VBox`` of all controls and figures)."""

    widget: W.Widget

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def replace_figure(current: go.FigureWidget, fig: go.Figure) -> None:
    """Swap the traces and layout of a ``FigureWidget`` in place (it keeps its place in the
    layout and its event handlers' widget)."""
    with current.batch_update():
        current.data = ()
        current.layout = {}
    current.add_traces(list(fig.data))
    current.layout = fig.layout
