"""What the dispatcher does when nodes, workers or the broker fail.

A heartbeat round lost a node: its unfinished work goes to the other nodes,
its stale copies are revoked and taken out of its queue, and whatever it
sends later is ignored (results are matched on task ids). A node that
answers for the first time (or again) joins, once it passes the pre-flight
checks. A batch whose worker process died is sent again, call by call, at
most ``max_retries`` times, then ends as scikit-learn's ``error_score``
entry. When no batch waits, a batch in flight for ``straggler_factor``
times the usual time is also sent to an idle node; the first result wins.
With no node, or no broker, for ``no_node_timeout`` seconds the search fails
instead of waiting forever. The decisions themselves are plain functions
(:mod:`.recovery`, :mod:`.membership`); this class applies them.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._compat import is_rpc_backend, result_consumer_connection
from ..exceptions import MessageRejected, NodeFailureError, NodeLostError
from .recovery import (
    backups,
    deadline_error,
    failed_outputs,
    split_batch,
    straggler_threshold,
)
from .work import Copy, Local, Part, Whole, Work

if TYPE_CHECKING:
    from .cluster import NodeInfo
    from .dispatch import Dispatcher
    from .session import Session

__all__ = ["Failures"]

logger = logging.getLogger(__name__)


class Failures:
    """Applies the session's failure policy (runs in the dispatcher thread)."""

    def __init__(self, session: Session, dispatcher: Dispatcher) -> None:
        self.session = session
        self.dispatcher = dispatcher
        self.beats: deque[tuple[float, Any, BaseException | None]] = deque()
        self.durations: deque[float] = deque(maxlen=64)
        self.stale: defaultdict[str, set[str]] = defaultdict(set)  # lost node -> task ids
        self.refused: set[str] = set()
        self.broker_down_since: float | None = None
        self._reply_connection: Any = None
        # Node -> start of the last heartbeat round, if it held no task
        # then (see check_held).
        self._empty_since: dict[str, float] = {}

    # -- nodes

    def check_nodes(self) -> None:
        """Apply the heartbeat rounds that came in: lose, take in nodes."""
        members = self.session.members
        while self.beats:
            t, nodes, error = self.beats.popleft()
            if error is not None:
                self.broker_trouble(error)
                continue
            if self.broker_down_since is not None:
                self.broker_back()
            outcome = members.beat(t, nodes)
            for name, reason, info in outcome.lost:
                self.lose_node(name, reason, **info)
            for node in outcome.joining:
                self.add_node(node)
            self.check_held(t, nodes)

    def check_held(self, t: float, nodes: Any) -> None:
        """Send again the copies a node does not hold: lost on the way.

        A copy can vanish without a trace: its task message taken from the
        node's queue by another consumer (anyone with broker access), its
        result lost with the broker. Nothing would ever come back for it,
        and it would hold its node's room: the search would wait forever.
        A node that answers two heartbeat rounds in a row holding no task
        (none running, none waiting) holds none of the copies sent to it
        before the first of the two began: with every process free, it would
        have taken them from its queue. Those are presumed lost: their
        room is given back and their work sent again (a result of theirs
        that still comes is taken; the first result wins).
        """
        session = self.session
        answered = {node.name for node in nodes}
        for name in set(self._empty_since) - answered:
            del self._empty_since[name]  # not in a row
        for node in nodes:
            name = node.name
            if name not in session.members.window or node.running or node.queued:
                self._empty_since.pop(name, None)
                continue
            since = self._empty_since.get(name)
            # The next round counts the copies sent before this one.
            self._empty_since[name] = t
            if since is None or since >= t:
                continue  # the first round that found it empty
            with session.lock:
                lost = [
                    c for c in session.copies.values()
                    if c.node == name and c.holds_slot and c.sent_at < since
                ]  # fmt: skip
                resent = self._send_again(lost, avoid=name)
            if lost:
                logger.warning(
                    "node %r holds none of the %d task(s) sent to it over %.1f s ago: "
                    "presumed lost (taken from its queue by another consumer, or a "
                    "result lost), sent again", name, len(lost), t - since,
                )  # fmt: skip
                session.stats.event("copies-lost", name, copies=len(lost), resent=resent)
                session.wake.set()

    def add_node(self, info: NodeInfo) -> None:
        session = self.session
        if session.admit is not None:
            try:
                session.admit(info)
            except Exception as exc:
                if info.name not in self.refused:
                    self.refused.add(info.name)
                    logger.warning("node %r answered but gets no work: %s", info.name, exc)
                    session.stats.event("refused", info.name, why=str(exc))
                return
        self.refused.discard(info.name)
        with session.lock:
            again = info.name in session.members.lost
            session.members.add(info, time.monotonic())
        logger.warning("node %r joined the search", info.name)
        session.stats.event("joined", info.name, again=again)

    def lose_node(self, name: str, reason: str, **info: Any) -> None:
        """Take ``name`` out of the rotation and send its work elsewhere."""
        session = self.session
        now = time.monotonic()
        logger.warning("node %r is lost (%s): rerouting its work", name, reason)
        with session.lock:
            if not session.members.remove(name, now):
                return
            stale = [tid for tid, c in session.copies.items() if c.node == name]
            for task_id in stale:
                # Its result, should it ever come, no longer matches anything.
                work = session.copies.pop(task_id).work
                if work.only is not None:
                    self.pinned_lost(work, f"the node was lost ({reason})")
                elif not self.dispatcher.has_copy(work):
                    self.failed_try(work, name, f"the node stopped answering: {reason}")
            self.stale[name].update(stale)
        silent = now - session.members.last_seen.get(name, now)
        session.stats.event("lost", name, silent_s=silent, rerouted=len(stale), **info)
        if stale:
            self.dispatcher.revoke(stale)
            if self.dispatcher.reclaim(name, stale):
                self.stale[name].difference_update(stale)

    def pinned_lost(self, work: Work, why: str) -> None:
        """Work pinned to a node that is lost (or not live) fails with
        NodeLostError; it never runs elsewhere. Called with the lock held."""
        work.error = NodeLostError(
            f"work pinned to node {work.only!r} cannot run there: {why}. It needs "
            "what that node holds and is not sent to another node"
        )
        self.session.stats.event("pinned-lost", work.only, why=why)
        self.session.finished.append(work)

    def sweep_lost_queues(self) -> None:
        """Take this session's stale work out of the queues of lost nodes."""
        for name, task_ids in list(self.stale.items()):
            if task_ids and name not in self.session.members.window:
                if self.dispatcher.reclaim(name, list(task_ids)):
                    task_ids.clear()

    # -- retries

    def failed_try(self, work: Work, node: str | None, what: str) -> None:
        """A copy of ``work`` died with its process or node: retry or give up."""
        session = self.session
        with session.lock:
            if work.tries is None:
                # A call of a batch retried call by call inherits its tries.
                parent = work.callback.parent if isinstance(work.callback, Part) else None
                work.tries = list(parent.tries or ()) if parent is not None else []
            work.tries.append((node, what))
            if node is not None:
                session.stats.event("worker-lost", node, what=what, tries=len(work.tries))
            if len(work.tries) > session.policy.max_retries:
                self._give_up(work)
                return
            parts = split_batch(work.batch) if work.n_calls > 1 else None
            if parts is None:
                work.avoid = {n for n, _ in work.tries if n is not None}
                session.pending.appendleft(work)
                session.wake.set()
                return
        # Retried call by call, so that one fit that kills its worker does
        # not take the batch's other fits down with it.
        whole = Whole(session.finished, work, len(parts))
        for index, part in enumerate(parts):
            session.submit(part, Part(whole, index))

    def rejected_result(self, work: Work, node: str, why: str) -> None:
        """A result for a copy of ``work`` in flight failed verification
        (unsigned, wrongly signed, not ours): dropped, never counted. The
        work waits for its other copy, or is sent again, preferably to
        another node; after ``2 * (max_retries + 1)`` such results the batch
        fails with MessageRejected, so that a flood cannot loop forever.
        Called with the session's lock held."""
        session = self.session
        logger.warning("dropped a result for work sent to node %r: %s", node, why)
        session.stats.event("rejected-result", node, why=why)
        if self.dispatcher.has_copy(work):
            return
        work.rejected += 1
        if work.rejected > 2 * (session.policy.max_retries + 1):
            work.error = MessageRejected(
                f"the results of a batch of {work.n_calls} fit(s) were refused "
                f"{work.rejected} times (the last one from node {node!r}: {why}); it is "
                "not sent again. Someone who can publish to the broker may be forging "
                "results, or a node runs another version or secret: see its log"
            )
            session.finished.append(work)
            return
        work.avoid = work.avoid | {node}
        session.pending.appendleft(work)
        session.wake.set()

    def _give_up(self, work: Work) -> None:
        session = self.session
        tries = work.tries or []
        places = "; ".join(f"on node {n!r}: {what}" for n, what in tries)
        error = NodeFailureError(
            f"a batch of {work.n_calls} fit(s) was lost {len(tries)} times "
            f"({places}); it is not sent again (max_retries={session.policy.max_retries}). "
            "A fit that kills its worker every time usually runs out of memory"
        )
        logger.warning("%s", error)
        session.stats.event("gave-up", tries[-1][0] if tries else None, tries=len(tries))
        try:
            outputs = failed_outputs(work.batch, error)
        except BaseException as exc:
            work.error = exc
        else:
            work.result = Local(outputs, gave_up=True)
        session.finished.append(work)

    def back_up_stragglers(self) -> None:
        """When nothing waits, send a straggler's batch to an idle node too."""
        session = self.session
        if session.pending:
            return
        late: float | Callable[[Work, str], float] | None
        late = straggler_threshold(self.durations, session.policy)
        factor = session.policy.straggler_factor
        scheduler = session.scheduler
        if factor is not None and scheduler is not None and scheduler.model.observed >= 4:
            # Fits of a search vary (max_depth=None against max_depth=2):
            # each batch is late after factor x its own expected time (once
            # 4 fits are back, as for the median).
            median = late

            def late_after(work: Work, node: str) -> float:
                if not work.costs:
                    return median if median is not None else float("inf")
                # On a node of average speed: a slow node's batches are
                # still backed up on a faster one.
                return max(session.policy.STRAGGLER_MIN_S, factor * scheduler.guess(work))

            late = late_after
        if late is None:
            return
        with session.lock:
            idle = session.members.idle_slots()
            if not idle:
                return
            in_flight = sorted(
                ((c.work, c.node, c.sent_at) for c in session.copies.values() if c.holds_slot),
                key=lambda entry: entry[2],
            )
            chosen = backups(
                in_flight, idle, late, time.monotonic(),
                skip=lambda work: (
                    work.backed_up or work.only is not None or work in session.pending
                ),
            )  # fmt: skip
            for work, node, target, waited in chosen:
                work.backed_up = True
                work.avoid = {node}
                session.pending.append(work)
                late_s = late(work, node) if callable(late) else late
                session.stats.event("straggler", node, waited_s=waited, late_s=late_s, backup=target)

    # -- deadlines and the broker

    def check_deadlines(self) -> None:
        session = self.session
        if session.failure is not None:
            return
        error = deadline_error(
            time.monotonic(),
            no_nodes_since=session.members.no_nodes_since,
            broker_down_since=self.broker_down_since,
            lost=session.members.lost,
            broker=session.broker,
            timeout=session.policy.no_node_timeout,
        )
        if error is not None:
            self.dispatcher.fail_everything(error)

    def broker_trouble(self, exc: BaseException) -> None:
        if self.broker_down_since is None:
            logger.warning("lost the broker %r: %r", self.session.broker, exc)
            self.broker_down_since = time.monotonic()
            self.session.stats.event("broker-down", error=repr(exc))

    def broker_back(self) -> None:
        session = self.session
        now = time.monotonic()
        assert self.broker_down_since is not None
        down = now - self.broker_down_since
        self.broker_down_since = None
        logger.warning("the broker %r is back after %.1f s", session.broker, down)
        session.stats.event("broker-up", down_s=down)
        session.members.broker_back(now)
        if is_rpc_backend(session.app.backend):
            # rpc:// results published while the broker was away are lost.
            session.stats.event("results-lost", resent=self.resend_in_flight())

    def check_reply_connection(self, backend: Any) -> None:
        """rpc://: a new reply connection means results may have been lost.

        Celery's rpc:// consumer reconnects by itself, and what nodes sent
        while its reply queue was gone (a broker restart) is lost: send what
        is in flight again, whether or not the outage was noticed otherwise.
        """
        connection = result_consumer_connection(backend)
        if connection is None or connection is self._reply_connection:
            return
        if self._reply_connection is not None:
            logger.warning("the rpc:// result consumer reconnected: resending the work in flight")
            self.session.stats.event("results-lost", resent=self.resend_in_flight())
            # The broker went away (a restart the heartbeat may not have
            # seen fail): the nodes reconnect on their own schedule, and
            # their silence meanwhile is not counted against them.
            self.session.members.broker_back(time.monotonic())
        self._reply_connection = connection

    def resend_in_flight(self) -> int:
        """Send every batch in flight once more (the first result still wins);
        how many were sent. A batch already resent is resent again: an outage
        seen twice loses results twice.

        The copies in flight are presumed lost: their nodes' room is given
        back, or the copies sent again could wait forever behind them (every
        node's room held by results that will never come: a hang). A result
        of theirs that does come is still taken.
        """
        session = self.session
        with session.lock:
            return self._send_again(list(session.copies.values()))

    def _send_again(self, copies: list[Copy], avoid: str | None = None) -> int:
        """Give back the room of ``copies``, presumed lost, and queue each
        one's work once (unless another copy of it still holds room);
        how many were queued. ``avoid``: a node the work (unless pinned)
        should not go back to. Called with the session's lock held."""
        session = self.session
        resent = 0
        for copy in copies:
            copy.release(session.members)
            work = copy.work
            held = any(c.work is work and c.holds_slot for c in session.copies.values())
            if held or any(w is work for w in session.pending):
                continue
            work.backed_up = True
            if avoid is not None and work.only is None:
                work.avoid = work.avoid | {avoid}
            session.pending.append(work)
            resent += 1
        return resent
