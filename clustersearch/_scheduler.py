"""Client-side dispatch: where each batch of fits goes, and what comes back.

One dispatcher thread owns every Celery object of a session (producer,
result consumer): Celery's result consumers are not thread-safe, and joblib
calls ``submit`` both from the caller's thread and from result callbacks.
``submit`` only pickles the batch and queues it.

Each node gets at most ``concurrency + queued_per_node`` batches at a time
and more as its results come back, so a slow node gets less work and a fast
one more; nothing waits in a slow node's queue while a fast node idles.

Failures (see ``_recovery``): a heartbeat thread asks every node for its info
every ``heartbeat_interval``; a node that misses ``missed_heartbeats`` in a row
is lost: its unfinished work goes to the other nodes, its stale copies are
revoked and taken out of its queue, and whatever it sends later is ignored
(results are matched on task ids). So is a node that answers but whose pool
has started nothing for as long while a task waited and a process was free
(a frozen or deadlocked pool). A node that answers for the first time (or
again) joins. A batch whose worker process died is sent again, call by call,
at most ``max_retries`` times. When no batch waits, a batch in flight for
``straggler_factor`` times the usual time is also sent to an idle node; the
first result wins. With no node, or no broker, for ``no_node_timeout``
seconds the search fails instead of waiting forever.
"""

import logging
import statistics
import sys
import threading
import time
from collections import Counter, defaultdict, deque
from concurrent.futures import Future
from uuid import uuid4

from celery import states

from ._blobs import BlobServer, BlobTable
from ._progress import Progress
from ._recovery import (
    Watcher,
    failed_outputs,
    is_connection_error,
    is_worker_lost,
    reclaim,
    split_batch,
)
from ._serialization import dumps_with_blobs, loads
from ._signing import MessageRejected, Signer
from .exceptions import (
    BrokerUnreachableError,
    ClusterSearchError,
    NodeFailureError,
    NoWorkersError,
)
from .worker import STOP_SIGNAL, TASK_NAME, RemoteFailure

__all__ = ["Session"]


def uuid():
    return str(uuid4())

logger = logging.getLogger(__name__)

# How long the dispatcher waits for results before it looks for new work
# to send. Work submitted from result callbacks is sent at once; this bounds
# the delay of work submitted from the caller's thread.
_TICK_S = 0.002
# The longest the dispatcher waits for results before it looks again, when
# nothing has come back for a while; and its wait with nothing in flight.
_MAX_WAIT_S = 0.05
_IDLE_S = 0.1

# A backup copy of a straggler's batch is sent only after this long: for
# short fits a duplicate buys nothing.
_STRAGGLER_MIN_S = 1.0

# While the broker is unreachable, sends are retried this often.
_BROKER_RETRY_S = 0.5

# A node whose pool starts nothing while a task waits and a process is free
# (it still answers heartbeats) loses its work after as long as a silent
# node, but never sooner than this: Celery gives a new pool process 4 s to
# come up before it replaces it, and a node waits for it meanwhile.
STALL_FLOOR_S = 10.0


class _Work:
    __slots__ = (
        "payload", "refs", "callback", "future", "n_calls", "node", "result", "error", "task_id"
    )  # fmt: skip

    def __init__(self, payload, callback, n_calls, error=None, refs=()):
        self.payload = payload
        self.refs = refs
        self.task_id = None
        self.callback = callback
        self.future = Future()
        self.n_calls = n_calls
        self.node = None
        self.result = None
        self.error = error


