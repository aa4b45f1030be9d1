"""Forests whose trees are built on the nodes of a cluster.

Each class subclasses its scikit-learn original and changes one thing:
while ``fit`` runs, the forest's own tree-building ``joblib.Parallel``
(scikit-learn's ``_parallel_build_trees``, one call per tree) sends its
batches of trees to the nodes. scikit-learn still draws every tree's seed
in the client, from ``random_state``, before anything is sent; a tree's seed
drives both its bootstrap sample and its splits, so the trees built on the
nodes are the trees scikit-learn builds, in the same order. The fitted
trees come back to the client: ``predict``, ``apply``, the OOB score and
``feature_importances_`` run there, as in scikit-learn.

Inside a node's task (a forest that is the estimator of a cluster search)
the forest fits as plain scikit-learn: a node never sends work.
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Integral
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
from joblib import parallel_config
from sklearn import get_config
from sklearn.ensemble import (
    ExtraTreesClassifier,
    ExtraTreesRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)

from ._compat import Interval, StrOptions
from ._resident import KeepOnNodesMixin
from .client.backend import ClusterBackend
from .client.cluster import Cluster, resolve_cluster
from .client.session import processes_by_node
from .wire.context import in_node_task

if TYPE_CHECKING:
    from numpy.typing import ArrayLike
    from sklearn.ensemble._forest import BaseForest as _ForestBase
    from typing_extensions import Self

    _RandomState: TypeAlias = int | np.random.RandomState | None
    _MaxFeatures: TypeAlias = str | int | float | None
    _ClassWeight: TypeAlias = str | dict[Any, float] | list[dict[Any, float]] | None
else:
    # The mixin comes before a scikit-learn forest in each estimator's
    # bases; the type checker sees the forest's base as the mixin's own.
    _ForestBase = object

__all__ = [
    "ClusterExtraTreesClassifier",
    "ClusterExtraTreesRegressor",
    "ClusterRandomForestClassifier",
    "ClusterRandomForestRegressor",
]

_CLUSTER_CONSTRAINT = {
    "cluster": [None, str, Cluster],
    "keep": [StrOptions({"client", "nodes"})],
    "replicas": [Interval(Integral, 1, None, closed="left")],
}

# The most bytes of trees one task sends back, once the first trees have
# shown their size: a result is one broker message (RabbitMQ 4 refuses
# messages over 16 MiB; a result is its trees' pickle, zlib-compressed over
# a network, and a few hundred bytes of frame).
MAX_RESULT_BYTES = 8 * 1024 * 1024

_CLUSTER_DOC = """
    cluster : Cluster, LocalCluster or str, default=None
        Where the trees are built. A :class:`~clustersearch.Cluster`, a
        :class:`~clustersearch.LocalCluster`, or a broker URL. None uses
        ``CLUSTERSEARCH_BROKER_URL`` (and ``CLUSTERSEARCH_RESULT_BACKEND``)
        when set, else an embedded :class:`~clustersearch.LocalCluster` with
        one node per CPU core, started on first use and kept for the process.
        Inside a fit on a node (the forest is the estimator of a cluster
        search) the trees are built in that fit's process.
    keep : {"client", "nodes"}, default="client"
        Where the fitted trees live. ``"client"``: they come back and the
        forest is a scikit-learn forest. ``"nodes"``: each part of the
        forest stays in the stores of the nodes that built it (``replicas``
        of them), the forest holds a handle (it pickles in a few kB), and
        ``predict``, ``predict_proba``, ``predict_log_proba`` and ``score``
        ask the nodes, which send back their parts' sums; see
        :meth:`to_local` and :meth:`delete`. For forests bigger than one
        machine holds. ``oob_score`` and ``warm_start`` need ``"client"``.
    replicas : int, default=2
        With ``keep="nodes"``: on how many nodes each part is kept (at most
        the number of nodes); predictions survive the loss of
        ``replicas - 1`` of them."""

_FITTED_DOC = """\
    fits_per_node_ : dict of str -> int
        How many trees of the last ``fit`` each node built (with
        ``warm_start``, the trees that fit added; with ``keep="nodes"``, the
        trees of every copy it keeps). Empty where the forest was fitted
        inside a node's task.
    fit_processes_ : dict of str -> list of int
        The process ids, on each node, of the worker processes that built
        the trees (a node's pool processes).
    result_bytes_per_node_ : dict of str -> int
        Bytes of pickled trees each node sent back in the last ``fit``.
"""

_SAME_AS = """\
    A drop-in replacement for :class:`sklearn.ensemble.{name}`: same
    parameters and fitted attributes, plus ``cluster``. With an integer
    ``random_state`` the fitted forest is the one scikit-learn fits (the same
    trees in the same order; see docs/ensembles.md). The trees are built on
    the nodes, a batch of trees per task; the data goes to each node once.
    ``n_jobs`` is accepted and does not limit the cluster; it still sets the
    threads of ``predict`` and the other methods, which run in the client on
    the fitted trees."""


class _ClusterForestMixin(KeepOnNodesMixin, _ForestBase):
    """What the four forests add to their scikit-learn original."""

    if TYPE_CHECKING:
        cluster: Cluster | str | None
        verbose: int
        n_estimators: int
        warm_start: bool
        estimators_: list[Any]
        fits_per_node_: dict[str, int]
        fit_processes_: dict[str, list[int]]
        result_bytes_per_node_: dict[str, int]

    def fit(self, X: ArrayLike, y: ArrayLike, sample_weight: ArrayLike | None = None) -> Self:
        """Build a forest of trees from the training set (X, y), on the cluster.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            The training input samples, as in scikit-learn.
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
            The target values.
        sample_weight : array-like of shape (n_samples,), default=None
            Sample weights, as in scikit-learn.

        Returns
        -------
        self : object
            Fitted estimator.
        """
        if in_node_task():
            # A fit on a node (this forest is a search's estimator): the
            # node's process builds the trees, as scikit-learn would.
            super().fit(X, y, sample_weight=sample_weight)
            self.fits_per_node_, self.fit_processes_, self.result_bytes_per_node_ = {}, {}, {}
            return self
        # scikit-learn's own validation first: nothing is sent for a typo.
        if not get_config()["skip_parameter_validation"]:
            self._validate_params()
        if self.keep == "nodes":
            # The trees stay on the nodes; this forest holds a handle.
            self._fit_on_nodes(X, y, sample_weight)
            handle = self.resident_
            assert handle is not None
            built: dict[str, int] = {}
            for (start, stop), holders in zip(handle.parts, handle.holders):
                for node in holders:
                    built[node] = built.get(node, 0) + stop - start
            # Trees each node built, its copies of parts included.
            self.fits_per_node_ = dict(sorted(built.items()))
            self.fit_processes_ = processes_by_node(
                handle.last_run.get("pids", set()), self.fits_per_node_
            )
            self.result_bytes_per_node_ = {}
            return self
        self.__dict__.pop("resident_", None)
        cluster = resolve_cluster(self.cluster)
        with cluster.session(verbose=self.verbose) as session:
            old = len(getattr(self, "estimators_", ())) if self.warm_start else 0
            session.progress.expect(max(self.n_estimators - old, 0))
            # Only the forest's tree-building Parallel (prefer="threads")
            # goes to the cluster; predict's (require="sharedmem") and any
            # other stay local.
            backend = ClusterBackend(
                session, first_only=True, accept_threads=True, max_result_bytes=MAX_RESULT_BYTES
            )
            with parallel_config(backend=backend):
                super().fit(X, y, sample_weight=sample_weight)
        session.reraise_warnings(stacklevel=2)
        self.fits_per_node_ = dict(sorted(session.fits_per_node.items()))
        self.fit_processes_ = processes_by_node(session.pids, self.fits_per_node_)
        self.result_bytes_per_node_ = dict(sorted(session.stats.result_bytes_per_node.items()))
        return self


class ClusterRandomForestClassifier(_ClusterForestMixin, RandomForestClassifier):
    __doc__ = f"""A random forest classifier, its trees built on a cluster.

{_SAME_AS.format(name="RandomForestClassifier")}

    Parameters
    ----------
    n_estimators, criterion, max_depth, min_samples_split, min_samples_leaf, \
min_weight_fraction_leaf, max_features, max_leaf_nodes, \
min_impurity_decrease, bootstrap, oob_score, n_jobs, random_state, \
verbose, warm_start, class_weight, ccp_alpha, max_samples, monotonic_cst
        As in :class:`sklearn.ensemble.RandomForestClassifier`.
{_CLUSTER_DOC}

    Attributes
    ----------
    estimators_, classes_, n_classes_, n_features_in_, feature_names_in_, \
n_outputs_, feature_importances_, oob_score_, oob_decision_function_, \
estimators_samples_
        As in :class:`sklearn.ensemble.RandomForestClassifier`
        (those that it sets).
{_FITTED_DOC}
    See Also
    --------
    sklearn.ensemble.RandomForestClassifier : the original, in-process.
    ClusterExtraTreesClassifier : extremely randomized trees on a cluster.
    """

    _parameter_constraints = {**RandomForestClassifier._parameter_constraints, **_CLUSTER_CONSTRAINT}

    def __init__(
        self,
        n_estimators: int = 100,
        *,
        criterion: str = "gini",
        max_depth: int | None = None,
        min_samples_split: int | float = 2,
        min_samples_leaf: int | float = 1,
        min_weight_fraction_leaf: float = 0.0,
        max_features: _MaxFeatures = "sqrt",
        max_leaf_nodes: int | None = None,
        min_impurity_decrease: float = 0.0,
        bootstrap: bool = True,
        oob_score: bool | Callable[..., Any] = False,
        n_jobs: int | None = None,
        random_state: _RandomState = None,
        verbose: int = 0,
        warm_start: bool = False,
        class_weight: _ClassWeight = None,
        ccp_alpha: float = 0.0,
        max_samples: int | float | None = None,
        monotonic_cst: ArrayLike | None = None,
        cluster: Cluster | str | None = None,
        keep: str = "client",
        replicas: int = 2,
    ) -> None:
        super().__init__(
            n_estimators=n_estimators,
            criterion=criterion,
            max_depth=max_depth,
            min_samples_split=min_samples_split,
            min_samples_leaf=min_samples_leaf,
            min_weight_fraction_leaf=min_weight_fraction_leaf,
            max_features=max_features,
            max_leaf_nodes=max_leaf_nodes,
            min_impurity_decrease=min_impurity_decrease,
            bootstrap=bootstrap,
            oob_score=oob_score,
            n_jobs=n_jobs,
            random_state=random_state,
            verbose=verbose,
            warm_start=warm_start,
            class_weight=class_weight,
            ccp_alpha=ccp_alpha,
            max_samples=max_samples,
            monotonic_cst=monotonic_cst,
        )
        self.cluster = cluster
        self.keep = keep
        self.replicas = replicas


class ClusterRandomForestRegressor(_ClusterForestMixin, RandomForestRegressor):
    __doc__ = f"""A random forest regressor, its trees built on a cluster.

{_SAME_AS.format(name="RandomForestRegressor")}

    Parameters
    ----------
    n_estimators, criterion, max_depth, min_samples_split, min_samples_leaf, \
min_weight_fraction_leaf, max_features, max_leaf_nodes, \
min_impurity_decrease, bootstrap, oob_score, n_jobs, random_state, \
verbose, warm_start, ccp_alpha, max_samples, monotonic_cst
        As in :class:`sklearn.ensemble.RandomForestRegressor`.
{_CLUSTER_DOC}

    Attributes
    ----------
    estimators_, n_features_in_, feature_names_in_, n_outputs_, \
feature_importances_, oob_score_, oob_prediction_, estimators_samples_
        As in :class:`sklearn.ensemble.RandomForestRegressor`
        (those that it sets).
{_FITTED_DOC}
    See Also
    --------
    sklearn.ensemble.RandomForestRegressor : the original, in-process.
    ClusterExtraTreesRegressor : extremely randomized trees on a cluster.
    """

    _parameter_constraints = {**RandomForestRegressor._parameter_constraints, **_CLUSTER_CONSTRAINT}

    def __init__(
        self,
        n_estimators: int = 100,
        *,
        criterion: str = "squared_error",
        max_depth: int | None = None,
        min_samples_split: int | float = 2,
        min_samples_leaf: int | float = 1,
        min_weight_fraction_leaf: float = 0.0,
        max_features: _MaxFeatures = 1.0,
        max_leaf_nodes: int | None = None,
        min_impurity_decrease: float = 0.0,
        bootstrap: bool = True,
        oob_score: bool | Callable[..., Any] = False,
        n_jobs: int | None = None,
        random_state: _RandomState = None,
        verbose: int = 0,
        warm_start: bool = False,
        ccp_alpha: float = 0.0,
        max_samples: int | float | None = None,
        monotonic_cst: ArrayLike | None = None,
        cluster: Cluster | str | None = None,
        keep: str = "client",
        replicas: int = 2,
    ) -> None:
        super().__init__(
            n_estimators=n_estimators,
            criterion=criterion,
            max_depth=max_depth,
            min_samples_split=min_samples_split,
            min_samples_leaf=min_samples_leaf,
            min_weight_fraction_leaf=min_weight_fraction_leaf,
            max_features=max_features,
            max_leaf_nodes=max_leaf_nodes,
            min_impurity_decrease=min_impurity_decrease,
            bootstrap=bootstrap,
            oob_score=oob_score,
            n_jobs=n_jobs,
            random_state=random_state,
            verbose=verbose,
            warm_start=warm_start,
            ccp_alpha=ccp_alpha,
            max_samples=max_samples,
            monotonic_cst=monotonic_cst,
        )
        self.cluster = cluster
        self.keep = keep
        self.replicas = replicas


class ClusterExtraTreesClassifier(_ClusterForestMixin, ExtraTreesClassifier):
    __doc__ = f"""An extra-trees classifier, its trees built on a cluster.

{_SAME_AS.format(name="ExtraTreesClassifier")}

    Parameters
    ----------
    n_estimators, criterion, max_depth, min_samples_split, min_samples_leaf, \
min_weight_fraction_leaf, max_features, max_leaf_nodes, \
min_impurity_decrease, bootstrap, oob_score, n_jobs, random_state, \
verbose, warm_start, class_weight, ccp_alpha, max_samples, monotonic_cst
        As in :class:`sklearn.ensemble.ExtraTreesClassifier`.
{_CLUSTER_DOC}

    Attributes
    ----------
    estimators_, classes_, n_classes_, n_features_in_, feature_names_in_, \
n_outputs_, feature_importances_, oob_score_, oob_decision_function_, \
estimators_samples_
        As in :class:`sklearn.ensemble.ExtraTreesClassifier`
        (those that it sets).
{_FITTED_DOC}
    See Also
    --------
    sklearn.ensemble.ExtraTreesClassifier : the original, in-process.
    ClusterRandomForestClassifier : a random forest on a cluster.
    """

    _parameter_constraints = {**ExtraTreesClassifier._parameter_constraints, **_CLUSTER_CONSTRAINT}

    def __init__(
        self,
        n_estimators: int = 100,
        *,
        criterion: str = "gini",
        max_depth: int | None = None,
        min_samples_split: int | float = 2,
        min_samples_leaf: int | float = 1,
        min_weight_fraction_leaf: float = 0.0,
        max_features: _MaxFeatures = "sqrt",
        max_leaf_nodes: int | None = None,
        min_impurity_decrease: float = 0.0,
        bootstrap: bool = False,
        oob_score: bool | Callable[..., Any] = False,
        n_jobs: int | None = None,
        random_state: _RandomState = None,
        verbose: int = 0,
        warm_start: bool = False,
        class_weight: _ClassWeight = None,
        ccp_alpha: float = 0.0,
        max_samples: int | float | None = None,
        monotonic_cst: ArrayLike | None = None,
        cluster: Cluster | str | None = None,
        keep: str = "client",
        replicas: int = 2,
    ) -> None:
        super().__init__(
            n_estimators=n_estimators,
            criterion=criterion,
            max_depth=max_depth,
            min_samples_split=min_samples_split,
            min_samples_leaf=min_samples_leaf,
            min_weight_fraction_leaf=min_weight_fraction_leaf,
            max_features=max_features,
            max_leaf_nodes=max_leaf_nodes,
            min_impurity_decrease=min_impurity_decrease,
            bootstrap=bootstrap,
            oob_score=oob_score,
            n_jobs=n_jobs,
            random_state=random_state,
            verbose=verbose,
            warm_start=warm_start,
            class_weight=class_weight,
            ccp_alpha=ccp_alpha,
            max_samples=max_samples,
            monotonic_cst=monotonic_cst,
        )
        self.cluster = cluster
        self.keep = keep
        self.replicas = replicas


class ClusterExtraTreesRegressor(_ClusterForestMixin, ExtraTreesRegressor):
    __doc__ = f"""An extra-trees regressor, its trees built on a cluster.

{_SAME_AS.format(name="ExtraTreesRegressor")}

    Parameters
    ----------
    n_estimators, criterion, max_depth, min_samples_split, min_samples_leaf, \
min_weight_fraction_leaf, max_features, max_leaf_nodes, \
min_impurity_decrease, bootstrap, oob_score, n_jobs, random_state, \
verbose, warm_start, ccp_alpha, max_samples, monotonic_cst
        As in :class:`sklearn.ensemble.ExtraTreesRegressor`.
{_CLUSTER_DOC}

    Attributes
    ----------
    estimators_, n_features_in_, feature_names_in_, n_outputs_, \
feature_importances_, oob_score_, oob_prediction_, estimators_samples_
        As in :class:`sklearn.ensemble.ExtraTreesRegressor`
        (those that it sets).
{_FITTED_DOC}
    See Also
    --------
    sklearn.ensemble.ExtraTreesRegressor : the original, in-process.
    ClusterRandomForestRegressor : a random forest on a cluster.
    """

    _parameter_constraints = {**ExtraTreesRegressor._parameter_constraints, **_CLUSTER_CONSTRAINT}

    def __init__(
        self,
        n_estimators: int = 100,
        *,
        criterion: str = "squared_error",
        max_depth: int | None = None,
        min_samples_split: int | float = 2,
        min_samples_leaf: int | float = 1,
        min_weight_fraction_leaf: float = 0.0,
        max_features: _MaxFeatures = 1.0,
        max_leaf_nodes: int | None = None,
        min_impurity_decrease: float = 0.0,
        bootstrap: bool = False,
        oob_score: bool | Callable[..., Any] = False,
        n_jobs: int | None = None,
        random_state: _RandomState = None,
        verbose: int = 0,
        warm_start: bool = False,
        ccp_alpha: float = 0.0,
        max_samples: int | float | None = None,
        monotonic_cst: ArrayLike | None = None,
        cluster: Cluster | str | None = None,
        keep: str = "client",
        replicas: int = 2,
    ) -> None:
        super().__init__(
            n_estimators=n_estimators,
            criterion=criterion,
            max_depth=max_depth,
            min_samples_split=min_samples_split,
            min_samples_leaf=min_samples_leaf,
            min_weight_fraction_leaf=min_weight_fraction_leaf,
            max_features=max_features,
            max_leaf_nodes=max_leaf_nodes,
            min_impurity_decrease=min_impurity_decrease,
            bootstrap=bootstrap,
            oob_score=oob_score,
            n_jobs=n_jobs,
            random_state=random_state,
            verbose=verbose,
            warm_start=warm_start,
            ccp_alpha=ccp_alpha,
            max_samples=max_samples,
            monotonic_cst=monotonic_cst,
        )
        self.cluster = cluster
        self.keep = keep
        self.replicas = replicas
