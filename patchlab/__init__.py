"""patchlab: blind anomaly detection and localisation with PatchCluster.

The pipeline, one module per step::

    data -> features -> knn -> methods -> maps -> metrics     (experiment runs them in order)
"""

__version__ = "0.1.0"
