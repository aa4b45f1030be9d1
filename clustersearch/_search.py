"""The estimators: scikit-learn's searches, with every fit on the cluster.

Each class subclasses its scikit-learn original and changes one thing: while
``fit`` runs, the search's own ``joblib.Parallel`` sends its batches of
(candidate, split) fits to the nodes. scikit-learn still splits the data,
builds ``cv_results_`` and refits ``best_estimator_`` in the client.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
from joblib import parallel_config
from sklearn import get_config
from sklearn.experimental import enable_halving_search_cv  # noqa: F401
from sklearn.model_selection import (
    GridSearchCV,
    HalvingGridSearchCV,
    HalvingRandomSearchCV,
    RandomizedSearchCV,
)

from ._compat import get_active_backend
from .client.backend import ClusterBackend
from .client.cluster import Cluster, resolve_cluster
from .client.journal import open_journal
from .exceptions import CallbackNotSupportedError, NotPicklableError
from .wire.serialization import dumps

if TYPE_CHECKING:
    from numpy.typing import ArrayLike
    from sklearn.base import BaseEstimator
    from sklearn.model_selection import BaseCrossValidator, BaseShuffleSplit
    from sklearn.model_selection._search import BaseSearchCV as _SearchBase
    from typing_extensions import Self

    from .client.cluster import NodeInfo
    from .client.session import Session

    # What the estimators' parameters take, as scikit-learn documents them.
    _Grid: TypeAlias = Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Sequence[Any]]]
    _Distributions: TypeAlias = Mapping[str, Any] | Sequence[Mapping[str, Any]]
    _Scoring: TypeAlias = str | Callable[..., Any] | Sequence[str] | Mapping[str, Callable[..., Any]] | None
    _Refit: TypeAlias = bool | str | Callable[..., Any]
    # An int, a splitter, or an iterable of (train, test) index arrays.
    _CV: TypeAlias = int | BaseCrossValidator | BaseShuffleSplit | Iterable[Any] | None
    _RandomState: TypeAlias = int | np.random.RandomState | None
else:
    # The mixin comes before a scikit-learn search in each estimator's bases;
    # the type checker sees that search's base as the mixin's own.
    _SearchBase = object

__all__ = [
    "ClusterGridSearchCV",
    "ClusterHalvingGridSearchCV",
    "ClusterHalvingRandomSearchCV",
    "ClusterRandomizedSearchCV",
]

_CLUSTER_CONSTRAINT = {
    "cluster": [None, str, Cluster],
    "journal": [None, "boolean", str, os.PathLike],
    # The value is checked by open_journal (one of REUSE).
    "journal_reuse": [str],
}

_TRAFFIC_DOC = """\
    fit_processes_ : dict of str -> list of int
        The process ids, on each node, of the worker processes that ran this
        search's fits (a node's pool processes).
    data_bytes_per_node_ : dict of str -> int
        Bytes of data (X, y, fit params, split indices) sent to each node by
        this search; 0 where the node's cache already held them.
    message_bytes_per_node_ : dict of str -> int
        Bytes of task messages (estimators, parameters, references to the
        data) sent to each node.
    fits_from_journal_ : int
        Fits answered from the journal (or collected from a dead client's
        batches) instead of run; 0 without a journal.
"""

_CLUSTER_DOC = """
    cluster : Cluster, LocalCluster or str, default=None
        Where the fits run. A :class:`~clustersearch.Cluster`, a
        :class:`~clustersearch.LocalCluster`, or a broker URL. None uses
        ``CLUSTERSEARCH_BROKER_URL`` (and ``CLUSTERSEARCH_RESULT_BACKEND``)
        when set, else an embedded :class:`~clustersearch.LocalCluster` with
        one node per CPU core, started on first use and kept for the process.
    journal : str, path, bool or None, default=None
        A file where every finished fit is recorded as it arrives (SQLite),
        so that a search rerun after the client died, a larger grid or
        another search over the same data and folds runs only the fits the
        journal lacks (docs/journal.md). True: ``journal.sqlite`` in the
        user cache folder. None: ``CLUSTERSEARCH_JOURNAL`` when set, else off.
    journal_reuse : {"seeded", "always", "any-version", "never"}, default="seeded"
        Which recorded fits are reused. "seeded": those of the same Python,
        scikit-learn, numpy and clustersearch versions whose estimator has no
        ``random_state=None`` (scikit-learn gives those a different result
        each run); "always": those too; "any-version": seeded fits of other
        versions too; "never": record only.
