"""Forests that stay on the nodes (``keep="nodes"``).

:class:`ResidentForest` is the client's handle on a scikit-learn forest
whose trees live in the stores of the nodes that built them
(``node/store.py``), never in the client. The forest is cut into parts
(batches of consecutive trees); each part is built on ``replicas`` nodes
from the same seeds (those scikit-learn's own ``fit`` would give the trees,
:func:`~clustersearch._compat.forest_seeds`), so every copy is the same
trees, checked by fingerprint. Predictions fan out: X goes to each node once
(a blob reference), each node returns the summed outputs of each part asked
of it, and the client adds exactly one copy of each part and divides, as
scikit-learn's ``predict_proba`` / ``predict`` do. A node lost mid-predict
(work pinned to it fails with NodeLostError after the failure-detection
time) has its parts answered by their next copies; a part with no copy left
is a PartLostError, never a smaller forest.
"""

from __future__ import annotations

import copy
import logging
import uuid
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import Future, wait
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.base import clone, is_classifier

from ._compat import forest_seeds, validate_forest_X
from .exceptions import (
    ClusterSearchError,
    ConfigurationError,
    NodeFailureError,
    NodeLostError,
    PartLostError,
    TreesOnNodesError,
)
from .wire.protocol import StoreCall

if TYPE_CHECKING:
    from .client.cluster import Cluster
    from .client.session import Session

__all__ = ["KeepOnNodesMixin", "ResidentForest"]

logger = logging.getLogger(__name__)

# Errors after which a part is asked of its next copy: the node, not the
# request, failed (lost, its worker died every time, or it no longer holds
# the part).
_NEXT_COPY = (NodeLostError, NodeFailureError, PartLostError)


def _sklearn_class(cls: type) -> type:
    """The scikit-learn forest class ``cls`` is or derives from."""
    for klass in cls.__mro__:
        if klass.__module__.startswith("sklearn."):
            return klass
    raise TypeError(f"{cls.__name__} is not a scikit-learn forest")  # pragma: no cover