class Session:
    """One search's (or one ``Cluster.joblib()`` block's) use of the cluster.

    Parameters
    ----------
    app : celery.Celery
        The client's app (its broker and result backend).
    nodes : list of NodeInfo
        The live nodes to send work to.
    queued_per_node : int
        Batches a node may hold beyond its concurrency, so that it never
        waits for the client between two fits.
    progress : Progress or None
    heartbeat_interval, missed_heartbeats : float, int
        Failure detection: see :class:`~clustersearch.Cluster`.
    broker : str
        The broker's URL without password, for messages.
    signer : Signer or None
        Signs work and verifies results (see ``_signing``).
    discover : callable, default=None
        ``discover(timeout)`` returns the nodes that answer (heartbeat and
        discovery of joining nodes); None turns failure detection off.
    max_retries, no_node_timeout, straggler_factor, reconnect_grace
        See :class:`~clustersearch.Cluster`.
    admit : callable, default=None
        ``admit(node)`` raises if a node that joins mid-search must not get
        work (the pre-flight checks: secret, versions).

    Attributes
    ----------
    events : list of dict
        What happened to the nodes, in order: ``{"t": time.monotonic(),
        "event": ..., "node": ..., ...}`` with events "lost" (and
        ``silent_s``, the time since the node last answered), "joined",
        "worker-lost", "gave-up", "straggler", "broker-down", "broker-up",
        "results-lost" (rpc:// results lost with the broker; ``resent``: the
        batches sent again), "refused" (a joining node that fails the pre-flight
        checks).
    late_results : int
        Results that came after their work was done or sent elsewhere
        (from a lost node, a straggler's backup): ignored.
    """

    def __init__(
        self,
        app,
        nodes,
        *,
        queued_per_node=1,
        progress=None,
        heartbeat_interval=5.0,
        missed_heartbeats=3,
        broker="",
        signer=None,
        discover=None,
        max_retries=2,
        no_node_timeout=30.0,
        straggler_factor=3.0,
        reconnect_grace=10.0,
        admit=None,
    ):
        if not nodes:
            raise ValueError("a session needs at least one node")
        self.app = app
        self.signer = signer or Signer(None)
        self.nodes = {node.name: node for node in nodes}
        self._window = {n.name: n.concurrency + queued_per_node for n in nodes}
        self._busy = Counter({n.name: 0 for n in nodes})
        self.capacity = sum(n.concurrency for n in nodes)
        self.progress = progress or Progress(enabled=False)
        self.fits_per_node = Counter()
        self.tasks_per_node = Counter()
        self.task_bytes_per_node = Counter()
        self.pids = set()
        self.lost_nodes = []
        self._heartbeat_interval = heartbeat_interval
        self._missed_heartbeats = missed_heartbeats
        self._missed = Counter()
        self._broker = broker
        self._queued_per_node = queued_per_node
        self._max_retries = max_retries
        self._no_node_timeout = no_node_timeout
        self._straggler_factor = straggler_factor
        self._reconnect_grace = reconnect_grace
        self._admit = admit
        self._refused = set()
        self.events = []
        self.late_results = 0
        # Per task id: the node it went to and when. A batch may have two
        # copies in flight (a straggler's backup); the first result wins.
        self._copies = {}
        self._batches = {}  # work -> its joblib batch (to split it, or fail it)
        self._tries = {}  # work -> [(node, what happened), ...]
        self._avoid = {}  # work -> nodes it should not go back to
        self._backed_up = set()
        self._durations = deque(maxlen=64)
        self._stale = defaultdict(set)  # lost node -> its revoked task ids
        self._beats = deque()
        self._last_seen = dict.fromkeys(self.nodes, time.monotonic())
        self._no_nodes_since = None
        self._broker_down_since = None
        self._next_send_try = 0.0
        self._reply_connection = None
        self._grace_until = 0.0
        self._pending = deque()
        self._finished = deque()
        self._inflight = {}
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._closing = False
        self._failure = None
        # Large arrays go to each node once, on request (see _blobs).
        self.blobs = BlobTable()
        self.blob_server = BlobServer(app, self.blobs)
        self._thread = threading.Thread(
            target=self._run, name="clustersearch-dispatch", daemon=True
        )
        self._thread.start()
        self._watcher = None
        if discover is not None:
            self._watcher = Watcher(discover, heartbeat_interval, self._post_beat)
            self._watcher.start()

    # -- called from any thread -------------------------------------------

    def submit(self, func, callback=None) -> Future:
        """Queue ``func`` (a joblib batch) for a node; return its future."""
        n_calls = len(func) if hasattr(func, "__len__") else 1
        try:
            payload, refs = dumps_with_blobs(func, self.blobs)
            work = _Work(payload, callback, n_calls, refs=refs)
        except Exception as exc:
            from .exceptions import NotPicklableError

            error = NotPicklableError(f"cannot send a batch of work to the nodes: {exc}")
            error.__cause__ = exc
            work = _Work(None, callback, n_calls, error=error)
        self._batches[work] = func
        with self._lock:
            if self._failure is not None:
                work.error = self._failure
            (self._finished if work.error else self._pending).append(work)
        self._wake.set()
        return work.future

    def cancel_pending(self) -> None:
        """Drop the work not done yet; revoke (and stop) what nodes hold."""
        with self._lock:
            dropped = list(self._pending)
            self._pending.clear()
            task_ids = list(self._inflight)
            # Forgotten: what they send now (revoked, a dead worker) is
            # ignored, and nothing of theirs is sent again.
            dropped += [work for work, _ in self._inflight.values()]
            self._inflight.clear()
            for node, _ in self._copies.values():
                if node in self._window:
                    self._busy[node] -= 1
            self._copies.clear()
        for work in dropped:
            work.future.cancel()
            if isinstance(work.callback, _Part):
                work.callback.parent.future.cancel()
        if task_ids:
            # Terminate what runs: nodes do not keep computing a dead search.
            self._revoke(task_ids, terminate=True)

    def close(self) -> None:
        """Stop the dispatcher; revoke whatever is still outstanding."""
        self.cancel_pending()
        self._closing = True
        self._wake.set()
        self._thread.join()
        self.blob_server.close()
        self.progress.close()

    @property
    def data_bytes_per_node(self):
        """Bytes of data (blobs) sent to each node."""
        return self.blob_server.bytes_per_node

    # -- the dispatcher thread --------------------------------------------

    def _run(self):
        backend = self.app.backend
        wait = _TICK_S
        try:
            with self.app.producer_or_acquire() as producer:
                while not self._closing:
                    self._send_ready(producer)
                    if self._inflight:
                        self._collect(backend, wait)
                    else:
                        # submit() sets the event: no need to poll.
                        self._wake.wait(_IDLE_S)
                        self._wake.clear()
                    # Back off while nothing comes back (fits take a while),
                    # so that the client does not take CPU from the nodes
                    # that share its machine; answer fast again as soon as
                    # results flow.
                    wait = _TICK_S if self._finished else min(2 * wait, _MAX_WAIT_S)
                    self._finish_ready()
                    self._check_nodes()
                    self._back_up_stragglers()
                    self._check_deadlines()
                    self._finish_ready()
        except BaseException as exc:  # pragma: no cover - reported below
            logger.exception("clustersearch dispatcher stopped")
            self._fail_everything(
                ClusterSearchError(f"the dispatcher stopped: {exc!r}")
            )
        finally:
            if self._watcher is not None:
                # Not joined: it may be waiting for replies, and has nothing
                # left to tell.
                self._watcher.stop()
            self._sweep_lost_queues()
            # Celery's backend is per thread, and this thread ends here. An
            # rpc:// consumer left open would share the app's reply queue with
            # the next session's and take half of its results (a hang).
            if backend_is_async(backend):
                try:
                    backend.result_consumer.stop()
                except Exception:
                    logger.debug("closing the result consumer failed", exc_info=True)

    def _send_ready(self, producer):
        if self._broker_down_since is not None and time.monotonic() < self._next_send_try:
            return
        while True:
            with self._lock:
                if not self._pending:
                    return
                node = self._pick_node()
                if node is None:
                    return
                work = self._pending.popleft()
            work.node = node
            # A new id per sending: a result for an earlier sending of the
            # same work (rerouted from a lost node) matches nothing.
            work.task_id = uuid()
            source = self.blob_server.queue_name
            refs = [list(ref) for ref in work.refs]
            try:
                result = self.app.send_task(
                    TASK_NAME,
                    args=(work.payload,),
                    kwargs={
                        "source": source,
                        "blobs": refs,
                        "auth": self.signer.sign("task", work.task_id, work.payload,
                                                 [source, refs]),
                    },  # fmt: skip
                    task_id=work.task_id,
                    queue=self.nodes[node].queue,
                    serializer="json",
                    producer=producer,
                )
            except Exception as exc:
                if is_connection_error(exc):
                    # The broker, not the work: send it once it is back.
                    with self._lock:
                        self._pending.appendleft(work)
                    self._broker_trouble(exc)
                    self._next_send_try = time.monotonic() + _BROKER_RETRY_S
                    return
                work.error = ClusterSearchError(
                    f"could not send work to node {node!r}: {exc!r}"
                )
                self._finished.append(work)
                continue
            with self._lock:
                self._busy[node] += 1
                self._inflight[result.id] = (work, result)
                self.task_bytes_per_node[node] += len(work.payload)
            if backend_is_async(self.app.backend):
                result.then(self._on_ready)
            self._sent(work, node, result.id)

    def _sent(self, work, node, task_id):
        with self._lock:
            self._copies[task_id] = (node, time.monotonic())

    def _pick_node(self):
        """The node with the most free room, relative to its concurrency.

        Nodes where the next batch already failed (or where its other copy
        runs) come last.
        """
        avoid = self._avoid.get(self._pending[0], ()) if self._pending else ()
        best, best_room = None, 0.0
        for name, window in self._window.items():
            free = window - self._busy[name]
            if free <= 0:
                continue
            room = free / self.nodes[name].concurrency
            if name in avoid:
                room -= 1e6
            if best is None or room > best_room:
                best, best_room = name, room
        return best

    def _collect(self, backend, wait):
        if backend_is_async(backend):
            try:
                backend.result_consumer.drain_events(timeout=wait)
            except TimeoutError:
                pass
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                # rpc:// lost the broker; Celery reconnects on the next drain.
                self._broker_trouble(exc)
                self._wake.wait(_BROKER_RETRY_S)
            self._check_reply_connection(backend)
            return
        # Backends without push (file://, databases): poll what is in flight.
        for task_id, (_, result) in list(self._inflight.items()):
            meta = backend.get_task_meta(task_id)
            if meta["status"] in states.READY_STATES:
                result._maybe_set_cache(meta)
                self._on_ready(result)
        if self._inflight and not self._finished:
            self._wake.wait(wait)
            self._wake.clear()

    def _on_ready(self, result):
        revoke = []
        with self._lock:
            entry = self._inflight.pop(result.id, None)
            if entry is None:  # a late or duplicate result: ignored
                self.late_results += 1
                return
            work = entry[0]
            node, sent_at = self._copies.pop(result.id, (work.node, None))
            if node in self._window:
                self._busy[node] -= 1
            if result.state != states.SUCCESS and is_worker_lost(result.result):
                if not self._has_copy(work):
                    self._failed_try(work, node, f"its worker process died ({result.result})")
                return
            # The first copy to finish wins; the other is revoked.
            revoke = self._drop_copies(work)
            if sent_at is not None and not revoke and work not in self._backed_up:
                self._durations.append(time.monotonic() - sent_at)
        if revoke:
            self._revoke(revoke, terminate=True)
        # The copy that won: its result is verified against its own task id.
        work.task_id, work.node = result.id, node
        if result.state == states.SUCCESS:
            work.result = result.result
        else:
            work.error = ClusterSearchError(
                f"work sent to node {node!r} failed in Celery "
                f"({result.state}): {result.result!r}"
            )
        self._finished.append(work)

    def _finish_ready(self):
        while self._finished:
            work = self._finished.popleft()
            if work.future.done():  # pragma: no cover - finished twice: a bug
                logger.error("a batch finished twice; ignored the second time")
                continue
            if work.error is None:
                try:
                    value = self._open_result(work)
                except MessageRejected as exc:
                    work.error = exc
            if work.error is None:
                output = value["output"]
                if value.get("stdout"):
                    sys.stdout.write(value["stdout"])
                if isinstance(output, RemoteFailure):
                    work.error = output.exception_with_traceback()
                elif value["node"] is not None:
                    self.fits_per_node[value["node"]] += work.n_calls
                    self.pids.add((value["node"], value["pid"]))
                    self.progress.advance(work.n_calls)
                elif value.get("gave_up"):
                    self.progress.advance(work.n_calls)
                if value["node"] is not None:
                    self.tasks_per_node[value["node"]] += 1
            with self._lock:
                for table in (self._batches, self._tries, self._avoid):
                    table.pop(work, None)
                self._backed_up.discard(work)
            if work.error is not None:
                work.future.set_exception(work.error)
            else:
                work.future.set_result(output)
            if work.callback is not None:
                try:
                    work.callback(work.future)
                except Exception:  # pragma: no cover - joblib's own bug
                    logger.exception("joblib callback failed")

    def _open_result(self, work):
        """Verify (with a secret) and unpickle what a node sent back."""
        envelope = work.result
        if isinstance(envelope, dict) and envelope.get("local"):
            # Made here: a lost fit's error_score result, or a batch that was
            # retried call by call, its calls' results put together.
            return envelope
        if not isinstance(envelope, dict) or not isinstance(envelope.get("payload"), bytes):
            raise MessageRejected(
                f"node {work.node!r} sent back something that is not a clustersearch "
                f"result ({type(envelope).__name__}): is it running the same version?"
            )
        try:
            self.signer.verify("result", work.task_id, envelope["payload"], envelope.get("auth"))
        except MessageRejected as exc:
            raise MessageRejected(f"result of node {work.node!r} refused: {exc}") from None
        return loads(envelope["payload"])

    # -- failures -----------------------------------------------------------

    def _event(self, event, node=None, **info):
        self.events.append({"t": time.monotonic(), "event": event, "node": node, **info})

    def _post_beat(self, t, nodes, error):
        """Called by the heartbeat thread."""
        self._beats.append((t, nodes, error))
        self._wake.set()

    def _check_nodes(self):
        """Count missed heartbeats, lose silent nodes, take in new ones."""
        while self._beats:
            t, nodes, error = self._beats.popleft()
            if error is not None:
                self._broker_trouble(error)
                continue
            if self._broker_down_since is not None:
                self._broker_back()
            answered = {node.name: node for node in nodes}
            for name in answered:
                self._last_seen[name] = t
            for name in list(self._window):
                if name in answered:
                    self._missed[name] = 0
                elif t >= self._grace_until:
                    self._missed[name] += 1
                    if self._missed[name] >= self._missed_heartbeats:
                        self._lose_node(
                            name, f"it missed {self._missed[name]} heartbeats in a row"
                        )
            stall_limit = max(STALL_FLOOR_S, self._missed_heartbeats * self._heartbeat_interval)
            for name, info in answered.items():
                if info.stalled_s >= stall_limit:
                    # It answers, but its pool starts nothing: as good as lost.
                    if name in self._window:
                        self._lose_node(
                            name,
                            f"its pool started no task for {info.stalled_s:.1f} s while "
                            "a process was free; restart the node",
                            stalled_s=info.stalled_s,
                        )
                elif name not in self._window:
                    self._add_node(info)

    def _add_node(self, info):
        if self._admit is not None:
            try:
                self._admit(info)
            except Exception as exc:
                if info.name not in self._refused:
                    self._refused.add(info.name)
                    logger.warning("node %r answered but gets no work: %s", info.name, exc)
                    self._event("refused", info.name, why=str(exc))
                return
        self._refused.discard(info.name)
        with self._lock:
            name = info.name
            self.nodes[name] = info
            self._window[name] = info.concurrency + self._queued_per_node
            self._busy[name] = 0
            self._missed[name] = 0
            self.capacity += info.concurrency
            self._no_nodes_since = None
        logger.warning("node %r joined the search", name)
        self._event("joined", name, again=name in self.lost_nodes)

    def _lose_node(self, name, reason, **info):
        """Take ``name`` out of the rotation and send its work elsewhere."""
        now = time.monotonic()
        logger.warning("node %r is lost (%s): rerouting its work", name, reason)
        with self._lock:
            if name not in self._window:
                return
            del self._window[name]
            self.capacity -= self.nodes[name].concurrency
            self.lost_nodes.append(name)
            stale = [tid for tid, (node, _) in self._copies.items() if node == name]
            for task_id in stale:
                # Its result, should it ever come, no longer matches anything.
                del self._copies[task_id]
                work, _ = self._inflight.pop(task_id)
                if not self._has_copy(work):
                    self._failed_try(work, name, f"the node stopped answering: {reason}")
            self._stale[name].update(stale)
            self._busy[name] = 0
            if not self._window and self._no_nodes_since is None:
                self._no_nodes_since = now
        self._event(
            "lost", name, silent_s=now - self._last_seen.get(name, now), rerouted=len(stale),
            **info,
        )
        if stale:
            self._revoke(stale, terminate=True)
            self._reclaim(name, stale)

    def _failed_try(self, work, node, what):
        """A copy of ``work`` died with its process or node: retry or give up."""
        with self._lock:
            tries = self._tries.get(work)
            if tries is None:
                # A call of a batch retried call by call inherits its tries.
                parent = work.callback.parent if isinstance(work.callback, _Part) else None
                tries = self._tries[work] = list(self._tries.get(parent, ()))
            tries.append((node, what))
            if node is not None:
                self._event("worker-lost", node, what=what, tries=len(tries))
            if len(tries) > self._max_retries:
                self._give_up(work, tries)
                return
            parts = split_batch(self._batches.get(work)) if work.n_calls > 1 else None
            if parts is None:
                self._avoid[work] = {n for n, _ in tries}
                self._pending.appendleft(work)
                self._wake.set()
                return
        # Retried call by call, so that one fit that kills its worker does
        # not take the batch's other fits down with it.
        whole = _Whole(self, work, len(parts))
        for index, part in enumerate(parts):
            self.submit(part, _Part(whole, index))

    def _give_up(self, work, tries):
        places = "; ".join(f"on node {n!r}: {what}" for n, what in tries)
        error = NodeFailureError(
            f"a batch of {work.n_calls} fit(s) was lost {len(tries)} times "
            f"({places}); it is not sent again (max_retries={self._max_retries}). "
            "A fit that kills its worker every time usually runs out of memory"
        )
        logger.warning("%s", error)
        self._event("gave-up", tries[-1][0], tries=len(tries))
        try:
            outputs = failed_outputs(self._batches.get(work), error)
        except BaseException as exc:
            work.error = exc
        else:
            work.result = {"output": outputs, "node": None, "gave_up": True, "local": True}
        self._finished.append(work)

    def _has_copy(self, work):
        """Whether another copy of ``work`` is in flight or waits to be sent."""
        return any(w is work for w, _ in self._inflight.values()) or any(
            w is work for w in self._pending
        )

    def _drop_copies(self, work):
        """Forget the other copies of ``work``; the task ids of those in flight."""
        for waiting in [w for w in self._pending if w is work]:
            self._pending.remove(waiting)
        ids = [tid for tid, (w, _) in self._inflight.items() if w is work]
        for task_id in ids:
            del self._inflight[task_id]
            node, _ = self._copies.pop(task_id, (None, None))
            if node in self._window:
                self._busy[node] -= 1
        return ids

    def _back_up_stragglers(self):
        """When nothing waits, send a straggler's batch to an idle node too."""
        if self._straggler_factor is None or self._pending or len(self._durations) < 4:
            return
        now = time.monotonic()
        late = max(_STRAGGLER_MIN_S, self._straggler_factor * statistics.median(self._durations))
        with self._lock:
            idle = {
                name: self.nodes[name].concurrency - self._busy[name]
                for name in self._window
                if self._busy[name] < self.nodes[name].concurrency
            }
            if not idle:
                return
            for task_id, (node, sent_at) in sorted(self._copies.items(), key=lambda c: c[1][1]):
                if now - sent_at < late:
                    break
                work = self._inflight[task_id][0]
                if work in self._backed_up or work in self._pending:
                    continue
                target = next((n for n, free in idle.items() if free > 0 and n != node), None)
                if target is None:
                    break
                idle[target] -= 1
                self._backed_up.add(work)
                self._avoid[work] = {node}
                self._pending.append(work)
                self._event(
                    "straggler", node, waited_s=now - sent_at, late_s=late, backup=target
                )

    def _check_deadlines(self):
        if self._failure is not None:
            return
        now = time.monotonic()
        timeout = self._no_node_timeout
        if self._no_nodes_since is not None and now - self._no_nodes_since > timeout:
            self._fail_everything(
                NoWorkersError(
                    f"every node on {self._broker!r} stopped answering "
                    f"({', '.join(dict.fromkeys(self.lost_nodes))}) and none came back "
                    f"within no_node_timeout={timeout} s; the search "
                    "cannot finish. Check the nodes (their logs, their network)"
                )
            )
        elif self._broker_down_since is not None and now - self._broker_down_since > timeout:
            self._fail_everything(
                BrokerUnreachableError(
                    f"lost the broker {self._broker!r} for more than "
                    f"no_node_timeout={timeout} s; the search cannot finish"
                )
            )

    def _broker_trouble(self, exc):
        if self._broker_down_since is None:
            logger.warning("lost the broker %r: %r", self._broker, exc)
            self._broker_down_since = time.monotonic()
            self._event("broker-down", error=repr(exc))

    def _broker_back(self):
        now = time.monotonic()
        down = now - self._broker_down_since
        self._broker_down_since = None
        logger.warning("the broker %r is back after %.1f s", self._broker, down)
        self._event("broker-up", down_s=down)
        # Nodes reconnect on their own schedule: give them time before
        # counting their silence.
        self._grace_until = now + self._reconnect_grace
        self._missed.clear()
        if type(self.app.backend).__name__ == "RPCBackend":
            # rpc:// results published while the broker was away are lost.
            self._event("results-lost", resent=self._resend_inflight())

    def _check_reply_connection(self, backend):
        """rpc://: a new reply connection means results may have been lost.

        Celery's rpc:// consumer reconnects by itself, and what nodes sent
        while its reply queue was gone (a broker restart) is lost: send what
        is in flight again, whether or not the outage was noticed otherwise.
        """
        connection = getattr(backend.result_consumer, "_connection", None)
        if connection is None or connection is self._reply_connection:
            return
        if self._reply_connection is not None:
            logger.warning("the rpc:// result consumer reconnected: resending the work in flight")
            self._event("results-lost", resent=self._resend_inflight())
        self._reply_connection = connection

    def _resend_inflight(self):
        """Send every batch in flight once more (the first result still wins).

        Returns how many batches go out again. A batch already sent again
        goes again: its second copy's result may be lost too (a broker
        restart seen twice, first as a new reply connection).
        """
        resent = 0
        with self._lock:
            for work, _ in list(self._inflight.values()):
                if work not in self._pending:
                    self._backed_up.add(work)
                    self._pending.append(work)
                    resent += 1
        return resent

    def _reclaim(self, name, task_ids):
        try:
            deleted = reclaim(self.app, self.nodes[name].queue, task_ids)
        except Exception:
            logger.warning("could not reclaim the queue of node %r", name, exc_info=True)
        else:
            self._stale[name].difference_update(task_ids)
            if deleted:
                logger.info("took %d batches out of node %r's queue", deleted, name)

    def _sweep_lost_queues(self):
        """Take this session's stale work out of the queues of lost nodes."""
        for name, task_ids in list(self._stale.items()):
            if task_ids and name not in self._window:
                self._reclaim(name, list(task_ids))

    def _revoke(self, task_ids, terminate=False):
        try:
            self.app.control.revoke(task_ids, terminate=terminate, signal=STOP_SIGNAL)
        except Exception:  # the search ends anyway; nodes drop stale work
            logger.warning("could not revoke %d tasks", len(task_ids), exc_info=True)

    def _fail_everything(self, error):
        with self._lock:
            self._failure = error
            works = list(self._pending) + [w for w, _ in self._inflight.values()]
            self._pending.clear()
            self._inflight.clear()
            self._copies.clear()
        for work in {id(w): w for w in works}.values():
            work.error = error
            self._finished.append(work)
        self._finish_ready()


class _Whole:
    """A batch retried call by call: its result once every call is back."""

    def __init__(self, session, work, n_parts):
        self.session = session
        self.work = work
        self.outputs = [None] * n_parts
        self.left = n_parts
        self.error = None

    def part_done(self, index, future):
        if future.cancelled():
            return
        if future.exception() is not None:
            self.error = self.error or future.exception()
        else:
            self.outputs[index] = future.result()[0]
        self.left -= 1
        if self.left == 0:
            work = self.work
            if self.error is not None:
                work.error = self.error
            else:
                work.result = {"output": self.outputs, "node": None, "local": True}
            self.session._finished.append(work)


class _Part:
    """The callback of one call of a batch that is retried call by call."""

    def __init__(self, whole, index):
        self.whole = whole
        self.index = index

    @property
    def parent(self):
        return self.whole.work

    def __call__(self, future):
        self.whole.part_done(self.index, future)


def backend_is_async(backend) -> bool:
    """Whether ``backend`` pushes results (rpc://, Redis) rather than being polled."""
    return bool(getattr(backend, "is_async", False))