"""


class _ClusterSearchMixin(_SearchBase):
    """What the four estimators add to their scikit-learn original."""

    if TYPE_CHECKING:
        # Parameters and fitted attributes the mixin reads or sets (the
        # scikit-learn search sets verbose and n_splits_).
        cluster: Cluster | str | None
        journal: str | os.PathLike[str] | bool | None
        journal_reuse: str
        verbose: int
        n_splits_: int
        fits_per_node_: dict[str, int]
        fit_processes_: dict[str, list[int]]
        data_bytes_per_node_: dict[str, int]
        message_bytes_per_node_: dict[str, int]
        fits_from_journal_: int

    def fit(self, X: ArrayLike, y: ArrayLike | None = None, **params: Any) -> Self:
        """Run fit with all sets of parameters, every fit on the cluster.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training vectors.
        y : array-like of shape (n_samples,) or (n_samples, n_outputs), default=None
            Target relative to X; None for unsupervised learning.
        **params : dict of str -> object
            Parameters passed to the ``fit`` method of the estimator, the
            scorer and the CV splitter, as in scikit-learn.

        Returns
        -------
        self : object
            Instance of fitted estimator.
        """
        # scikit-learn's own validation first: nothing is sent for a typo.
        if not get_config()["skip_parameter_validation"]:
            self._validate_params()
        cluster = resolve_cluster(self.cluster)
        journal = open_journal(self.journal, self.journal_reuse)
        callbacks = _callbacks(self)
        _check_picklable(self, params, whole=bool(callbacks))
        # scikit-learn passes the search itself to every fit, for callbacks
        # only: without callbacks it stays here (its cv may be a generator).
        drop = None if callbacks else self
        try:
            with cluster.session(verbose=self.verbose, drop=drop) as session:
                _check_callbacks(callbacks, session.nodes.values())
                if journal is not None:
                    journal.begin(self, X, y, params, session)
                    session.journal = journal
                # Only the search's own Parallel goes to the cluster; the refit
                # (and anything else in the client) stays local.
                with parallel_config(backend=ClusterBackend(session, first_only=True)):
                    super().fit(X, y, **params)
        finally:
            if journal is not None:
                journal.close()
        self.fits_from_journal_ = journal.hits + journal.collected if journal else 0
        self.fits_per_node_ = dict(sorted(session.fits_per_node.items()))
        self.fit_processes_ = {
            n: sorted(p for m, p in session.pids if m == n) for n in self.fits_per_node_
        }
        nodes = sorted(set(session.tasks_per_node) | set(session.data_bytes_per_node))
        self.data_bytes_per_node_ = {n: session.data_bytes_per_node[n] for n in nodes}
        self.message_bytes_per_node_ = {n: session.task_bytes_per_node[n] for n in nodes}
        if self.verbose > 0:
            print(_traffic_summary(session))
        return self

    def _run_search(
        self, evaluate_candidates: Callable[..., Any], *, callback_ctx: Any = None
    ) -> Any:
        backend, _ = get_active_backend()
        expected = [0]

        def counted(
            candidate_params: Iterable[Mapping[str, Any]], *args: Any, **kwargs: Any
        ) -> Any:
            candidate_params = list(candidate_params)
            if isinstance(backend, ClusterBackend):
                n_fits = len(candidate_params) * self.n_splits_
                backend.session.progress.expect(n_fits)
                if backend.session.journal is not None:
                    backend.session.journal.expect(n_fits, expected)
            return evaluate_candidates(candidate_params, *args, **kwargs)

        return super()._run_search(counted, callback_ctx=callback_ctx)


def _megabytes(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _traffic_summary(session: Session) -> str:
    """One line on what a search sent, for verbose output."""
    data = session.data_bytes_per_node
    tasks = sum(session.tasks_per_node.values())
    message_bytes = sum(session.task_bytes_per_node.values())
    per_node = ", ".join(f"{n} {_megabytes(b)}" for n, b in sorted(data.items()) if b)
    return (
        f"[clustersearch] data sent: {_megabytes(sum(data.values()))}"
        + (f" ({per_node})" if per_node else " (the nodes had it cached)")
        + f"; {tasks} task messages, {message_bytes / max(tasks, 1) / 1e3:.1f} kB each"
    )


def _callbacks(search: BaseEstimator) -> list[tuple[str, str]]:
    """``(where, callback class name)`` of every scikit-learn callback set on
    the search or its parameters."""
    owners = [("the search", search)] + [
        (f"the parameter {name}", value)
        for name, value in search.get_params(deep=True).items()
        if not isinstance(value, type)
    ]  # fmt: skip
    return [
        (where, type(cb).__name__)
        for where, obj in owners
        for cb in getattr(obj, "_skl_callbacks", None) or ()
    ]


def _check_callbacks(found: list[tuple[str, str]], nodes: Iterable[NodeInfo]) -> None:
    """Refuse scikit-learn callbacks that the nodes could not report back.

    A callback's copy in a worker reports to the client over a local socket
    (``sklearn.callback``): a node on another machine cannot reach it, and
    every fit there would fail inside the callback (an ``error_score`` entry,
    or the search's end). Nodes on this machine reach it. ``found`` is what
    :func:`_callbacks` returns.
    """
    if not found:
        return
    here = socket.gethostname()
    remote = [n for n in nodes if n.host != here]
    if remote:
        where, name = found[0]
        node = remote[0]
        raise CallbackNotSupportedError(
            f"{name} (a scikit-learn callback on {where}) reports to this process "
            f"over a local socket, which node {node.name!r} on host {node.host!r} "
            "cannot reach. Remove the callbacks (set_callbacks() with no argument), "
            "or run the nodes on this machine (LocalCluster)"
        )


# Parameters of a search that never leave the client: the splitter (the
# client splits; a generator cv is fine), the refit callable, the cluster.
_STAYS_HERE = {
    "cv", "refit", "cluster", "n_jobs", "pre_dispatch", "verbose", "journal", "journal_reuse",
}  # fmt: skip


def _check_picklable(
    search: BaseEstimator, fit_params: Mapping[str, Any], *, whole: bool = False
) -> None:
    """Name what cannot travel to the nodes, before anything is sent.

    A task carries a clone of the estimator with a candidate's parameters,
    the scorers, ``error_score`` and the fit params; with scikit-learn
    callbacks set (``whole``), the search itself too.
    """
    travels = search.get_params(deep=False)
    if not whole:
        travels = {k: v for k, v in travels.items() if k not in _STAYS_HERE}
    for name, value in travels.items():
        _raise_if_unpicklable(name, value)
    for name, value in fit_params.items():
        if not isinstance(value, np.ndarray):
            _raise_if_unpicklable(f"fit parameter {name}", value)


def _raise_if_unpicklable(path: str, value: object) -> None:
    try:
        dumps(value)
        return
    except Exception as exc:
        error = exc
    inner = _children(value)
    for child_path, child in inner:
        _raise_if_unpicklable(f"{path}{child_path}", child)
    raise NotPicklableError(
        f"cannot send {path}={value!r} to the nodes: {error}. Everything a "
        "search sends must pickle: define classes and functions at module "
        "level (or in the notebook), and keep locks, open files and "
        "connections out of estimators and parameters"
    ) from error


def _children(value: object) -> list[tuple[str, Any]]:
    if hasattr(value, "get_params") and not isinstance(value, type):
        try:
            return [(f".{k}", v) for k, v in value.get_params(deep=False).items()]
        except Exception:
            return []
    if isinstance(value, dict):
        return [(f"[{k!r}]", v) for k, v in value.items()]
    if isinstance(value, (list, tuple)):
        return [(f"[{i}]", v) for i, v in enumerate(value)]
    return []


class ClusterGridSearchCV(_ClusterSearchMixin, GridSearchCV):
    __doc__ = f"""Exhaustive search over a parameter grid, every fit on a cluster.

    A drop-in replacement for :class:`sklearn.model_selection.GridSearchCV`:
    same parameters, attributes and ``cv_results_``, plus ``cluster``.

    Parameters
    ----------
    estimator, param_grid, scoring, n_jobs, refit, cv, verbose, pre_dispatch, \
error_score, return_train_score
        As in :class:`sklearn.model_selection.GridSearchCV`. ``n_jobs`` and
        ``pre_dispatch`` are accepted; the cluster's parallelism is its nodes'
        total concurrency.
{_CLUSTER_DOC}
    Attributes
    ----------
    cv_results_, best_estimator_, best_score_, best_params_, best_index_, \
scorer_, n_splits_, refit_time_, multimetric_, classes_, n_features_in_
        As in :class:`sklearn.model_selection.GridSearchCV`.
    fits_per_node_ : dict of str -> int
        How many fits each node ran.
{_TRAFFIC_DOC}
    See Also
    --------
    sklearn.model_selection.GridSearchCV : the original, in-process.
    ClusterRandomizedSearchCV : random search on a cluster.

    Examples
    --------
    >>> from sklearn.datasets import load_iris
    >>> from sklearn.svm import SVC
    >>> from clustersearch import ClusterGridSearchCV, LocalCluster
    >>> X, y = load_iris(return_X_y=True)
    >>> with LocalCluster(n_workers=2) as cluster:  # doctest: +SKIP
    ...     search = ClusterGridSearchCV(
    ...         SVC(), {{"C": [1, 10], "kernel": ["linear", "rbf"]}}, cluster=cluster
    ...     ).fit(X, y)
    >>> search.best_params_  # doctest: +SKIP
    {{'C': 1, 'kernel': 'linear'}}
    """

    _parameter_constraints = {**GridSearchCV._parameter_constraints, **_CLUSTER_CONSTRAINT}

    def __init__(
        self,
        estimator: BaseEstimator,
        param_grid: _Grid,
        *,
        scoring: _Scoring = None,
        n_jobs: int | None = None,
        refit: _Refit = True,
        cv: _CV = None,
        verbose: int = 0,
        pre_dispatch: int | str = "2*n_jobs",
        error_score: float | str = np.nan,
        return_train_score: bool = False,
        cluster: Cluster | str | None = None,
        journal: str | os.PathLike[str] | bool | None = None,
        journal_reuse: str = "seeded",
    ) -> None:
        super().__init__(
            estimator,
            param_grid,
            scoring=scoring,
            n_jobs=n_jobs,
            refit=refit,
            cv=cv,
            verbose=verbose,
            pre_dispatch=pre_dispatch,
            error_score=error_score,
            return_train_score=return_train_score,
        )
        self.cluster = cluster
        self.journal = journal
        self.journal_reuse = journal_reuse


class ClusterRandomizedSearchCV(_ClusterSearchMixin, RandomizedSearchCV):
    __doc__ = f"""Randomized search on hyperparameters, every fit on a cluster.

    A drop-in replacement for :class:`sklearn.model_selection.RandomizedSearchCV`:
    the candidates are sampled in the client, so a ``random_state`` gives the
    same candidates and the same ``cv_results_``.

    Parameters
    ----------
    estimator, param_distributions, n_iter, scoring, n_jobs, refit, cv, \
verbose, pre_dispatch, random_state, error_score, return_train_score
        As in :class:`sklearn.model_selection.RandomizedSearchCV`.
{_CLUSTER_DOC}
    Attributes
    ----------
    fits_per_node_ : dict of str -> int
        How many fits each node ran; the others as in scikit-learn.
{_TRAFFIC_DOC}
    See Also
    --------
    sklearn.model_selection.RandomizedSearchCV : the original, in-process.
    ClusterGridSearchCV : exhaustive search on a cluster.
    """

    _parameter_constraints = {
        **RandomizedSearchCV._parameter_constraints,
        **_CLUSTER_CONSTRAINT,
    }

    def __init__(
        self,
        estimator: BaseEstimator,
        param_distributions: _Distributions,
        *,
        n_iter: int = 10,
        scoring: _Scoring = None,
        n_jobs: int | None = None,
        refit: _Refit = True,
        cv: _CV = None,
        verbose: int = 0,
        pre_dispatch: int | str = "2*n_jobs",
        random_state: _RandomState = None,
        error_score: float | str = np.nan,
        return_train_score: bool = False,
        cluster: Cluster | str | None = None,
        journal: str | os.PathLike[str] | bool | None = None,
        journal_reuse: str = "seeded",
    ) -> None:
        super().__init__(
            estimator,
            param_distributions,
            n_iter=n_iter,
            scoring=scoring,
            n_jobs=n_jobs,
            refit=refit,
            cv=cv,
            verbose=verbose,
            pre_dispatch=pre_dispatch,
            random_state=random_state,
            error_score=error_score,
            return_train_score=return_train_score,
        )
        self.cluster = cluster
        self.journal = journal
        self.journal_reuse = journal_reuse


class ClusterHalvingGridSearchCV(_ClusterSearchMixin, HalvingGridSearchCV):
    __doc__ = f"""Successive halving over a grid, every round's fits on a cluster.

    A drop-in replacement for :class:`sklearn.model_selection.HalvingGridSearchCV`
    (no ``enable_halving_search_cv`` import needed).

    Parameters
    ----------
    estimator, param_grid, factor, resource, max_resources, min_resources, \
aggressive_elimination, cv, scoring, refit, error_score, return_train_score, \
random_state, n_jobs, verbose
        As in :class:`sklearn.model_selection.HalvingGridSearchCV`.
{_CLUSTER_DOC}
    Attributes
    ----------
    fits_per_node_ : dict of str -> int
        How many fits each node ran, all rounds together.
{_TRAFFIC_DOC}
    See Also
    --------
    sklearn.model_selection.HalvingGridSearchCV : the original, in-process.
    """

    _parameter_constraints = {
        **HalvingGridSearchCV._parameter_constraints,
        **_CLUSTER_CONSTRAINT,
    }

    def __init__(
        self,
        estimator: BaseEstimator,
        param_grid: _Grid,
        *,
        factor: float = 3,
        resource: str = "n_samples",
        max_resources: int | str = "auto",
        min_resources: int | str = "exhaust",
        aggressive_elimination: bool = False,
        cv: _CV = 5,
        scoring: _Scoring = None,
        refit: _Refit = True,
        error_score: float | str = np.nan,
        return_train_score: bool = True,
        random_state: _RandomState = None,
        n_jobs: int | None = None,
        verbose: int = 0,
        cluster: Cluster | str | None = None,
        journal: str | os.PathLike[str] | bool | None = None,
        journal_reuse: str = "seeded",
    ) -> None:
        super().__init__(
            estimator,
            param_grid,
            factor=factor,
            resource=resource,
            max_resources=max_resources,
            min_resources=min_resources,
            aggressive_elimination=aggressive_elimination,
            cv=cv,
            scoring=scoring,
            refit=refit,
            error_score=error_score,
            return_train_score=return_train_score,
            random_state=random_state,
            n_jobs=n_jobs,
            verbose=verbose,
        )
        self.cluster = cluster
        self.journal = journal
        self.journal_reuse = journal_reuse


class ClusterHalvingRandomSearchCV(_ClusterSearchMixin, HalvingRandomSearchCV):
    __doc__ = f"""Successive halving over random candidates, every fit on a cluster.

    A drop-in replacement for
    :class:`sklearn.model_selection.HalvingRandomSearchCV`.

    Parameters
    ----------
    estimator, param_distributions, n_candidates, factor, resource, \
max_resources, min_resources, aggressive_elimination, cv, scoring, refit, \
error_score, return_train_score, random_state, n_jobs, verbose
        As in :class:`sklearn.model_selection.HalvingRandomSearchCV`.
{_CLUSTER_DOC}
    Attributes
    ----------
    fits_per_node_ : dict of str -> int
        How many fits each node ran, all rounds together.
{_TRAFFIC_DOC}
    See Also
    --------
    sklearn.model_selection.HalvingRandomSearchCV : the original, in-process.
    """

    _parameter_constraints = {
        **HalvingRandomSearchCV._parameter_constraints,
        **_CLUSTER_CONSTRAINT,
    }

    def __init__(
        self,
        estimator: BaseEstimator,
        param_distributions: _Distributions,
        *,
        n_candidates: int | str = "exhaust",
        factor: float = 3,
        resource: str = "n_samples",
        max_resources: int | str = "auto",
        min_resources: int | str = "smallest",
        aggressive_elimination: bool = False,
        cv: _CV = 5,
        scoring: _Scoring = None,
        refit: _Refit = True,
        error_score: float | str = np.nan,
        return_train_score: bool = True,
        random_state: _RandomState = None,
        n_jobs: int | None = None,
        verbose: int = 0,
        cluster: Cluster | str | None = None,
        journal: str | os.PathLike[str] | bool | None = None,
        journal_reuse: str = "seeded",
    ) -> None:
        super().__init__(
            estimator,
            param_distributions,
            n_candidates=n_candidates,
            factor=factor,
            resource=resource,
            max_resources=max_resources,
            min_resources=min_resources,
            aggressive_elimination=aggressive_elimination,
            cv=cv,
            scoring=scoring,
            refit=refit,
            error_score=error_score,
            return_train_score=return_train_score,
            random_state=random_state,
            n_jobs=n_jobs,
            verbose=verbose,
        )
        self.cluster = cluster
        self.journal = journal
        self.journal_reuse = journal_reuse


