"""Run scikit-learn hyperparameter searches on a Celery cluster.

Swap ``GridSearchCV`` for :class:`ClusterGridSearchCV` and the same search
runs on every node of the cluster, with the ``cv_results_`` scikit-learn
would give.
"""

__version__ = "0.1.0"

from ._cluster import Cluster, LocalCluster, NodeInfo  # noqa: E402
from ._search import (  # noqa: E402
    ClusterGridSearchCV,
    ClusterHalvingGridSearchCV,
    ClusterHalvingRandomSearchCV,
    ClusterRandomizedSearchCV,
)

__all__ = [
    "Cluster",
    "ClusterGridSearchCV",
    "ClusterHalvingGridSearchCV",
    "ClusterHalvingRandomSearchCV",
    "ClusterRandomizedSearchCV",
    "LocalCluster",
    "NodeInfo",
    "__version__",
]
