"""One search's use of the cluster: what joblib's backend talks to.

A :class:`Session` holds the work of one search (or one ``Cluster.joblib()``
block): what waits to be sent, what is in flight where, what came back. It
starts no thread until :meth:`Session.start`; the dispatcher thread
(:mod:`.dispatch`) does every broker I/O, the heartbeat thread
(:class:`.recovery.Watcher`) watches the nodes, and :mod:`.membership`
decides which node gets the next batch.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..exceptions import NotPicklableError
from ..wire.protocol import warning_category
from ..wire.serialization import dumps_with_blobs
from ..wire.signing import Signer
from .blobs import BlobServer, BlobTable
from .dispatch import Dispatcher
from .membership import Membership
from .policy import Policy
from .progress import Progress
from .recovery import Watcher
from .schedule import Scheduler, batch_features
from .timeline import build_timeline
from .work import Copy, Part, Work

if TYPE_CHECKING:
    from celery import Celery

    from .cluster import NodeInfo
    from .journal import SearchJournal

__all__ = ["Session", "Stats", "Work", "processes_by_node"]

logger = logging.getLogger(__name__)

# The longest a session holds a search's first batches back while joblib
# hands the rest over (Session.gather): pickling a batch takes milliseconds.
GATHER_S = 0.5


def processes_by_node(pids: Iterable[tuple[str, int]], nodes: Iterable[str]) -> dict[str, list[int]]:
    """``{node: sorted pids}`` of the ``(node, pid)`` pairs, for ``nodes``
    (an estimator's ``fit_processes_``)."""
    return {n: sorted(p for m, p in pids if m == n) for n in nodes}


@dataclass
class Stats:
    """What a session did, for the fitted search and the tests.

    ``events`` lists what happened to the nodes, in order: ``{"t":
    time.monotonic(), "event": ..., "node": ..., ...}`` with events "lost"
    (and ``silent_s``), "joined", "worker-lost", "gave-up", "straggler",
    "broker-down", "broker-up", "results-lost" (``resent``: the batches in
    flight sent again, their rpc:// results lost), "task-refused" (a node
    refused a task in Celery: the task is retried like a lost one), "refused" (a joining node
    that fails the pre-flight checks). ``late_results`` counts results that
    came after their work was done or sent elsewhere: ignored.
    """

    fits_per_node: Counter[str] = field(default_factory=Counter)
    tasks_per_node: Counter[str] = field(default_factory=Counter)
    task_bytes_per_node: Counter[str] = field(default_factory=Counter)
    # (node, pid) of processes that ran fits
    pids: set[tuple[str, int]] = field(default_factory=set)
    events: list[dict[str, Any]] = field(default_factory=list)
    late_results: int = 0
    # (category module, category name, message) -> [count, nodes]: the
    # warnings the counted fits raised on the nodes.
    warnings: dict[tuple[str, str, str], list[Any]] = field(default_factory=dict)
    # One dict per result that counted (see client.timeline), client wall times.
    runs: list[dict[str, Any]] = field(default_factory=list)
    # {"node", "error"}: fits that raised (their traceback, as scikit-learn keeps it).
    fit_errors: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    # Adds to a time.monotonic() reading to give the wall clock.
    mono_to_wall: float = field(default_factory=lambda: time.time() - time.monotonic())
    # Bytes of the pickled results of the batches that succeeded, per node;
    # and the most bytes one call of a batch returned.
    result_bytes_per_node: Counter[str] = field(default_factory=Counter)
    result_bytes_per_call: float = 0.0
    # (monotonic start, seconds, nodes that answered) per heartbeat round.
    heartbeats: list[tuple[float, float, int]] = field(default_factory=list)

    def add_run(self, work: Work, value: dict[str, Any]) -> None:
        """Record where and when a counted result ran (for ``fit_timeline_``),
        and the fits in it that failed (scikit-learn's ``fit_error``)."""
        output = value.get("output")
        for item in output if isinstance(output, list) else ():
            error = item.get("fit_error") if isinstance(item, dict) else None
            if isinstance(error, str):
                self.fit_errors.append({"node": value["node"], "error": error})
        try:
            started, finished = float(value["started"]), float(value["finished"])
        except (KeyError, TypeError, ValueError):
            return
        sent = (work.sent_at or time.monotonic()) + self.mono_to_wall
        self.runs.append({
            "node": value["node"], "pid": value.get("pid"), "task": work.task_id,
            "fits": work.n_calls, "backup": work.backed_up, "tries": list(work.tries or ()),
            "sent": sent, "received": time.time(), "started": started, "finished": finished,
        })  # fmt: skip

    def timeline(self) -> dict[str, Any]:
        """The search's ``fit_timeline_`` (see :func:`.timeline.build_timeline`)."""
        timeline = build_timeline(self.runs, self.events, self.started, self.mono_to_wall)
        timeline["heartbeats"] = [
            {"time": t + self.mono_to_wall - self.started, "round_s": s, "answered": n}
            for t, s, n in self.heartbeats
        ]
        return timeline

    def heartbeat(self, t: float, seconds: float, answered: int) -> None:
        """A heartbeat round began at ``t`` (monotonic), took ``seconds``,
        and ``answered`` nodes answered (called by the heartbeat thread)."""
        self.heartbeats.append((t, seconds, answered))

    def add_warnings(self, node: str, raised: Any) -> None:
        """Count the ``(module, name, message, count)`` a node's result lists."""
        try:
            for module, name, message, count in raised or ():
                entry = self.warnings.setdefault((str(module), str(name), str(message)), [0, set()])
                entry[0] += int(count)
                entry[1].add(node)
        except (TypeError, ValueError):
            logger.warning("node %r sent a malformed list of warnings; ignored", node)


    def count_result(self, node: str, nbytes: int, n_calls: int) -> None:
        self.result_bytes_per_node[node] += nbytes
        self.result_bytes_per_call = max(self.result_bytes_per_call, nbytes / max(n_calls, 1))

    def event(self, event: str, node: str | None = None, **info: Any) -> None:
        self.events.append({"t": time.monotonic(), "event": event, "node": node, **info})


class Session:
    """One search's (or one ``Cluster.joblib()`` block's) use of the cluster.

    Parameters
    ----------
    app : celery.Celery
        The client's app (its broker and result backend).
    nodes : list of NodeInfo
        The live nodes to send work to.
    policy : Policy
    progress : Progress or None
    broker : str
        The broker's URL without password, for messages.
    signer : Signer or None
        Signs work and verifies results (see ``wire.signing``).
    discover : callable, default=None
        ``discover(timeout, expect)`` returns the nodes that answer
        (heartbeat and discovery of joining nodes), done early once those
        named in ``expect`` (the live ones) have; None turns failure
        detection off.
    admit : callable, default=None
        ``admit(node)`` raises if a node that joins mid-search must not get
        work (the pre-flight checks: secret, versions).
    drop : object, default=None
        Sent as None wherever it occurs in a batch: the search itself, which
        scikit-learn passes to every fit for callbacks only.
    """

    def __init__(
        self,
        app: Celery,
        nodes: Iterable[NodeInfo],
        *,
        policy: Policy | None = None,
        progress: Progress | None = None,
        broker: str = "",
        signer: Signer | None = None,
        discover: Callable[[float, Collection[str] | None], list[NodeInfo]] | None = None,
        admit: Callable[[NodeInfo], None] | None = None,
        drop: object = None,
    ) -> None:
        self.app = app
        self.policy = policy or Policy()
        self.signer = signer or Signer(None)
        self.members = Membership(nodes, self.policy, time.monotonic())
        self.progress = progress or Progress(enabled=False)
        self.stats = Stats()
        self.broker = broker
        self.discover = discover
        self.admit = admit
        self.drop = drop
        self.pending: deque[Work] = deque()
        self.finished: deque[Work] = deque()
        self.copies: dict[str, Copy] = {}  # task id -> copy in flight
        self.lock = threading.RLock()
        self.wake = threading.Event()
        self.failure: BaseException | None = None
        # Large arrays go to each node once, on request (see client.blobs).
        self.blobs = BlobTable()
        self.blob_server: BlobServer | None = None
        # Longest expected fits first (client/schedule.py); None: in order.
        self.scheduler = Scheduler() if self.policy.longest_first else None
        # Calls submitted so far; with a scheduler, until this many have
        # come (or until the monotonic deadline) nothing is sent, so that
        # the first batches sent are ranked among all (see gather()).
        self.submitted = 0
        self.gathering: tuple[int, float] | None = None
        self.dispatcher = Dispatcher(self)
        self._watcher: Watcher | None = None
        # Set by a search with journal= before its first batch.
        self.journal: SearchJournal | None = None

    # -- life cycle

    def start(self) -> Session:
        """Start the blob server, the dispatcher and the heartbeat threads."""
        self.blob_server = BlobServer(
            self.app, self.blobs, nodes=lambda: self.members.nodes, signer=self.signer
        )
        self.dispatcher.start()
        if self.discover is not None:
            self._watcher = Watcher(
                self.discover, self.policy, self.dispatcher.post_beat,
                expect=self._live_names, record=self.stats.heartbeat,
            )  # fmt: skip
            self._watcher.start()
        return self

    def _live_names(self) -> list[str]:
        with self.lock:
            return list(self.members.window)

    def close(self) -> None:
        """Stop the threads; revoke whatever is still outstanding."""
        self.cancel_pending()
        if self._watcher is not None:
            # Not joined: it may be waiting for replies, and has nothing
            # left to tell.
            self._watcher.stop()
        self.dispatcher.stop()
        if self.blob_server is not None:
            self.blob_server.close()
        self.progress.close()

    def __enter__(self) -> Session:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- what joblib calls, from any thread

    @property
    def capacity(self) -> int:
        """The live nodes' total concurrency."""
        return self.members.capacity

    def submit(
        self,
        func: Any,
        callback: Callable[[Future], Any] | None = None,
        *,
        only: str | None = None,
    ) -> Future:
        """Queue ``func`` (a joblib batch) for a node; return its future.

        With ``only``, the work runs on node ``only`` or not at all: if that
        node is not live, or is lost before the work is done, the future
        fails with :class:`~clustersearch.exceptions.NodeLostError`.
        """
        n_calls = len(func) if hasattr(func, "__len__") else 1
        with self.lock:
            self.submitted += n_calls
        keyed = None
        if self.journal is not None:
            # Calls the journal holds are answered here (client/journal.py).
            answered, keyed = self.journal.submit(self, func, callback)
            if answered is not None:
                return answered
        try:
            payload, refs = dumps_with_blobs(func, self.blobs, self.drop)
            work = Work(payload, callback, n_calls, refs=refs, batch=func, only=only)
            work.journal = keyed
            if self.scheduler is not None:
                work.costs = batch_features(func)
        except Exception as exc:
            error = NotPicklableError(f"cannot send a batch of work to the nodes: {exc}")
            error.__cause__ = exc
            work = Work(None, callback, n_calls, error=error, batch=func)
        if work.error is None and self.journal is not None and self.journal.waits(self, work):
            return work.future  # a dead client's batch: its stored result is collected
        with self.lock:
            if self.failure is not None:
                work.error = self.failure
            (self.finished if work.error else self.pending).append(work)
        self.wake.set()
        return work.future

    def gather(self, n_calls: int, wait_s: float = GATHER_S) -> None:
        """``n_calls`` calls are about to be submitted at once (a search's
        ``Parallel`` that hands everything over): with a scheduler, send
        nothing until they are all in, or for ``wait_s`` at most, so that
        the first batches sent are the ones to send first, not the first
        ones pickled."""
        if self.scheduler is not None:
            with self.lock:
                self.gathering = (self.submitted + n_calls, time.monotonic() + wait_s)

    def gathered(self) -> bool:
        """Whether the calls announced by :meth:`gather` are in (or the wait
        is over). Called with the lock held."""
        if self.gathering is None:
            return True
        target, deadline = self.gathering
        if self.submitted >= target or time.monotonic() >= deadline:
            self.gathering = None
            return True
        return False

    def cancel_pending(self) -> None:
        """Drop the work not done yet; revoke (and stop) what nodes hold."""
        with self.lock:
            dropped = list(self.pending)
            self.pending.clear()
            task_ids = list(self.copies)
            # Forgotten: what they send now (revoked, a dead worker) is
            # ignored, and nothing of theirs is sent again.
            for copy in self.copies.values():
                dropped.append(copy.work)
                copy.release(self.members)
            self.copies.clear()
        for work in dropped:
            work.future.cancel()
            if isinstance(work.callback, Part):
                work.callback.parent.future.cancel()
        if task_ids:
            # Terminate what runs: nodes do not keep computing a dead search.
            self.dispatcher.revoke(task_ids)

    # -- statistics (read by the estimators)

    @property
    def nodes(self) -> dict[str, NodeInfo]:
        return self.members.nodes

    @property
    def fits_per_node(self) -> Counter[str]:
        return self.stats.fits_per_node

    @property
    def tasks_per_node(self) -> Counter[str]:
        return self.stats.tasks_per_node

    @property
    def task_bytes_per_node(self) -> Counter[str]:
        return self.stats.task_bytes_per_node

    @property
    def pids(self) -> set[tuple[str, int]]:
        return self.stats.pids

    @property
    def events(self) -> list[dict[str, Any]]:
        return self.stats.events

    def reraise_warnings(self, stacklevel: int = 2) -> None:
        """Raise here, once each, the warnings the fits raised on the nodes.

        Category and message are the node's (a category this process cannot
        import becomes UserWarning, its name in the text); the text adds how
        many fits raised it and on which nodes. Call it in the user's thread:
        ``warnings.catch_warnings``, ``pytest.warns`` and ``-W error`` then
        see them as a local search's.
        """
        for (module, name, message), (count, nodes) in self.stats.warnings.items():
            category = warning_category(module, name)
            if category is None:
                category, message = UserWarning, f"{name}: {message}"
            times = "once" if count == 1 else f"{count} times"
            where = ("node " if len(nodes) == 1 else "nodes ") + ", ".join(sorted(nodes))
            warnings.warn(
                f"{message} (raised {times} in fits on {where})", category, stacklevel=stacklevel + 1
            )

    @property
    def late_results(self) -> int:
        return self.stats.late_results

    @property
    def lost_nodes(self) -> list[str]:
        return self.members.lost

    @property
    def data_bytes_per_node(self) -> Counter[str]:
        """Bytes of data (blobs) sent to each node."""
        return self.blob_server.bytes_per_node if self.blob_server else Counter()
