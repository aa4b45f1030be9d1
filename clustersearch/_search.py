"""The estimators: scikit-learn's searches, with every fit on the cluster.

Each class subclasses its scikit-learn original and changes one thing: while
``fit`` runs, the search's own ``joblib.Parallel`` sends its batches of
(candidate, split) fits to the nodes. scikit-learn still splits the data,
builds ``cv_results_`` and refits ``best_estimator_`` in the client.
"""

from __future__ import annotations

import numbers
import os
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
from joblib import parallel_config
from sklearn import get_config
from sklearn.base import clone, is_classifier
from sklearn.exceptions import NotFittedError
from sklearn.experimental import enable_halving_search_cv  # noqa: F401
from sklearn.model_selection import (
    GridSearchCV,
    HalvingGridSearchCV,
    HalvingRandomSearchCV,
    RandomizedSearchCV,
)

from ._compat import batch_calls, batch_with_calls, get_active_backend, search_cv
from .client.backend import ClusterBackend
from .client.cluster import Cluster, resolve_cluster
from .client.journal import open_journal
from .client.session import processes_by_node
from .exceptions import CallbackNotSupportedError, NotPicklableError
from .wire.context import in_node_task
from .wire.predictions import STACK_METHODS, Kept, PredictingCall
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

_CLUSTER_CONSTRAINT = {"cluster": [None, str, Cluster]}
_SEARCH_CONSTRAINTS = {
    **_CLUSTER_CONSTRAINT,
    "keep_predictions": ["boolean"],
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
    fit_timeline_ : dict
        Where and when each task of fits ran: ``"tasks"``, one dict per
        task whose result counted (``node``, ``pid``, ``fits``, ``sent``,
        ``start``, ``end``, ``received`` in seconds since ``fit`` began, on
        the client's clock, nodes' clocks corrected by ``"clock_offsets"``;
        ``backup`` and the earlier ``tries``), and ``"events"``: nodes lost,
        joined, stragglers, retries (``time``, ``event``, ``node``, ...);
        ``"heartbeats"``: each heartbeat round (``time``, ``round_s`` its
        duration, ``answered`` nodes). :meth:`export_chrome_trace` writes it
        for Perfetto.
    fit_warnings_ : list of dict
        The warnings the fits raised on the nodes (``category``, ``message``,
        ``count``, ``nodes``), also raised in the client when fit ends.
    fit_failures_ : list of dict
        The fits that raised (``node``, ``error``: scikit-learn's traceback text).
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

_KEEP_DOC = """\
    keep_predictions : bool, default=False
        Keep each fit's predictions of its test fold (``predict_proba`` for a
        classifier that has it, else ``decision_function``, else ``predict``:
        what stacking uses), returned by the nodes with the scores, in
        ``oof_predictions_``. :meth:`ensemble` then stacks the best candidates
        without fitting them again on each split. Costs client memory: one
        prediction per sample per candidate.
"""

_ENSEMBLE_DOC = """\
    fits_from_journal_ : int
        Fits answered from the journal (or collected from a dead client's
        batches) instead of run; 0 without a journal.
    oof_predictions_ : dict of int -> ndarray
        With ``keep_predictions=True``: for each candidate (its index in
        ``cv_results_``) whose test folds hold every sample once, its
        out-of-fold predictions, rows in the order of X.
    oof_methods_ : dict of int -> str
        The method that made each candidate's ``oof_predictions_``.
    ensemble_fits_per_node_, ensemble_fit_processes_ : dict
        Like ``fits_per_node_`` and ``fit_processes_``, for the fits of the
        last :meth:`ensemble` call.
"""


class _ClusterSearchMixin(_SearchBase):
    """What the four estimators add to their scikit-learn original."""

    if TYPE_CHECKING:
        # Parameters and fitted attributes the mixin reads or sets (the
        # scikit-learn search sets verbose and n_splits_).
        cluster: Cluster | str | None
        keep_predictions: bool
        journal: str | os.PathLike[str] | bool | None
        journal_reuse: str
        verbose: int
        n_splits_: int
        fits_per_node_: dict[str, int]
        fit_processes_: dict[str, list[int]]
        data_bytes_per_node_: dict[str, int]
        message_bytes_per_node_: dict[str, int]
        fit_timeline_: dict[str, Any]
        fit_warnings_: list[dict[str, Any]]
        fit_failures_: list[dict[str, Any]]
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
        # What ensemble() needs: the splits of each evaluate_candidates call
        # (see _run_search) and the data, kept by reference (not pickled).
        self._rounds: list[_Round] = []
        self._fit_data = (X, y)
        if in_node_task():
            # A base estimator of something a node fits (a stacking's):
            # fit here, in the node's process; never dispatch from a node.
            super().fit(X, y, **params)
            _record_session(self, None)
            self.fits_from_journal_ = 0
            return self
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
                if self.keep_predictions:
                    kind = "classifier" if is_classifier(self.estimator) else "regressor"
                    keeper = _Keeper(STACK_METHODS[kind])
                    backend: ClusterBackend = _KeepingBackend(session, keeper)
                else:
                    backend = ClusterBackend(session, first_only=True)
                with parallel_config(backend=backend):
                    super().fit(X, y, **params)
        finally:
            if journal is not None:
                journal.close()
        self.fits_from_journal_ = journal.hits + journal.collected if journal else 0
        if self.keep_predictions:
            self._assemble_predictions(keeper, _n_samples(X))
        # What the fits warned on the nodes, raised here as a local search would.
        session.reraise_warnings(stacklevel=2)
        _record_session(self, session)
        if self.verbose > 0:
            print(_traffic_summary(session))
        return self

    @property
    def _repr_html_(self) -> Callable[[], str]:
        """scikit-learn's diagram, and once fitted, where the fits ran."""
        diagram = super()._repr_html_  # AttributeError unless display="diagram"

        def html() -> str:
            out: str = diagram()
            if hasattr(self, "fits_per_node_"):
                out += _fitted_html(self)
            return out

        return html

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        # What Jupyter asks for first: scikit-learn's, with the same table.
        bundle: dict[str, Any] = super()._repr_mimebundle_(**kwargs)
        if "text/html" in bundle and hasattr(self, "fits_per_node_"):
            bundle["text/html"] += _fitted_html(self)
        return bundle

    def report(self, path: str, *, title: str | None = None) -> Any:
        """Write this fitted search as one self-contained HTML page (opens
        offline): score heatmaps, slices, the ranked table, each fit on a
        per-node timeline, failures, traffic and warnings. Needs Matplotlib
        (``pip install 'clustersearch[report]'``). Returns the path."""
        from .report import write_report

        return write_report(self, path, title=title)

    def export_chrome_trace(self, path: str) -> None:
        """Write ``fit_timeline_`` as a Chrome trace (JSON) to ``path``: open
        it in https://ui.perfetto.dev, one track per node and pool process."""
        from .client.timeline import write_chrome_trace

        write_chrome_trace(self.fit_timeline_, path)

    def __getstate__(self) -> dict[str, Any]:
        # The data ensemble() uses stays out of pickles (ensemble(X=, y=)).
        state = dict(super().__getstate__())
        state.pop("_fit_data", None)
        return state

    def _assemble_predictions(self, keeper: _Keeper, n_samples: int) -> None:
        self.oof_predictions_: dict[int, Any] = {}
        self.oof_methods_: dict[int, str] = {}
        for round_ in self._rounds:
            if not _is_partition(round_.splits, n_samples):
                continue
            for index in range(round_.offset, round_.offset + round_.n_candidates):
                parts = [keeper.kept.get((index, s)) for s in range(len(round_.splits))]
                if any(part is None for part in parts):
                    continue  # a fit failed (error_score): no prediction
                methods = {method for method, _ in parts}  # type: ignore[misc]
                if len(methods) != 1:
                    continue
                first = np.asarray(parts[0][1])  # type: ignore[index]
                oof = np.empty((n_samples, *first.shape[1:]), dtype=first.dtype)
                for (_, test), (_, predictions) in zip(round_.splits, parts):  # type: ignore[misc]
                    oof[test] = predictions
                self.oof_predictions_[index] = oof
                self.oof_methods_[index] = methods.pop()

    def ensemble(
        self,
        k: int = 5,
        method: str = "stack",
        final_estimator: BaseEstimator | None = None,
        *,
        voting: str = "soft",
        X: ArrayLike | None = None,
        y: ArrayLike | None = None,
    ) -> BaseEstimator:
        """An ensemble of the ``k`` best candidates, fitted on the cluster.

        The candidates are ranked by the refit metric (``rank_test_<refit>``,
        or ``rank_test_score`` with one metric; halving searches: among the
        candidates of the last round). Each is ``clone(estimator)`` with its
        ``params``, refitted on all the data on the nodes. ``method="stack"``
        stacks them with scikit-learn's ``StackingClassifier`` (or
        ``StackingRegressor``) on the search's own folds: with
        ``keep_predictions=True`` their out-of-fold predictions come from the
        search's fits (k fits in all); without, the nodes compute them again
        (k x n_splits more fits). The final estimator is fitted in the
        client, on the stacked predictions. ``method="vote"`` builds a
        ``VotingClassifier`` (or ``VotingRegressor``).

        Parameters
        ----------
        k : int, default=5
            How many of the best candidates to combine.
        method : {"stack", "vote"}, default="stack"
        final_estimator : estimator, default=None
            The stacking's final estimator; None: scikit-learn's default
            (``LogisticRegression``, ``RidgeCV`` for regression).
        voting : {"soft", "hard"}, default="soft"
            For ``method="vote"`` with a classifier.
        X, y : array-like, default=None
            The data; None: the data the search was fitted on (not kept by a
            pickled search: pass it again).

        Returns
        -------
        ensemble : StackingClassifier, StackingRegressor, VotingClassifier or VotingRegressor
            A fitted scikit-learn estimator, usable without the cluster.
        """
        from sklearn.ensemble import (
            StackingClassifier,
            StackingRegressor,
            VotingClassifier,
            VotingRegressor,
        )

        from ._stacking import fit_on_cluster

        name = type(self).__name__
        if not hasattr(self, "cv_results_"):
            raise NotFittedError(f"this {name} is not fitted yet: call fit(X, y) before ensemble()")
        if method not in ("stack", "vote"):
            raise ValueError(f"method={method!r} is not one of 'stack', 'vote'")
        if voting not in ("soft", "hard"):
            raise ValueError(f"voting={voting!r} is not one of 'soft', 'hard'")
        if method == "vote" and final_estimator is not None:
            raise ValueError("final_estimator is for method='stack'; voting has none: drop it")
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"k={k!r}: ask for a positive number of candidates")
        chosen = self._best_candidates(int(k))
        if X is None or y is None:
            data = getattr(self, "_fit_data", None)
            if data is None:
                raise ValueError(
                    f"this {name} does not hold the data it was fitted on (it was "
                    "pickled): pass it again, ensemble(..., X=X, y=y)"
                )
            X, y = data
        params = self.cv_results_["params"]
        estimators = [
            (f"candidate{i}", clone(self.estimator).set_params(**params[i])) for i in chosen
        ]
        classifier = is_classifier(self.estimator)
        answers = None
        model: Any
        if method == "vote":
            if classifier and voting == "soft":
                for label, estimator in estimators:
                    if not hasattr(estimator, "predict_proba"):
                        raise ValueError(
                            f"{label} ({estimator!r}) has no predict_proba, which "
                            "voting='soft' averages: use voting='hard' or method='stack'"
                        )
            model = (
                VotingClassifier(estimators, voting=voting)
                if classifier
                else VotingRegressor(estimators)
            )
        else:
            splits = self._round_of(chosen).splits
            if not _is_partition(splits, _n_samples(X)):
                raise ValueError(
                    f"the folds of this {name} do not hold every sample of X exactly "
                    "once in a test set (cross_val_predict needs that): stack a "
                    "search whose cv is a KFold-like splitter, fitted on this X"
                )
            kept = getattr(self, "oof_predictions_", {})
            if all(i in kept for i in chosen):
                answers = [(self.oof_methods_[i], self._encoded(i)) for i in chosen]
            stacking = StackingClassifier if classifier else StackingRegressor
            model = stacking(estimators, final_estimator=final_estimator, cv=list(splits))
        cluster = resolve_cluster(self.cluster)
        session = fit_on_cluster(
            lambda: model.fit(X, y), cluster, verbose=self.verbose, answers=answers
        )
        _record_session(self, session, prefix="ensemble_")
        return model

    def _encoded(self, index: int) -> Any:
        """A candidate's kept predictions, as stacking's own would be (it
        fits on labels encoded 0..n-1: ``predict`` gives those)."""
        predictions = self.oof_predictions_[index]
        if self.oof_methods_[index] == "predict" and is_classifier(self.estimator):
            return np.searchsorted(self.classes_, predictions)
        return predictions

    def _best_candidates(self, k: int) -> list[int]:
        results = self.cv_results_
        if self.multimetric_:
            if not isinstance(self.refit, str):
                raise ValueError(
                    "ensemble() ranks the candidates by the refit metric: with "
                    f"several metrics, set refit to one of {sorted(self.scorer_)}"
                )
            metric = self.refit
        else:
            metric = "score"
        rank = np.asarray(results[f"rank_test_{metric}"])
        score = np.asarray(results[f"mean_test_{metric}"], dtype=float)
        eligible = np.arange(len(rank))
        if "iter" in results:  # halving: the candidates of the last round
            eligible = eligible[np.asarray(results["iter"]) == np.max(results["iter"])]
        eligible = eligible[np.isfinite(score[eligible])]
        if k > len(eligible):
            raise ValueError(
                f"k={k}, but this search has {len(eligible)} candidates with a "
                f"score{' in its last round' if 'iter' in results else ''}: "
                f"ask for k <= {len(eligible)}"
            )
        return sorted(eligible.tolist(), key=lambda i: (rank[i], i))[:k]

    def _round_of(self, candidates: list[int]) -> _Round:
        for round_ in self._rounds:
            if all(round_.offset <= i < round_.offset + round_.n_candidates for i in candidates):
                return round_
        raise ValueError(
            "the candidates come from different rounds of the search: ensemble() "
            "stacks the candidates of one round"
        )

    def _run_search(
        self, evaluate_candidates: Callable[..., Any], *, callback_ctx: Any = None
    ) -> Any:
        backend, _ = get_active_backend()
        expected = [0]

        def counted(
            candidate_params: Iterable[Mapping[str, Any]],
            cv: Any = None,
            *args: Any,
            **kwargs: Any,
        ) -> Any:
            candidate_params = list(candidate_params)
            if isinstance(backend, ClusterBackend):
                n_fits = len(candidate_params) * self.n_splits_
                backend.session.progress.expect(n_fits)
                backend.expect_calls(n_fits, self.pre_dispatch)
                if backend.session.journal is not None:
                    backend.session.journal.expect(n_fits, expected)
            # The splits these fits use, recorded as scikit-learn makes them.
            offset = sum(r.n_candidates for r in self._rounds)
            splitter = _Recording(cv if cv is not None else search_cv(self))
            self._rounds.append(_Round(offset, len(candidate_params), splitter.splits))
            if isinstance(backend, _KeepingBackend):
                backend.keeper.offset = offset
            return evaluate_candidates(candidate_params, splitter, *args, **kwargs)

        return super()._run_search(counted, callback_ctx=callback_ctx)


def _fitted_html(search: Any) -> str:
    """A fitted search's nodes table: fits, data and messages per node."""
    import html

    rows = "".join(
        f"<tr><td>{html.escape(node)}</td><td>{fits}</td>"
        f"<td>{search.data_bytes_per_node_.get(node, 0) / 1e6:.1f}</td>"
        f"<td>{search.message_bytes_per_node_.get(node, 0) / 1e3:.0f}</td></tr>"
        for node, fits in search.fits_per_node_.items()
    )
    best = ""
    if hasattr(search, "best_score_"):
        best = f"best score {search.best_score_:.4f}; "
    return (
        f"<div><small>{best}{sum(search.fits_per_node_.values())} fits on "
        f"{len(search.fits_per_node_)} nodes</small><table><thead><tr><th>node</th><th>fits</th>"
        f"<th>data sent (MB)</th><th>task messages (kB)</th></tr></thead><tbody>{rows}"
        "</tbody></table></div>"
    )


class _Round:
    """One ``evaluate_candidates`` call: its candidates' indices in
    ``cv_results_`` (from ``offset``) and the (train, test) splits."""

    def __init__(self, offset: int, n_candidates: int, splits: list[Any]) -> None:
        self.offset = offset
        self.n_candidates = n_candidates
        self.splits = splits


class _Recording:
    """A splitter that records the splits it yields."""

    def __init__(self, cv: Any) -> None:
        self.cv = cv
        self.splits: list[Any] = []

    def split(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        for train, test in self.cv.split(*args, **kwargs):
            self.splits.append((train, test))
            yield train, test

    def get_n_splits(self, *args: Any, **kwargs: Any) -> int:
        return int(self.cv.get_n_splits(*args, **kwargs))


class _Keeper:
    """Wraps a search's fit calls to predict their test folds; takes the
    predictions off the results (see ``wire.predictions``)."""

    def __init__(self, methods: list[str]) -> None:
        self.methods = methods
        self.offset = 0  # the current round's first candidate index
        self.kept: dict[tuple[int, int], tuple[str, Any]] = {}
        self.lock = threading.Lock()

    def wrap(self, call: tuple[Any, tuple[Any, ...], dict[str, Any]]) -> Any:
        func, args, kwargs = call
        key = (self.offset + kwargs["candidate_progress"][0], kwargs["split_progress"][0])
        return PredictingCall(func, key, self.methods), args, kwargs

    def peel(self, outputs: list[Any]) -> list[Any]:
        peeled = []
        for output in outputs:
            if isinstance(output, Kept):
                if output.predictions is not None and output.method is not None:
                    with self.lock:
                        self.kept[output.key] = (output.method, output.predictions)
                output = output.result
            peeled.append(output)
        return peeled


class _KeepingBackend(ClusterBackend):
    """The cluster backend of a search with ``keep_predictions``."""

    def __init__(self, session: Session, keeper: _Keeper) -> None:
        super().__init__(session, first_only=True)
        self.keeper = keeper

    def submit(self, func: Any, callback: Callable[..., Any] | None = None) -> Any:
        calls = batch_calls(func)
        if calls is not None:
            func = batch_with_calls(func, [self.keeper.wrap(call) for call in calls])
        return super().submit(func, callback)

    def retrieve_result_callback(self, future: Any) -> Any:
        return self.keeper.peel(future.result())


def _n_samples(X: Any) -> int:
    shape = getattr(X, "shape", None)
    return int(shape[0]) if shape is not None else len(X)


def _is_partition(splits: Sequence[Any], n_samples: int) -> bool:
    """Whether the test sets of ``splits`` hold each of the samples once."""
    if not splits:
        return False
    tests = np.concatenate([np.asarray(test) for _, test in splits])
    if tests.dtype == bool:
        return False
    return len(tests) == n_samples and np.array_equal(np.sort(tests), np.arange(n_samples))


def _record_session(estimator: Any, session: Session | None, prefix: str = "") -> None:
    """Set an estimator's ``fits_per_node_``, traffic, timeline, warnings and
    failures attributes (with ``prefix``) from its session; None: it ran in
    a node's process."""
    if session is None:
        for name in ("fits_per_node_", "fit_processes_", "data_bytes_per_node_",
                     "message_bytes_per_node_"):  # fmt: skip
            setattr(estimator, prefix + name, {})
        setattr(estimator, prefix + "fit_timeline_",
                {"tasks": [], "events": [], "clock_offsets": {}, "heartbeats": []})  # fmt: skip
        setattr(estimator, prefix + "fit_warnings_", [])
        setattr(estimator, prefix + "fit_failures_", [])
        return
    fits = dict(sorted(session.fits_per_node.items()))
    setattr(estimator, prefix + "fits_per_node_", fits)
    setattr(estimator, prefix + "fit_processes_", processes_by_node(session.pids, fits))
    nodes = sorted(set(session.tasks_per_node) | set(session.data_bytes_per_node))
    setattr(estimator, prefix + "data_bytes_per_node_",
            {n: session.data_bytes_per_node[n] for n in nodes})  # fmt: skip
    setattr(estimator, prefix + "message_bytes_per_node_",
            {n: session.task_bytes_per_node[n] for n in nodes})  # fmt: skip
    stats = session.stats
    setattr(estimator, prefix + "fit_timeline_", stats.timeline())
    setattr(estimator, prefix + "fit_warnings_", [
        {"category": f"{module}.{name}", "message": message, "count": count,
         "nodes": sorted(where)}
        for (module, name, message), (count, where) in stats.warnings.items()
    ])  # fmt: skip
    setattr(estimator, prefix + "fit_failures_", list(stats.fit_errors))


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
    "cv", "refit", "cluster", "n_jobs", "pre_dispatch", "verbose", "keep_predictions",
    "journal", "journal_reuse",
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
{_CLUSTER_DOC}{_KEEP_DOC}
    Attributes
    ----------
    cv_results_, best_estimator_, best_score_, best_params_, best_index_, \
scorer_, n_splits_, refit_time_, multimetric_, classes_, n_features_in_
        As in :class:`sklearn.model_selection.GridSearchCV`.
    fits_per_node_ : dict of str -> int
        How many fits each node ran.
{_TRAFFIC_DOC}{_ENSEMBLE_DOC}
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

    _parameter_constraints = {**GridSearchCV._parameter_constraints, **_SEARCH_CONSTRAINTS}

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
        keep_predictions: bool = False,
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
        self.keep_predictions = keep_predictions
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
{_CLUSTER_DOC}{_KEEP_DOC}
    Attributes
    ----------
    fits_per_node_ : dict of str -> int
        How many fits each node ran; the others as in scikit-learn.
{_TRAFFIC_DOC}{_ENSEMBLE_DOC}
    See Also
    --------
    sklearn.model_selection.RandomizedSearchCV : the original, in-process.
    ClusterGridSearchCV : exhaustive search on a cluster.
    """

    _parameter_constraints = {
        **RandomizedSearchCV._parameter_constraints,
        **_SEARCH_CONSTRAINTS,
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
        keep_predictions: bool = False,
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
        self.keep_predictions = keep_predictions
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
{_CLUSTER_DOC}{_KEEP_DOC}
    Attributes
    ----------
    fits_per_node_ : dict of str -> int
        How many fits each node ran, all rounds together.
{_TRAFFIC_DOC}{_ENSEMBLE_DOC}
    See Also
    --------
    sklearn.model_selection.HalvingGridSearchCV : the original, in-process.
    """

    _parameter_constraints = {
        **HalvingGridSearchCV._parameter_constraints,
        **_SEARCH_CONSTRAINTS,
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
        keep_predictions: bool = False,
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
        self.keep_predictions = keep_predictions
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
{_CLUSTER_DOC}{_KEEP_DOC}
    Attributes
    ----------
    fits_per_node_ : dict of str -> int
        How many fits each node ran, all rounds together.
{_TRAFFIC_DOC}{_ENSEMBLE_DOC}
    See Also
    --------
    sklearn.model_selection.HalvingRandomSearchCV : the original, in-process.
    """

    _parameter_constraints = {
        **HalvingRandomSearchCV._parameter_constraints,
        **_SEARCH_CONSTRAINTS,
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
        keep_predictions: bool = False,
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
        self.keep_predictions = keep_predictions
        self.journal = journal
        self.journal_reuse = journal_reuse


