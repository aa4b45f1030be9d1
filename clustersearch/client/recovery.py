"""Surviving node failures: what the dispatcher needs besides sending work.

- :func:`backups` and :func:`straggler_threshold` decide which batches in
  flight get a backup copy; :func:`deadline_error` when the search gives up
  waiting for nodes or the broker. Plain functions of the session's state.

- :class:`Watcher` sends the heartbeat: it asks every node for its info
  every ``heartbeat_interval`` seconds, in a thread of its own (a node that
  does not answer costs the dispatcher nothing), and posts who answered. The
  same broadcast finds nodes that join during a search.
- :func:`reclaim` takes a lost node's unstarted work out of its queue, so
  that a node restarted under the same name does not run it again.
- :func:`split_batch` and :func:`failed_outputs`: a batch whose worker died
  is retried call by call, and a fit that killed its worker on every try ends
  as scikit-learn's own ``error_score`` entry (its ``_fit_and_score`` runs in
  the client with an estimator whose ``fit`` raises the reason), instead of
  failing the whole search or being sent forever.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from kombu import Queue
from kombu.exceptions import OperationalError
from sklearn.base import BaseEstimator

from .._compat import WorkerLostError, batch_calls, batch_with_calls, fit_and_score
from ..exceptions import BrokerUnreachableError, ClusterSearchError, NoWorkersError
from .policy import Policy

if TYPE_CHECKING:
    from celery import Celery

    from .cluster import NodeInfo

__all__ = [
    "Watcher",
    "backups",
    "deadline_error",
    "failed_outputs",
    "is_connection_error",
    "is_worker_lost",
    "reclaim",
    "split_batch",
    "straggler_threshold",
]

logger = logging.getLogger(__name__)


class Watcher(threading.Thread):
    """Heartbeat and discovery: ``post(t, nodes, error)`` every ``interval``.

    ``discover(timeout, expect)`` returns the nodes that answered within
    ``timeout`` (a :class:`~clustersearch.NodeInfo` list), ending the round
    early once every node named by ``expect()`` (the live ones) has, except
    every ``DISCOVERY_EVERY``-th round (``expect`` None), which waits for
    nodes that join; an exception (the broker is unreachable) is posted as
    ``error``.
    ``record(t, seconds, answered)``, if given, is told each round's
    duration.
    """

    def __init__(
        self,
        discover: Callable[[float, Collection[str] | None], list[NodeInfo]],
        policy: Policy,
        post: Callable[[float, list[NodeInfo] | None, BaseException | None], None],
        expect: Callable[[], Collection[str]] | None = None,
        record: Callable[[float, float, int], None] | None = None,
    ) -> None:
        super().__init__(name="clustersearch-heartbeat", daemon=True)
        self.discover = discover
        self.interval = policy.heartbeat_interval
        self.reply_timeout = policy.reply_timeout
        self.post = post
        self.expect = expect
        self.record = record
        self.stopped = threading.Event()

    # Every this many rounds, one waits out the reply timeout: a node that
    # joins but answers slower than every live node is found then.
    DISCOVERY_EVERY = 4

    def run(self) -> None:
        delay = self.interval
        rounds = 0
        while not self.stopped.wait(delay):
            start = time.monotonic()
            rounds += 1
            try:
                expect = None
                if self.expect is not None and rounds % self.DISCOVERY_EVERY:
                    expect = self.expect()
                nodes = self.discover(self.reply_timeout, expect)
            except Exception as exc:
                self.post(start, None, exc)
            else:
                if self.record is not None:
                    self.record(start, time.monotonic() - start, len(nodes))
                self.post(start, nodes, None)
            delay = max(0.0, self.interval - (time.monotonic() - start))

    def stop(self) -> None:
        """Stop after the current round (not waited for)."""
        self.stopped.set()


def is_worker_lost(exc: object) -> bool:
    """Whether a Celery failure means the process running the task died."""
    return isinstance(exc, WorkerLostError)


def is_connection_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the broker (not the work) is the problem."""
    if isinstance(exc, (OperationalError, ConnectionError, OSError)):
        return True
    module = type(exc).__module__ or ""
    # py-amqp's and redis-py's connection errors, and Celery's "could not
    # reconnect the result consumer" (a RuntimeError from a connection error).
    if module.startswith(("amqp", "redis")):
        return True
    cause = exc.__cause__
    return cause is not None and cause is not exc and is_connection_error(cause)


def reclaim(app: Celery, queue: str, task_ids: Iterable[str]) -> int:
    """Delete the messages of ``task_ids`` still waiting in ``queue``.

    Only this session's stale messages go: other messages (another client's
    work for the same node) are put back. Returns how many were deleted.
    """
    task_ids = set(task_ids)
    if not task_ids:
        return 0
    deleted = 0
    held: list[Any] = []
    with app.connection_for_write() as conn:
        bound = Queue(queue, no_declare=True).bind(conn.default_channel)
        try:
            while True:
                message = bound.get(no_ack=False)
                if message is None:
                    break
                if (message.headers or {}).get("id") in task_ids:
                    message.ack()
                    deleted += 1
                else:
                    held.append(message)
        finally:
            for message in held:
                message.reject(requeue=True)
    return deleted


