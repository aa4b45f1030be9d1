"""The dispatcher thread: every broker I/O of a session.

One thread owns every Celery object of a session (producer, result
consumer): Celery's result consumers are not thread-safe, and joblib calls
``submit`` both from the caller's thread and from result callbacks, which
only pickle the batch and queue it. The thread sends what waits to the
node :class:`~.membership.Membership` picks, collects results, verifies
them, and hands failures to :class:`~.failures.Failures`.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import TYPE_CHECKING, Any
from uuid import uuid4

from celery import states
from celery.backends.base import BaseKeyValueStoreBackend
from kombu.exceptions import ContentDisallowed, DecodeError

from .._compat import set_result_from_meta
from ..exceptions import ClusterSearchError, MessageRejected
from ..wire.control import REVOKE_COMMAND, revoke_arguments
from ..wire.protocol import TASK_NAME, RemoteFailure
from ..wire.serialization import COMPRESS_OVER, loads
from .failures import Failures
from .recovery import is_connection_error, is_worker_lost, reclaim
from .work import Copy, Local, Part, Work

if TYPE_CHECKING:
    from ..wire.signing import Signer
    from .session import Session

__all__ = ["Dispatcher", "backend_is_async", "verified_payload"]

logger = logging.getLogger(__name__)

# How long the dispatcher waits for results before it looks for new work
# to send. Work submitted from result callbacks is sent at once; this bounds
# the delay of work submitted from the caller's thread.
_TICK_S = 0.002
# The longest the dispatcher waits for results before it looks again, when
# nothing has come back for a while; and its wait with nothing in flight.
_MAX_WAIT_S = 0.05
_IDLE_S = 0.1
# What reading a result message that is not one raises: kombu's decoding
# errors, and what Celery's result consumer raises on an empty message
# (kombu hands it over undecoded; wire/codec.py refuses any other message
# without a status, a task id and a result).
UNDECODABLE = (DecodeError, ContentDisallowed, TypeError, KeyError)
# While the broker is unreachable, sends are retried this often.
BROKER_RETRY_S = 0.5


def _ranked(work: Work) -> list[dict[str, float]] | None:
    """The costs the scheduler ranks ``work`` by: None for work that keeps
    its place in front (pinned, retried, a backup copy, a retried call)."""
    if work.only is not None or work.tries is not None or work.backed_up:
        return None
    if isinstance(work.callback, Part):
        return None
    return work.costs


def backend_is_async(backend: Any) -> bool:
    """Whether ``backend`` pushes results (rpc://, Redis) rather than being polled."""
    return bool(getattr(backend, "is_async", False))


def verified_payload(signer: Signer, task_id: str, envelope: Any) -> bytes | memoryview:
    """The payload of a node's result ``envelope`` for ``task_id``, its
    signature checked (with a secret); MessageRejected saying why otherwise.
    Every result is checked so before it is used: as it arrives
    (:meth:`Dispatcher.check_result`), when opened, and when a journal
    collects a dead client's stored result."""
    # bytes, or a view into the message (wire/codec.py decodes without copying).
    if not isinstance(envelope, dict) or not isinstance(envelope.get("payload"), bytes | memoryview):
        raise MessageRejected(
            f"not a clustersearch result ({type(envelope).__name__}): is the node "
            "running the same version?"
        )
    signer.verify("result", task_id, envelope["payload"], envelope.get("auth"))
    payload: bytes | memoryview = envelope["payload"]
    return payload


class Dispatcher:
    """Sends a session's work, collects its results (one thread)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.failures = Failures(session, self)
        self._closing = False
        self._next_send_try = 0.0
        self._thread = threading.Thread(
            target=self._run, name="clustersearch-dispatch", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._closing = True
        self.session.wake.set()
        if self._thread.is_alive():
            self._thread.join()

    def post_beat(self, t: float, nodes: Any, error: BaseException | None) -> None:
        """Called by the heartbeat thread."""
        self.failures.beats.append((t, nodes, error))
        self.session.wake.set()

    # -- the loop

    def _run(self) -> None:
        session = self.session
        backend = session.app.backend
        wait = _TICK_S
        # A file:// backend rings when a node stores a result: look at once.
        listen = getattr(backend, "listen", None)
        stop_listening = listen(session.wake.set) if listen is not None else None
        try:
            with session.app.producer_or_acquire() as producer:
                while not self._closing:
                    self._send_ready(producer)
                    if session.copies:
                        self._collect(backend, wait)
                    else:
                        # submit() sets the event: no need to poll.
                        session.wake.wait(_IDLE_S)
                        session.wake.clear()
                    # Back off while nothing comes back (fits take a while),
                    # so that the client does not take CPU from the nodes
                    # that share its machine; answer fast again as soon as
                    # results flow.
                    wait = _TICK_S if session.finished else min(2 * wait, _MAX_WAIT_S)
                    if session.journal is not None:
                        session.journal.poll(session)
                    self._finish_ready()
                    self.failures.check_nodes()
                    self.failures.back_up_stragglers()
                    self.failures.check_deadlines()
                    self._finish_ready()
        except BaseException as exc:  # pragma: no cover - reported below
            logger.exception("clustersearch dispatcher stopped")
            self.fail_everything(ClusterSearchError(f"the dispatcher stopped: {exc!r}"))
        finally:
            if stop_listening is not None:
                stop_listening()
            self.failures.sweep_lost_queues()
            # Celery's backend is per thread, and this thread ends here. An
            # rpc:// consumer left open would share the app's reply queue with
            # the next session's and take half of its results (a hang).
            if backend_is_async(backend):
                try:
                    backend.result_consumer.stop()
                except Exception:
                    logger.debug("closing the result consumer failed", exc_info=True)

    def _send_ready(self, producer: Any) -> None:
        session = self.session
        if self.failures.broker_down_since is not None and time.monotonic() < self._next_send_try:
            return
        while True:
            with session.lock:
                placed = self._place()
                if placed is None:
                    return
                work, node = placed
            # Only work with a payload waits to be sent (see Session.submit).
            assert work.payload is not None
            work.node = node
            # A new id per sending: a result for an earlier sending of the
            # same work (rerouted from a lost node) matches nothing.
            work.task_id = str(uuid4())
            assert session.blob_server is not None
            source = session.blob_server.queue_name
            refs = [list(ref) for ref in work.refs]
            if session.journal is not None:
                # Noted before it leaves: a successor collects its result.
                session.journal.sending(work, node)
            # Taken before it leaves: a node may start it before send_task
            # returns, and the timeline's clock bounds need sent <= started.
            sending_at = time.monotonic()
            try:
                result = session.app.send_task(
                    TASK_NAME,
                    args=(work.payload,),
                    kwargs={
                        "source": source,
                        "blobs": refs,
                        # Signed for this node only (node/task.py).
                        "auth": session.signer.sign("task", work.task_id, work.payload,
                                                    [source, refs, node]),
                    },  # fmt: skip
                    task_id=work.task_id,
                    queue=session.members.nodes[node].queue,
                    serializer="json",
                    producer=producer,
                )
            except Exception as exc:
                if is_connection_error(exc):
                    # The broker, not the work: send it once it is back.
                    with session.lock:
                        session.pending.appendleft(work)
                    self.failures.broker_trouble(exc)
                    self._next_send_try = time.monotonic() + BROKER_RETRY_S
                    return
                work.error = ClusterSearchError(f"could not send work to node {node!r}: {exc!r}")
                session.finished.append(work)
                continue
            with session.lock:
                if session.scheduler is not None:
                    session.scheduler.dispatched(work.costs)
                members = session.members
                free = members.busy[node] < members.nodes[node].concurrency
                members.took(node)
                running = sending_at if free else None
                session.copies[result.id] = Copy(work, node, sending_at, result, running)
                session.stats.task_bytes_per_node[node] += len(work.payload)
            if backend_is_async(session.app.backend):
                result.then(self._on_ready)

    def _place(self) -> tuple[Work, str] | None:
        """The first waiting work a node can take now, taken out of
        ``pending``, and that node (called with the session's lock held).

        Unpinned work goes to the node with the most room; when none has
        room, nothing is placed. Pinned work waits for its own node's room
        without holding up the work behind it, and fails with NodeLostError
        when its node is not live. With a scheduler (``longest_first``),
        the search's fits go longest expected first, each to the node where
        it is expected to end first (see :meth:`_where`).
        """
        session = self.session
        members = session.members
        scheduler = session.scheduler
        waiting = list(session.pending)
        if scheduler is not None and any(_ranked(w) is not None for w in waiting):
            if members.pick() is None and all(w.only is None for w in waiting):
                return None  # no room anywhere: nothing to rank for
            if not session.gathered():
                return None  # the rest of the search's batches are coming
            waiting = scheduler.order(waiting, _ranked, self._running_floors())
        else:
            scheduler = None
        ready: dict[str, float] | None = None
        horizon = 0.0
        for work in waiting:
            if work.only is not None:
                if work.only not in members.window:
                    session.pending.remove(work)
                    self.failures.pinned_lost(work, "it is not among the live nodes")
                    continue
                node = members.pick(only=work.only)
                if node is None:
                    continue
            elif scheduler is not None and _ranked(work) is not None and scheduler.model.ready:
                if ready is None:
                    ready, horizon = self._readiness(waiting)
                node = self._where(work, ready, horizon)
                if node is None:
                    continue  # held back: a shorter one may fit
            else:
                node = members.pick(work.avoid)
                if node is None:
                    return None
            session.pending.remove(work)
            return work, node
        return None

    def _next_runs(self, node: str) -> None:
        """A copy on ``node`` came back: the oldest one queued there runs now."""
        session = self.session
        held = [c for c in session.copies.values() if c.node == node and c.holds_slot]
        waiting = [c for c in held if c.running_since is None]
        info = session.members.nodes.get(node)
        if waiting and info is not None and len(held) - len(waiting) < info.concurrency:
            min(waiting, key=lambda c: c.sent_at).running_since = time.monotonic()

    def _running_floors(self) -> dict[frozenset[str], float]:
        """For each candidate (its parameter values) with a fit running: for
        how long it has run so far, a lower bound on its other fits' time."""
        now = time.monotonic()
        scheduler = self.session.scheduler
        assert scheduler is not None
        floors: dict[frozenset[str], float] = {}
        for copy in self.session.copies.values():
            costs = copy.work.costs
            if copy.running_since is None or not costs or not copy.holds_slot:
                continue
            each = (now - copy.running_since) / len(costs)
            for key in scheduler.estimates(copy.work).keys:
                floors[key] = max(floors.get(key, 0.0), each)
        return floors

    def _readiness(self, waiting: list[Work]) -> tuple[dict[str, float], float]:
        """When each live node next has a process free, and when the search
        is expected to end (see client/schedule.py)."""
        session = self.session
        members = session.members
        scheduler = session.scheduler
        assert scheduler is not None
        now = time.monotonic()
        held: dict[str, list[tuple[float, float | None]]] = {n: [] for n in members.window}
        speeds = scheduler.model.speeds(held)
        in_flight = []
        for copy in sorted(session.copies.values(), key=lambda c: c.sent_at):
            if copy.node not in held or not copy.holds_slot:
                continue
            expected = None
            if copy.work.costs is not None:
                expected = scheduler.guess(copy.work) * speeds[copy.node]
            held[copy.node].append((copy.sent_at, expected))
            in_flight.append((copy.node, copy.sent_at, expected))
        concurrency = {n: members.nodes[n].concurrency for n in members.window}
        ready = {n: scheduler.ready_at(held[n], concurrency[n], now) for n in held}
        left = [scheduler.guess(w) for w in waiting if w.costs is not None]
        return ready, scheduler.horizon(left, in_flight, concurrency, now)

    def _where(self, work: Work, ready: dict[str, float], horizon: float) -> str | None:
        """The node with room, soonest ready, that should take ``work``
        (expected to end there no later than elsewhere, or before the
        search's expected end); None: it waits."""
        session = self.session
        members = session.members
        scheduler = session.scheduler
        assert scheduler is not None and work.costs is not None
        room = [n for n in members.window if members.window[n] - members.busy[n] > 0]
        room.sort(key=lambda n: (ready[n], -(members.window[n] - members.busy[n])))
        if not room:
            return None
        expected = scheduler.guess(work)
        speeds = scheduler.model.speeds(ready)
        for node in room:
            if scheduler.fits_on(work.costs, node, ready, horizon, expected, speeds):
                return node
        return None

    def _collect(self, backend: Any, wait: float) -> None:
        session = self.session
        if backend_is_async(backend):
            try:
                backend.result_consumer.drain_events(timeout=wait)
            except TimeoutError:
                pass
            except UNDECODABLE as exc:
                # Anyone who can publish to the broker can send garbage to our
                # reply queue or result channels: dropped (its work is sent
                # again as a straggler's if it was stolen).
                self._undecodable(None, exc)
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                # rpc:// lost the broker; Celery reconnects on the next drain.
                self.failures.broker_trouble(exc)
                session.wake.wait(BROKER_RETRY_S)
            self.failures.check_reply_connection(backend)
            return
        # Backends without push (file://, databases): poll what is in flight.
        for task_id, copy in list(session.copies.items()):
            try:
                meta = backend.get_task_meta(task_id)
            except UNDECODABLE as exc:
                self._undecodable(task_id, exc)
                continue
            if meta["status"] in states.READY_STATES:
                set_result_from_meta(copy.result, meta)
                self._on_ready(copy.result)
        if session.copies and not session.finished:
            session.wake.wait(wait)
            session.wake.clear()

    def _undecodable(self, task_id: str | None, exc: BaseException) -> None:
        """A result message that is not a result: dropped. With its task id
        (a stored result), the work is sent again, as for a forged one."""
        session = self.session
        why = f"undecodable result ({type(exc).__name__}: {str(exc)[:100]})"
        with session.lock:
            copy = session.copies.pop(task_id, None) if task_id is not None else None
            if copy is None:
                session.stats.event("rejected-result", None, why=why)
                logger.warning("dropped a result message: %s", why, exc_info=exc)
                return
            copy.release(session.members)
            self.failures.rejected_result(copy.work, copy.node, why)
        self.revoke([task_id])  # type: ignore[list-item]

    def _on_ready(self, result: Any) -> None:
        session = self.session
        revoke: list[str] = []
        with session.lock:
            copy = session.copies.pop(result.id, None)
            if copy is None:  # a late or duplicate result: ignored
                session.stats.late_results += 1
                return
            work, node = copy.work, copy.node
            copy.release(session.members)
            self._next_runs(node)
            # Verified before anything else, whatever it claims to be.
            verdict, what = self.check_result(result, node)
            if verdict == "rejected":
                self.failures.rejected_result(work, node, what)
                # The node may never have got the task (a competing consumer
                # took it), or may still run it: its result no longer counts.
                revoke = [result.id]
            elif verdict in ("lost", "failed"):
                # Not a fit's outcome (a fit's exception comes back as a
                # value): the worker process died, or (without a secret) the
                # node failed the task in Celery: retried like a lost fit.
                if verdict == "failed":
                    what = f"the node failed it in Celery ({result.state}: {result.result!r})"
                    logger.warning("node %r: %s", node, what)
                    session.stats.event("task-refused", node, why=what)
                else:
                    what = f"its worker process died ({what})"
                if not self.has_copy(work):
                    self.failures.failed_try(work, node, what)
            else:
                # The first copy to finish wins; the other is revoked.
                revoke = self.drop_copies(work)
                if not revoke and not work.backed_up:
                    self.failures.durations.append(time.monotonic() - copy.sent_at)
        if revoke:
            self.revoke(revoke)
        if verdict != "result":
            return
        # The copy that won: its result is verified against its own task id.
        work.task_id, work.node = result.id, node
        work.sent_at = copy.sent_at
        work.result = result.result
        work.verified = result.result["payload"]
        session.finished.append(work)

    def check_result(self, result: Any, node: str) -> tuple[str, str]:
        """What a result that came back for a copy sent to ``node`` is:
        ``("result", "")`` a signed result (checked again when opened),
        ``("lost", why)`` a signed worker-lost report, ``("failed", "")`` a
        Celery failure (without a secret only), ``("rejected", why)``
        anything else: it is dropped, never used."""
        signer = self.session.signer
        value = result.result
        if result.state == states.SUCCESS:
            try:
                verified_payload(signer, result.id, value)
            except MessageRejected as exc:
                return "rejected", str(exc)
            return "result", ""
        if is_worker_lost(value):
            if not signer.enabled:
                return "lost", str(value)
            args: tuple[Any, ...] = tuple(getattr(value, "args", ()))
            what = args[0] if args and isinstance(args[0], str) else ""
            try:
                auth = args[1] if len(args) == 2 else None
                signer.verify("lost", result.id, what.encode(), auth, node)
            except MessageRejected as exc:
                return "rejected", f"worker-lost report refused: {exc}"
            return "lost", what
        if signer.enabled:
            # A failure stored by Celery (not by our task, which sends
            # failures back as signed results): anyone could have sent it.
            # Its text is the sender's: not repeated.
            return "rejected", f"unsigned {result.state} ({type(value).__name__}) refused"
        return "failed", ""

    def _finish_ready(self) -> None:
        session, stats = self.session, self.session.stats
        while session.finished:
            work = session.finished.popleft()
            if work.future.done():  # pragma: no cover - finished twice: a bug
                logger.error("a batch finished twice; ignored the second time")
                continue
            output: Any = None
            if work.error is None and isinstance(work.result, Local):
                output = work.result.output
                if work.result.gave_up:
                    session.progress.advance(work.n_calls)
            elif work.error is None:
                try:
                    value = self.open_result(work)
                except MessageRejected as exc:
                    work.error = exc
                else:
                    output = value["output"]
                    if value.get("stdout"):
                        sys.stdout.write(value["stdout"])
                    if isinstance(output, RemoteFailure):
                        work.error = output.exception_with_traceback()
                    else:
                        stats.add_warnings(value["node"], value.get("warnings"))
                        stats.add_run(work, value)
                        if session.scheduler is not None:
                            session.scheduler.learn(work.costs, value["node"], output)
                        stats.count_result(value["node"], len(work.result["payload"]), work.n_calls)
                        if session.journal is not None:
                            session.journal.finished(work, output)
                        self._forget_stored(work)
                        stats.fits_per_node[value["node"]] += work.n_calls
                        stats.pids.add((value["node"], value["pid"]))
                        session.progress.advance(work.n_calls)
                    stats.tasks_per_node[value["node"]] += 1
            if work.error is not None:
                work.future.set_exception(work.error)
            else:
                work.future.set_result(output)
            work.batch = None
            if work.callback is not None:
                try:
                    work.callback(work.future)
                except Exception:  # pragma: no cover - joblib's own bug
                    logger.exception("joblib callback failed")

    def _forget_stored(self, work: Work) -> None:
        """Delete a large result from a backend that stores results (file://
        keeps a file per result until the cluster closes; Redis holds it for
        ``result_expires``): a batch of trees is tens of MB. Once here (and
        in the journal, if any) it is not needed again."""
        backend = self.session.app.backend
        if len(work.result["payload"]) <= COMPRESS_OVER or not isinstance(
            backend, BaseKeyValueStoreBackend
        ):
            return
        try:
            backend.forget(work.task_id)
        except Exception as exc:  # the result is in hand: nothing is lost
            logger.debug("could not delete the stored result %s: %r", work.task_id, exc)

    def open_result(self, work: Work) -> dict[str, Any]:
        """Verify (with a secret) and unpickle what a node sent back."""
        envelope = work.result
        # Set with the result, by _on_ready.
        assert work.task_id is not None
        payload = envelope.get("payload") if isinstance(envelope, dict) else None
        # Verified as it arrived (check_result): these very bytes, not again
        # (a forest's result is tens of MB).
        if not isinstance(payload, bytes | memoryview) or payload is not work.verified:
            try:
                payload = verified_payload(self.session.signer, work.task_id, envelope)
            except MessageRejected as exc:
                raise MessageRejected(f"result of node {work.node!r} refused: {exc}") from None
        return loads(payload)

    # -- copies

    def has_copy(self, work: Work) -> bool:
        """Whether another copy of ``work`` is in flight or waits to be sent."""
        session = self.session
        return any(c.work is work for c in session.copies.values()) or any(
            w is work for w in session.pending
        )

    def drop_copies(self, work: Work) -> list[str]:
        """Forget the other copies of ``work``; the task ids of those in flight."""
        session = self.session
        for waiting in [w for w in session.pending if w is work]:
            session.pending.remove(waiting)
        ids = [tid for tid, c in session.copies.items() if c.work is work]
        for task_id in ids:
            session.copies.pop(task_id).release(session.members)
        return ids

    def fail_everything(self, error: BaseException) -> None:
        session = self.session
        with session.lock:
            session.failure = error
            works = list(session.pending) + [c.work for c in session.copies.values()]
            session.pending.clear()
            session.copies.clear()
        for work in {id(w): w for w in works}.values():
            work.error = error
            session.finished.append(work)
        self._finish_ready()

    # -- broker chores

    def revoke(self, task_ids: list[str]) -> None:
        """Stop ``task_ids`` wherever they run (terminating running fits): ``clustersearch_revoke``,
        signed with the session's secret (nodes refuse Celery's own revoke,
        which anyone on the broker can send)."""
        try:
            self.session.app.control.broadcast(
                REVOKE_COMMAND, arguments=revoke_arguments(self.session.signer, task_ids)
            )
        except Exception:  # the search ends anyway; nodes drop stale work
            logger.warning("could not revoke %d tasks", len(task_ids), exc_info=True)

    def reclaim(self, name: str, task_ids: list[str]) -> bool:
        """Take ``task_ids`` out of node ``name``'s queue; False on failure."""
        session = self.session
        try:
            deleted = reclaim(session.app, session.members.nodes[name].queue, task_ids)
        except Exception:
            logger.warning("could not reclaim the queue of node %r", name, exc_info=True)
            return False
        if deleted:
            logger.info("took %d batches out of node %r's queue", deleted, name)
        return True
