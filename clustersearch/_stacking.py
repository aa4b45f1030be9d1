"""Stacking with every fit of the base estimators on the cluster.

scikit-learn's ``StackingClassifier.fit`` runs three kinds of
``joblib.Parallel``: one that fits each base estimator on all the data, one
that maps ``cross_val_predict`` over the base estimators, and, inside each
``cross_val_predict``, one over the splits. The estimators here send the
first and the innermost ones to the nodes and run the middle one in client
threads (it only waits), so every (estimator, split) fit of every base
estimator is in flight at once. scikit-learn's own code does the rest.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from joblib import parallel_config
from sklearn import get_config
from sklearn.ensemble import StackingClassifier, StackingRegressor
from sklearn.model_selection import cross_val_predict

from ._compat import batch_calls, joblib_backends
from ._search import (
    _CLUSTER_CONSTRAINT,
    _CLUSTER_DOC,
    _TRAFFIC_DOC,
    _raise_if_unpicklable,
    _record_session,
)
from .client.backend import ClusterBackend
from .client.cluster import Cluster, resolve_cluster
from .wire.context import in_node_task

if TYPE_CHECKING:
    from numpy.typing import ArrayLike
    from sklearn.base import BaseEstimator
    from typing_extensions import Self

    from .client.session import Session

__all__ = ["ClusterStackingClassifier", "ClusterStackingRegressor", "fit_on_cluster"]

ThreadingBackend = joblib_backends().ThreadingBackend


class _FanOut(ThreadingBackend):  # type: ignore[misc,valid-type]
    """Runs a ``Parallel``'s calls in client threads; the ``Parallel`` each
    call starts (a ``cross_val_predict`` over the splits) runs on the nodes,
    with a backend of its own."""

    def __init__(self, session: Session) -> None:
        super().__init__(nesting_level=0)
        self.session = session

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        # The threads only wait on the nodes: one per node slot, at least 2
        # (1 would run the calls one after another, outside this backend).
        return max(2, self.session.capacity)

    def get_nested_backend(self) -> tuple[Any, None]:
        return ClusterBackend(self.session, first_only=True), None


class _Recall(ThreadingBackend):  # type: ignore[misc,valid-type]
    """Answers a ``Parallel`` of ``cross_val_predict`` calls, one per base
    estimator in order, with out-of-fold predictions computed before (a
    search's own fits): nothing is fitted again."""

    def __init__(self, answers: Sequence[tuple[str, Any]]) -> None:
        super().__init__(nesting_level=0)
        self.answers = list(answers)  # (method, predictions) per estimator
        self.next = 0
        self.lock = threading.Lock()

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        return 2

    def submit(self, func: Any, callback: Callable[..., Any] | None = None) -> Any:
        outputs = [self._answer(call) for call in batch_calls(func) or ()]
        return super().submit(lambda: outputs, callback)

    def _answer(self, call: tuple[Any, tuple[Any, ...], dict[str, Any]]) -> Any:
        func, _, kwargs = call
        if getattr(func, "function", func) is not cross_val_predict:
            raise RuntimeError(
                f"expected scikit-learn's cross_val_predict calls, got {func!r}: this "
                "scikit-learn's stacking differs from the one clustersearch knows"
            )
        with self.lock:
            index, self.next = self.next, self.next + 1
        method, predictions = self.answers[index]
        if kwargs.get("method") != method:
            raise ValueError(
                f"the kept predictions of base estimator {index} come from "
                f"{method}, stacking asks for {kwargs.get('method')!r}: fit the "
                "search without keep_predictions to compute them again"
            )
        return predictions


def fit_on_cluster(
    fit: Callable[[], Any],
    cluster: Cluster,
    *,
    verbose: int = 0,
    answers: Sequence[tuple[str, Any]] | None = None,
) -> Session:
    """Run ``fit()`` (a stacking or voting ``fit``) with its fits on ``cluster``.

    The first ``Parallel`` (the base estimators' fits on all the data) runs
    on the nodes; the next one (``cross_val_predict`` per base estimator)
    runs in client threads with each of its own ``Parallel`` calls on the
    nodes, or, with ``answers`` (``(method, predictions)`` per base
    estimator), is answered from them without a fit; any later one (a final
    estimator's own) runs locally. Returns the session, for its statistics.
    """
    with cluster.session(verbose=verbose) as session:
        given = 0

        def later() -> Any:
            nonlocal given
            given += 1
            if given > 1:
                return None
            return _Recall(answers) if answers is not None else _FanOut(session)

        with parallel_config(backend=ClusterBackend(session, first_only=True, later=later)):
            fit()
    # Raised in the caller's thread, as a local fit would (stacklevel: the
    # user's call of fit() or ensemble()).
    session.reraise_warnings(stacklevel=3)
    return session


_STACKING_DOC = """
    The cross-validated predictions of every base estimator (each
    ``cross_val_predict`` fit) and the final fits of the base estimators run
    on the nodes of the cluster, all in flight at once; the final estimator
    is fitted in the client, on the small matrix of stacked predictions (and
    the data too, with ``passthrough=True``). With the same ``cv`` and random
    seeds the fitted estimator predicts exactly what scikit-learn's would. A
    base estimator that is itself a cluster search, or that sets ``n_jobs``,
    fits inside its node's process: nothing dispatches again from a node.
"""


class _ClusterStackingMixin:
    """What the stacking estimators add to their scikit-learn original."""

    if TYPE_CHECKING:
        cluster: Cluster | str | None
        verbose: int
        estimators: list[tuple[str, BaseEstimator]]
        final_estimator: BaseEstimator | None

        def _validate_params(self) -> None: ...

    def fit(self, X: ArrayLike, y: ArrayLike, **fit_params: Any) -> Self:
        """Fit the estimators, every base estimator's fits on the cluster.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            Training vectors.
        y : array-like of shape (n_samples,)
            Target values.
        **fit_params : dict
            As in scikit-learn (``sample_weight``).

        Returns
        -------
        self : object
        """
        fit = super().fit  # type: ignore[misc]
        if in_node_task():
            # A base estimator of something a node fits: fit here.
            return fit(X, y, **fit_params)
        if not get_config()["skip_parameter_validation"]:
            self._validate_params()
        _raise_if_unpicklable("estimators", self.estimators)
        cluster = resolve_cluster(self.cluster)
        session = fit_on_cluster(lambda: fit(X, y, **fit_params), cluster, verbose=self.verbose)
        _record_session(self, session)
        return self


_DOC = """{summary}

    A drop-in replacement for :class:`sklearn.ensemble.{original}`: same
    parameters, attributes and predictions, plus ``cluster``.
{stacking}
    Parameters
    ----------
    {params}
        As in :class:`sklearn.ensemble.{original}`. ``n_jobs`` is accepted;
        the cluster's parallelism is its nodes' total concurrency.
{cluster}
    Attributes
    ----------
    estimators_, named_estimators_, final_estimator_, stack_method_, \
n_features_in_, feature_names_in_{classes}
        As in :class:`sklearn.ensemble.{original}`.
    fits_per_node_ : dict of str -> int
        How many fits each node ran (the base estimators' final fits and
        their cross-validation fits).
{traffic}
    See Also
    --------
    sklearn.ensemble.{original} : the original, in-process.

    Examples
    --------
{example}    """


class ClusterStackingClassifier(_ClusterStackingMixin, StackingClassifier):
    __doc__ = _DOC.format(
        summary="Stack of classifiers, every base estimator's fits on a cluster.",
        original="StackingClassifier",
        stacking=_STACKING_DOC,
        params="estimators, final_estimator, cv, stack_method, n_jobs, passthrough, verbose",
        cluster=_CLUSTER_DOC,
        classes=", classes_",
        traffic=_TRAFFIC_DOC.replace("this search's fits", "the fits").replace("this search", "the fit"),
        example="""\
    >>> from sklearn.datasets import load_iris
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.tree import DecisionTreeClassifier
    >>> from clustersearch import ClusterStackingClassifier, LocalCluster
    >>> X, y = load_iris(return_X_y=True)
    >>> base = [("lr", LogisticRegression()), ("tree", DecisionTreeClassifier())]
    >>> with LocalCluster(n_workers=2) as cluster:  # doctest: +SKIP
    ...     stack = ClusterStackingClassifier(base, cluster=cluster).fit(X, y)
""",
    )

    _parameter_constraints = {**StackingClassifier._parameter_constraints, **_CLUSTER_CONSTRAINT}

    def __init__(
        self,
        estimators: list[tuple[str, BaseEstimator]],
        final_estimator: BaseEstimator | None = None,
        *,
        cv: Any = None,
        stack_method: str = "auto",
        n_jobs: int | None = None,
        passthrough: bool = False,
        verbose: int = 0,
        cluster: Cluster | str | None = None,
    ) -> None:
        super().__init__(
            estimators,
            final_estimator,
            cv=cv,
            stack_method=stack_method,
            n_jobs=n_jobs,
            passthrough=passthrough,
            verbose=verbose,
        )
        self.cluster = cluster


class ClusterStackingRegressor(_ClusterStackingMixin, StackingRegressor):
    __doc__ = _DOC.format(
        summary="Stack of regressors, every base estimator's fits on a cluster.",
        original="StackingRegressor",
        stacking=_STACKING_DOC,
        params="estimators, final_estimator, cv, n_jobs, passthrough, verbose",
        cluster=_CLUSTER_DOC,
        classes="",
        traffic=_TRAFFIC_DOC.replace("this search's fits", "the fits").replace("this search", "the fit"),
        example="""\
    >>> from sklearn.datasets import load_diabetes
    >>> from sklearn.linear_model import Ridge
    >>> from sklearn.tree import DecisionTreeRegressor
    >>> from clustersearch import ClusterStackingRegressor, LocalCluster
    >>> X, y = load_diabetes(return_X_y=True)
    >>> base = [("ridge", Ridge()), ("tree", DecisionTreeRegressor(max_depth=3))]
    >>> with LocalCluster(n_workers=2) as cluster:  # doctest: +SKIP
    ...     stack = ClusterStackingRegressor(base, cluster=cluster).fit(X, y)
""",
    )

    _parameter_constraints = {**StackingRegressor._parameter_constraints, **_CLUSTER_CONSTRAINT}

    def __init__(
        self,
        estimators: list[tuple[str, BaseEstimator]],
        final_estimator: BaseEstimator | None = None,
        *,
        cv: Any = None,
        n_jobs: int | None = None,
        passthrough: bool = False,
        verbose: int = 0,
        cluster: Cluster | str | None = None,
    ) -> None:
        super().__init__(
            estimators,
            final_estimator,
            cv=cv,
            n_jobs=n_jobs,
            passthrough=passthrough,
            verbose=verbose,
        )
        self.cluster = cluster
