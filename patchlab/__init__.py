"""patchlab: blind anomaly detection and localisation with PatchCluster.

The pipeline, one module per step (docs/architecture.md)::

    data -> backbones, features -> [coreset] -> knn -> methods -> maps -> metrics
    (experiment runs them in order, through cache; outputs writes a run; reproduce, cli)
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # lazy: ``import patchlab`` must not import ipywidgets or plotly
    if name == "explore":
        from patchlab.widgets import explore

        return explore
    raise AttributeError(f"module 'patchlab' has no attribute {name!r}")