# -- stragglers and deadlines -------------------------------------------------


def straggler_threshold(durations: Sequence[float], policy: Policy) -> float | None:
    """After how long a batch in flight counts as late (None: not yet known,
    or backups are off)."""
    if policy.straggler_factor is None or len(durations) < 4:
        return None
    return max(policy.STRAGGLER_MIN_S, policy.straggler_factor * statistics.median(durations))


def backups(
    in_flight: Iterable[tuple[Any, str, float]],
    idle: dict[str, int],
    late: float | Callable[[Any, str], float],
    now: float,
    skip: Callable[[Any], bool],
) -> list[tuple[Any, str, str, float]]:
    """Which late batches get a backup copy, and where.

    ``in_flight`` holds ``(work, node, sent_at)``, oldest first; ``idle``
    maps nodes to their free processes (consumed here); ``late`` is after
    how long a batch is late, or ``late(work, node)`` that of each batch;
    ``skip(work)`` is true for work that already has a backup or waits to
    be sent. Returns ``(work, node, target, waited_s)`` for each backup.
    """
    chosen = []
    for work, node, sent_at in in_flight:
        if now - sent_at < (late(work, node) if callable(late) else late):
            if callable(late):
                continue
            break
        if skip(work):
            continue
        target = next((n for n, free in idle.items() if free > 0 and n != node), None)
        if target is None:
            continue
        idle[target] -= 1
        chosen.append((work, node, target, now - sent_at))
    return chosen


def deadline_error(
    now: float,
    *,
    no_nodes_since: float | None,
    broker_down_since: float | None,
    lost: Sequence[str],
    broker: str,
    timeout: float,
) -> ClusterSearchError | None:
    """The error that ends a search that waited too long for nodes or the broker."""
    if no_nodes_since is not None and now - no_nodes_since > timeout:
        return NoWorkersError(
            f"every node on {broker!r} stopped answering "
            f"({', '.join(dict.fromkeys(lost))}) and none came back "
            f"within no_node_timeout={timeout} s; the search "
            "cannot finish. Check the nodes (their logs, their network)"
        )
    if broker_down_since is not None and now - broker_down_since > timeout:
        return BrokerUnreachableError(
            f"lost the broker {broker!r} for more than "
            f"no_node_timeout={timeout} s; the search cannot finish"
        )
    return None


# -- a batch that keeps killing its worker ------------------------------------


def split_batch(batch: Any) -> list[Any] | None:
    """One joblib batch per call of ``batch``, or None if it cannot be split."""
    items = batch_calls(batch)
    if items is None or len(items) < 2:
        return None
    return [batch_with_calls(batch, [item]) for item in items]


def failed_outputs(batch: Any, error: BaseException) -> list[Any]:
    """The results of ``batch``'s calls, had each fit raised ``error``.

    Each call must be scikit-learn's ``_fit_and_score``: it then runs here, in
    the client, with an estimator whose ``fit`` raises ``error``, so that
    ``error_score`` applies exactly as in scikit-learn (a number: the scores
    are ``error_score`` and the fit's "traceback" is ``error``; "raise": the
    error is raised). Anything else raises ``error``.
    """
    _fit_and_score = fit_and_score()
    items = batch_calls(batch)
    if not items:
        raise error
    outputs = []
    for func, args, kwargs in items:
        if getattr(func, "function", func) is not _fit_and_score:
            raise error
        args = list(args)
        kwargs = dict(kwargs)
        if args:
            args[0] = _Raises(error, args[0])
        else:
            kwargs["estimator"] = _Raises(error, kwargs["estimator"])
        if "callback_ctx" in kwargs:
            kwargs["callback_ctx"] = None
        outputs.append(func(*args, **kwargs))
    return outputs


class _Raises(BaseEstimator):
    """Stands for an estimator whose fit was lost: ``fit`` raises the reason."""

    def __init__(
        self, error: BaseException | None = None, estimator: BaseEstimator | None = None
    ) -> None:
        self.error = error
        self.estimator = estimator

    def set_params(self, **params: Any) -> _Raises:
        return self

    def fit(self, *args: Any, **kwargs: Any) -> NoReturn:
        # Always given (failed_outputs); None only as scikit-learn's default.
        assert self.error is not None
        raise self.error

    def __sklearn_tags__(self) -> Any:
        from sklearn.utils import get_tags

        # The split (pairwise kernels) follows the real estimator's tags.
        return get_tags(self.estimator)