class ResidentForest:
    """A fitted scikit-learn forest whose trees stay on the nodes.

    Build one with :meth:`fit`. It holds the forest's parameters, its fitted
    attributes other than the trees (``classes_``, ``n_outputs_``,
    ``n_features_in_``...), the seeds' layout and which nodes hold which
    part: it pickles in a few kB, and predicts from any client process
    holding the cluster's secret.

    Attributes
    ----------
    forest_id : str
        The forest's name in the nodes' stores.
    parts : list of (int, int)
        The trees ``[start, stop)`` of each part.
    holders : list of list of str
        The nodes that hold each part, first asked first.
    nbytes : dict
        Bytes each node's store took for this forest.
    last_run : dict
        What the last request did: ``answered`` (part -> node that answered),
        ``failed`` (part -> list of (node, why)), ``pids`` ((node, pid) of the
        processes that ran it), ``events`` (the session's node events).
    """

    def __init__(
        self,
        cluster: Cluster,
        estimator: Any,
        forest_id: str,
        parts: list[tuple[int, int]],
        holders: list[list[str]],
        state: dict[str, Any],
        nbytes: dict[str, int],
    ) -> None:
        self.cluster = cluster
        self.estimator = estimator
        self.forest_id = forest_id
        self.parts = parts
        self.holders = holders
        self.state = state
        self.nbytes = nbytes
        self.deleted = False
        self.last_run: dict[str, Any] = {}

    # -- building

    @classmethod
    def fit(
        cls,
        estimator: Any,
        X: Any,
        y: Any,
        sample_weight: Any = None,
        *,
        cluster: Cluster | str | None = None,
        replicas: int = 2,
        n_parts: int | None = None,
        **fit_params: Any,
    ) -> ResidentForest:
        """Fit ``estimator`` (an unfitted scikit-learn forest) on the nodes
        and keep its trees there.

        Parameters
        ----------
        estimator : RandomForestClassifier, ExtraTreesRegressor, ...
            Its parameters, ``random_state`` included, decide the trees
            exactly as in scikit-learn.
        X, y, sample_weight
            As for the forest's ``fit``.
        cluster : Cluster, str or None, default=None
            As the searches' ``cluster`` parameter.
        replicas : int, default=2
            Each part is built on ``min(replicas, number of nodes)`` nodes.
        n_parts : int, default=None
            Parts to cut the forest into; None: one per node (at most one
            per tree).

        Returns
        -------
        ResidentForest
        """
        from .client.cluster import resolve_cluster

        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise ConfigurationError(f"replicas must be an int >= 1, got {replicas!r}")
        if getattr(estimator, "oob_score", False):
            raise ConfigurationError(
                "oob_score=True needs every tree in one place: it is not available "
                "with keep='nodes' (use keep='client', or oob_score=False)"
            )
        if getattr(estimator, "warm_start", False):
            raise ConfigurationError("warm_start=True is not available with keep='nodes'")
        n_trees = estimator.n_estimators
        if isinstance(n_trees, bool) or not isinstance(n_trees, int) or n_trees < 1:
            raise ConfigurationError(f"n_estimators must be an int >= 1, got {n_trees!r}")
        cluster = resolve_cluster(cluster)
        estimator = clone(estimator)
        seeds = forest_seeds(estimator.random_state, n_trees)
        forest_id = uuid.uuid4().hex
        with cluster.session() as session:
            nodes = sorted(session.members.window)
            count = len(nodes) if n_parts is None else n_parts
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ConfigurationError(f"n_parts must be an int >= 1, got {n_parts!r}")
            splits = np.array_split(np.arange(n_trees), min(count, n_trees))
            parts = [(int(s[0]), int(s[-1]) + 1) for s in splits]
            copies = min(replicas, len(nodes))
            # Round-robin: part p on nodes p, p+1, ... so that each node is
            # the first copy (the one asked) of as many parts as the others.
            holders = [[nodes[(p + k) % len(nodes)] for k in range(copies)] for p in range(len(parts))]
            handle = cls(cluster, estimator, forest_id, parts, [], {}, {})
            try:
                handle._build(session, seeds, holders, X, y, sample_weight, fit_params)
            except BaseException:
                handle._drop_everywhere(session, nodes)
                raise
        return handle

    def _build(
        self,
        session: Session,
        seeds: list[int],
        holders: list[list[str]],
        X: Any,
        y: Any,
        sample_weight: Any,
        fit_params: dict[str, Any],
    ) -> None:
        futures: dict[Future, tuple[int, str]] = {}
        for part, nodes in enumerate(holders):
            start, stop = self.parts[part]
            args = {
                "estimator": self.estimator,
                "seeds": [seeds[start:stop]],
                "X": X,
                "y": y,
                "sample_weight": sample_weight,
                "fit_params": fit_params,
            }
            for node in nodes:
                call = StoreCall("build", self.forest_id, (part,), args)
                futures[session.submit(call, only=node)] = (part, node)
        wait(futures)
        kept: dict[int, list[str]] = defaultdict(list)
        prints: dict[int, set[str]] = defaultdict(set)
        failed: dict[int, list[tuple[str, str]]] = defaultdict(list)
        nbytes: dict[str, int] = defaultdict(int)
        for future, (part, node) in futures.items():
            exc = future.exception()
            if exc is not None:
                if not isinstance(exc, _NEXT_COPY):
                    raise exc
                failed[part].append((node, str(exc)))
                continue
            built = future.result()[part]
            kept[part].append(node)
            prints[part].add(built["fingerprint"])
            nbytes[node] += built["nbytes"]
            if not self.state:
                params = self.estimator.get_params(deep=False)
                self.state = {
                    k: v for k, v in built["shell"].items() if k not in params and k != "estimators_"
                }
        for part in range(len(self.parts)):
            if not kept[part]:
                raise PartLostError(self._lost_message(part, holders[part], failed[part], "built"))
            if len(prints[part]) != 1:
                raise ClusterSearchError(
                    f"the copies of part {part} built on nodes {kept[part]} differ: the "
                    "nodes run different versions of scikit-learn or numpy, or see "
                    "different data"
                )
            if failed[part]:
                logger.warning("part %d of forest %s kept on %s only (%s)", part,
                               self.forest_id, kept[part], failed[part])  # fmt: skip
        self.holders = [[n for n in holders[p] if n in kept[p]] for p in range(len(self.parts))]
        self.nbytes = dict(nbytes)
        self._record(session, {}, dict(failed))

    # -- the fitted forest without its trees

    @property
    def n_estimators(self) -> int:
        return self.parts[-1][1]

    @property
    def shell(self) -> Any:
        """The fitted forest without its trees (``estimators_`` empty)."""
        shell = copy.copy(self.estimator)
        shell.__dict__.update(self.state)
        shell.estimators_ = []
        return shell

    def _view(self) -> Any:
        """The shell whose ``predict_proba`` (classifier) or ``predict``
        (regressor) asks the nodes: scikit-learn's own ``predict``,
        ``predict_log_proba`` and ``score`` run on top of it."""
        view = self.shell
        if is_classifier(view):
            view.predict_proba = self.predict_proba
        else:
            view.predict = self.predict
        return view

    # -- predicting

    def predict_proba(self, X: Any) -> Any:
        """Class probabilities, as the classifier's ``predict_proba``."""
        if not is_classifier(self.estimator):
            raise AttributeError(f"{type(self.estimator).__name__} has no predict_proba")
        sums = self._sums(X, "predict_proba")
        for proba in sums:
            proba /= self.n_estimators
        return sums[0] if len(sums) == 1 else sums

    def predict(self, X: Any) -> Any:
        """Predictions, as the forest's ``predict``."""
        if is_classifier(self.estimator):
            return self._view().predict(X)
        y_hat = self._sums(X, "predict")[0]
        y_hat /= self.n_estimators
        return y_hat

    def predict_log_proba(self, X: Any) -> Any:
        """As the classifier's ``predict_log_proba``."""
        return self._view().predict_log_proba(X)

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """As the forest's ``score`` (accuracy, or R^2)."""
        return float(self._view().score(X, y, sample_weight=sample_weight))

    def _sums(self, X: Any, method: str) -> list[np.ndarray]:
        X = validate_forest_X(self.shell, X)
        outputs = self._ask("outputs", {"X": X, "method": method})
        total = [np.array(a, dtype=np.float64, copy=True) for a in outputs[0]]
        for part in range(1, len(self.parts)):
            for acc, value in zip(total, outputs[part], strict=True):
                acc += value
        return total

    # -- fetching, deleting

    def to_local(self) -> Any:
        """A plain scikit-learn forest with every tree (fetched from the nodes)."""
        trees = self._ask("fetch", {})
        klass = _sklearn_class(type(self.estimator))
        params = self.estimator.get_params(deep=False)
        forest = klass(**{k: v for k, v in params.items() if k in klass().get_params(deep=False)})
        forest.__dict__.update(self.state)
        forest.estimators_ = [tree for part in range(len(self.parts)) for tree in trees[part]]
        return forest

    def delete(self) -> int:
        """Free the nodes' stores of this forest; the bytes freed.

        Nodes that are not live keep their copies until their store is
        wiped; the handle can no longer predict.
        """
        self._check_usable()
        nodes = sorted({n for nodes in self.holders for n in nodes})
        with self.cluster.session() as session:
            freed = self._drop_everywhere(session, nodes)
        self.deleted = True
        return freed

    def _drop_everywhere(self, session: Session, nodes: Iterable[str]) -> int:
        futures = {
            session.submit(StoreCall("drop", self.forest_id), only=node): node
            for node in nodes
            if node in session.members.window
        }
        wait(futures)
        freed = 0
        for future, node in futures.items():
            if future.exception() is not None:
                logger.warning("node %r could not drop forest %s: %s", node, self.forest_id,
                               future.exception())  # fmt: skip
            else:
                freed += future.result()
        return freed

    # -- one copy of each part

    def _check_usable(self) -> None:
        if self.deleted:
            raise ClusterSearchError(
                f"forest {self.forest_id} was deleted from the nodes: fit it again"
            )

    def _ask(self, op: str, args: dict[str, Any]) -> dict[int, Any]:
        """Run ``op`` on one copy of every part; each part's answer.

        Each node is asked once, for all the parts it is the first live
        holder of; a part whose node is lost (or fails) is asked of its next
        holder, until none is left (PartLostError).
        """
        self._check_usable()
        answers: dict[int, Any] = {}
        answered: dict[int, str] = {}
        failed: dict[int, list[tuple[str, str]]] = defaultdict(list)
        with self.cluster.session() as session:
            left = set(range(len(self.parts)))
            while left:
                by_node: dict[str, list[int]] = defaultdict(list)
                for part in sorted(left):
                    tried = {node for node, _ in failed[part]}
                    node = next((n for n in self.holders[part] if n not in tried), None)
                    if node is None:
                        raise PartLostError(
                            self._lost_message(part, self.holders[part], failed[part], "read")
                        )
                    by_node[node].append(part)
                futures = {
                    session.submit(StoreCall(op, self.forest_id, tuple(parts), args), only=node): (
                        node, parts)
                    for node, parts in by_node.items()
                }  # fmt: skip
                wait(futures)
                for future, (node, parts) in futures.items():
                    exc = future.exception()
                    if exc is None:
                        result = future.result()
                        for part in parts:
                            answers[part] = result[part]
                            answered[part] = node
                            left.discard(part)
                    elif isinstance(exc, _NEXT_COPY):
                        logger.warning("node %r did not answer for parts %s of forest %s (%s): "
                                       "asking their next copies", node, parts, self.forest_id,
                                       exc)  # fmt: skip
                        for part in parts:
                            failed[part].append((node, str(exc)))
                    else:
                        raise exc
            self._record(session, answered, dict(failed))
        return answers

    def _record(self, session: Session, answered: dict[int, str], failed: dict) -> None:
        self.last_run = {
            "answered": answered,
            "failed": failed,
            "pids": set(session.stats.pids),
            "events": list(session.stats.events),
        }

    def _lost_message(
        self, part: int, nodes: list[str], failed: list[tuple[str, str]], what: str
    ) -> str:
        start, stop = self.parts[part]
        reasons = "; ".join(f"node {node!r}: {why}" for node, why in failed) or "none was asked"
        return (
            f"part {part} of forest {self.forest_id} (trees {start} to {stop - 1}) could not "
            f"be {what}: every copy of it is lost (it was on nodes {nodes}; {reasons}). "
            "The forest is not used without it: fit it again"
        )

    def __repr__(self) -> str:
        return (
            f"ResidentForest({type(self.estimator).__name__}, {self.n_estimators} trees in "
            f"{len(self.parts)} parts on {sorted({n for h in self.holders for n in h})})"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["last_run"] = {}
        return state


class KeepOnNodesMixin:
    """``keep="nodes"`` for a scikit-learn forest subclass.

    The class also has the parameters ``cluster``, ``keep`` and
    ``replicas``; its ``fit`` calls :meth:`_fit_on_nodes` when ``keep ==
    "nodes"``. The fitted estimator then holds a :class:`ResidentForest`
    (``resident_``) and the forest's fitted attributes, not its trees:
    ``predict_proba`` (classifiers) and ``predict`` (regressors) ask the
    nodes, and scikit-learn's own ``predict``, ``predict_log_proba`` and
    ``score`` run on top of them. What needs the trees themselves
    (``apply``, ``decision_path``, ``feature_importances_``,
    ``estimators_samples_``) says to call :meth:`to_local` first.
    """

    cluster: Any
    keep: str
    replicas: int
    resident_: ResidentForest | None
    estimators_: list[Any]

    def _fit_on_nodes(self, X: Any, y: Any, sample_weight: Any = None) -> Any:
        """Fit with the trees kept on the nodes; ``self``."""
        klass = _sklearn_class(type(self))
        names = klass().get_params(deep=False)
        plain = klass(**{k: v for k, v in self.get_params(deep=False).items() if k in names})  # type: ignore[attr-defined]
        handle = ResidentForest.fit(
            plain, X, y, sample_weight, cluster=self.cluster, replicas=self.replicas
        )
        self.__dict__.update(handle.state)
        self.estimators_ = []
        self.resident_ = handle
        return self

    def _resident(self) -> ResidentForest | None:
        return self.__dict__.get("resident_")

    def predict_proba(self, X: Any) -> Any:
        """Class probabilities of ``X``, as scikit-learn's forest gives them.

        With ``keep="nodes"`` each node sums its trees' probabilities and the
        client adds the sums up.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            The input samples.

        Returns
        -------
        p : ndarray of shape (n_samples, n_classes), or a list of such arrays
            One per output; classes in the order of ``classes_``.
        """
        handle = self._resident()
        if handle is not None:
            return handle.predict_proba(X)
        return super().predict_proba(X)  # type: ignore[misc]

    def predict(self, X: Any) -> Any:
        handle = self._resident()
        if handle is not None and not is_classifier(self):
            return handle.predict(X)
        return super().predict(X)  # type: ignore[misc]

    def to_local(self) -> Any:
        """A plain scikit-learn forest with every tree (fetched from the
        nodes when they are kept there)."""
        handle = self._resident()
        if handle is None:
            raise ClusterSearchError("to_local() is for a forest fitted with keep='nodes'")
        return handle.to_local()

    def delete(self) -> int:
        """Free the nodes' stores of this forest (fitted with
        ``keep="nodes"``); the bytes freed. It can no longer predict."""
        handle = self._resident()
        if handle is None:
            raise ClusterSearchError("delete() is for a forest fitted with keep='nodes'")
        return handle.delete()

    def _needs_trees(self, what: str) -> Any:
        raise TreesOnNodesError(
            f"{what} needs the trees, which stay on the nodes (keep='nodes'): call "
            "to_local() for a scikit-learn forest holding them"
        )

    def apply(self, X: Any) -> Any:
        if self._resident() is not None:
            self._needs_trees("apply()")
        return super().apply(X)  # type: ignore[misc]

    def decision_path(self, X: Any) -> Any:
        if self._resident() is not None:
            self._needs_trees("decision_path()")
        return super().decision_path(X)  # type: ignore[misc]

    @property
    def feature_importances_(self) -> Any:
        if self._resident() is not None:
            self._needs_trees("feature_importances_")
        return super().feature_importances_  # type: ignore[misc]

    @property
    def estimators_samples_(self) -> Any:
        if self._resident() is not None:
            self._needs_trees("estimators_samples_")
        return super().estimators_samples_  # type: ignore[misc]
