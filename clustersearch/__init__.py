"""Run scikit-learn hyperparameter searches on a Celery cluster.

Swap ``GridSearchCV`` for :class:`ClusterGridSearchCV` and the same search
runs on every node of the cluster, with the ``cv_results_`` scikit-learn
would give.

The package is layered along the process boundary: :mod:`clustersearch.wire`
(what both sides share), :mod:`clustersearch.client` (the handles and the
dispatcher), :mod:`clustersearch.node` (what a worker runs), and the
estimators on top. The public names below load on first use, so that a
node (``import clustersearch.worker``) never loads the client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "Cluster",
    "ClusterExtraTreesClassifier",
    "ClusterExtraTreesRegressor",
    "ClusterGridSearchCV",
    "ClusterHalvingGridSearchCV",
    "ClusterHalvingRandomSearchCV",
    "ClusterRandomForestClassifier",
    "ClusterRandomForestRegressor",
    "ClusterRandomizedSearchCV",
    "ClusterStackingClassifier",
    "ClusterStackingRegressor",
    "LocalCluster",
    "NodeInfo",
    "Policy",
    "__version__",
]

# public name -> the module that defines it
_WHERE = {
    "Cluster": ".client.cluster",
    "NodeInfo": ".client.cluster",
    "LocalCluster": ".client.local",
    "Policy": ".client.policy",
    "ClusterGridSearchCV": "._search",
    "ClusterHalvingGridSearchCV": "._search",
    "ClusterHalvingRandomSearchCV": "._search",
    "ClusterRandomizedSearchCV": "._search",
    "ClusterExtraTreesClassifier": "._forest",
    "ClusterExtraTreesRegressor": "._forest",
    "ClusterRandomForestClassifier": "._forest",
    "ClusterRandomForestRegressor": "._forest",
    "ClusterStackingClassifier": "._stacking",
    "ClusterStackingRegressor": "._stacking",
}

if TYPE_CHECKING:
    from ._forest import (
        ClusterExtraTreesClassifier,
        ClusterExtraTreesRegressor,
        ClusterRandomForestClassifier,
        ClusterRandomForestRegressor,
    )
    from ._search import (
        ClusterGridSearchCV,
        ClusterHalvingGridSearchCV,
        ClusterHalvingRandomSearchCV,
        ClusterRandomizedSearchCV,
    )
    from ._stacking import ClusterStackingClassifier, ClusterStackingRegressor
    from .client.cluster import Cluster, NodeInfo
    from .client.local import LocalCluster
    from .client.policy import Policy


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'clustersearch' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
