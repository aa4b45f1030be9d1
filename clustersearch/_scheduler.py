"""Client-side dispatch: where each batch of fits goes, and what comes back.

One dispatcher thread owns every Celery object of a session (producer,
result consumer): Celery's result consumers are not thread-safe, and joblib
calls ``submit`` both from the caller's thread and from result callbacks.
``submit`` only pickles the batch and queues it.

Each node gets at most ``concurrency + queued_per_node`` batches at a time
and more as its results come back, so a slow node gets less work and a fast
one more; nothing waits in a slow node's queue while a fast node idles.
"""

import logging
import sys
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from uuid import uuid4

from celery import states

from ._blobs import BlobServer, BlobTable
from ._progress import Progress
from ._serialization import dumps_with_blobs, loads
from ._signing import MessageRejected, Signer
from .exceptions import ClusterSearchError
from .worker import TASK_NAME, RemoteFailure

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
        self._next_heartbeat = time.monotonic() + heartbeat_interval
        self._broker = broker
        self._pending = deque()
        self._finished = deque()
        self._inflight = {}
        self._lock = threading.Lock()
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
        with self._lock:
            if self._failure is not None:
                work.error = self._failure
            (self._finished if work.error else self._pending).append(work)
        self._wake.set()
        return work.future

    def cancel_pending(self) -> None:
        """Drop work not yet sent and revoke what nodes have not started."""
        with self._lock:
            dropped = list(self._pending)
            self._pending.clear()
            task_ids = list(self._inflight)
        for work in dropped:
            work.future.cancel()
        if task_ids:
            self._revoke(task_ids)

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
        except BaseException as exc:  # pragma: no cover - reported below
            logger.exception("clustersearch dispatcher stopped")
            self._fail_everything(
                ClusterSearchError(f"the dispatcher stopped: {exc!r}")
            )
        finally:
            # Celery's backend is per thread, and this thread ends here. An
            # rpc:// consumer left open would share the app's reply queue with
            # the next session's and take half of its results (a hang).
            if backend_is_async(backend):
                try:
                    backend.result_consumer.stop()
                except Exception:
                    logger.debug("closing the result consumer failed", exc_info=True)

    def _send_ready(self, producer):
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

    def _pick_node(self):
        """The node with the most free room, relative to its concurrency."""
        best, best_room = None, 0.0
        for name, window in self._window.items():
            free = window - self._busy[name]
            if free <= 0:
                continue
            room = free / self.nodes[name].concurrency
            if room > best_room:
                best, best_room = name, room
        return best

    def _collect(self, backend, wait):
        if backend_is_async(backend):
            try:
                backend.result_consumer.drain_events(timeout=wait)
            except TimeoutError:
                pass
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
        with self._lock:
            entry = self._inflight.pop(result.id, None)
            if entry is None:  # a late or duplicate result: ignored
                return
            work = entry[0]
            self._busy[work.node] -= 1
        if result.state == states.SUCCESS:
            work.result = result.result
        else:
            work.error = ClusterSearchError(
                f"work sent to node {work.node!r} failed in Celery "
                f"({result.state}): {result.result!r}"
            )
        self._finished.append(work)

    def _finish_ready(self):
        while self._finished:
            work = self._finished.popleft()
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
                else:
                    self.fits_per_node[value["node"]] += work.n_calls
                    self.pids.add((value["node"], value["pid"]))
                    self.progress.advance(work.n_calls)
                self.tasks_per_node[value["node"]] += 1
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

    def _check_nodes(self):
        """Ping the nodes that hold work; reroute the work of a node gone silent."""
        now = time.monotonic()
        if now < self._next_heartbeat:
            return
        self._next_heartbeat = now + self._heartbeat_interval
        with self._lock:
            holding = {work.node for work, _ in self._inflight.values()}
        if not holding:
            return
        hostnames = {self.nodes[name].hostname: name for name in holding}
        try:
            replies = self.app.control.ping(
                destination=list(hostnames), timeout=1.0, limit=len(hostnames)
            )
        except Exception:  # the broker itself is unreachable: retry next beat
            logger.warning("heartbeat ping failed", exc_info=True)
            return
        answered = {hostnames[h] for reply in replies or () for h in reply if h in hostnames}
        for name in holding:
            if name in answered:
                self._missed[name] = 0
                continue
            self._missed[name] += 1
            if self._missed[name] >= self._missed_heartbeats:
                self._lose_node(name)

    def _lose_node(self, name):
        """Take ``name`` out of the rotation and send its work elsewhere."""
        logger.warning("node %r stopped answering: rerouting its work", name)
        with self._lock:
            self._window.pop(name, None)
            self.capacity -= self.nodes[name].concurrency
            self.lost_nodes.append(name)
            stranded = [
                (task_id, work)
                for task_id, (work, _) in self._inflight.items()
                if work.node == name
            ]
            for task_id, work in stranded:
                # Its result, should it ever come, no longer matches anything.
                del self._inflight[task_id]
                work.node = None
                self._pending.appendleft(work)
            self._busy[name] = 0
            alive = bool(self._window)
        if stranded:
            self._revoke([task_id for task_id, _ in stranded])
        if not alive:
            from .exceptions import NoWorkersError

            self._fail_everything(
                NoWorkersError(
                    f"every node on {self._broker!r} stopped answering "
                    f"({', '.join(self.lost_nodes)}); the search cannot finish"
                )
            )

    def _revoke(self, task_ids):
        try:
            self.app.control.revoke(task_ids)
        except Exception:  # the search ends anyway; nodes drop stale work
            logger.warning("could not revoke %d tasks", len(task_ids), exc_info=True)

    def _fail_everything(self, error):
        with self._lock:
            self._failure = error
            works = list(self._pending) + [w for w, _ in self._inflight.values()]
            self._pending.clear()
            self._inflight.clear()
        for work in works:
            work.error = error
            self._finished.append(work)
        self._finish_ready()


def backend_is_async(backend) -> bool:
    """Whether ``backend`` pushes results (rpc://, Redis) rather than being polled."""
    return bool(getattr(backend, "is_async", False))

