"""Which nodes get work: windows, heartbeats, lost and joining nodes.

Plain objects, no threads and no I/O: the dispatcher feeds them what it
learns (a heartbeat round, a batch sent or finished) and acts on what they
decide; unit tests drive them the same way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .policy import Policy

if TYPE_CHECKING:
    from .cluster import NodeInfo

__all__ = ["BeatOutcome", "Membership"]


@dataclass
class BeatOutcome:
    """What one heartbeat round decided."""

    lost: list[tuple[str, str, dict]] = field(default_factory=list)  # name, reason, info
    joining: list[NodeInfo] = field(default_factory=list)


class Membership:
    """The live nodes of a session and how much work each holds.

    Each node holds at most ``concurrency + queued_per_node`` batches; the
    next batch goes to the node with the most free room relative to its
    concurrency, so a slow node gets less work and a fast one more.
    """

    def __init__(self, nodes: Iterable[NodeInfo], policy: Policy, now: float) -> None:
        self.policy = policy
        self.nodes: dict[str, NodeInfo] = {}  # every node ever seen, by name
        self.window: dict[str, int] = {}  # the live ones: batches they may hold
        self.busy: Counter[str] = Counter()
        self.missed: Counter[str] = Counter()
        self.last_seen: dict[str, float] = {}
        self.lost: list[str] = []
        self.capacity = 0
        self.no_nodes_since: float | None = None
        self.grace_until = 0.0
        for node in nodes:
            self.add(node, now)
        if not self.window:
            raise ValueError("a session needs at least one node")

    # -- placement

    def pick(self, avoid: Iterable[str] = (), only: str | None = None) -> str | None:
        """The live node with the most free room, relative to its concurrency.

        Nodes in ``avoid`` (where the batch already failed, or where its
        other copy runs) come last. With ``only``, that node if it is live
        and has room, else None (pinned work never goes elsewhere).
        """
        if only is not None:
            free = self.window.get(only, 0) - self.busy[only]
            return only if only in self.window and free > 0 else None
        avoid = set(avoid)
        best, best_room = None, 0.0
        for name, window in self.window.items():
            free = window - self.busy[name]
            if free <= 0:
                continue
            room = free / self.nodes[name].concurrency
            if name in avoid:
                room -= 1e6
            if best is None or room > best_room:
                best, best_room = name, room
        return best

    def took(self, name: str) -> None:
        self.busy[name] += 1

    def released(self, name: str | None) -> None:
        if name in self.window:
            self.busy[name] -= 1

    def idle_slots(self) -> dict[str, int]:
        """Live nodes with a process free, and how many."""
        return {
            name: self.nodes[name].concurrency - self.busy[name]
            for name in self.window
            if self.busy[name] < self.nodes[name].concurrency
        }

    # -- membership

    def add(self, info: NodeInfo, now: float) -> None:
        name = info.name
        self.nodes[name] = info
        self.window[name] = info.concurrency + self.policy.queued_per_node
        self.busy[name] = 0
        self.missed[name] = 0
        self.last_seen[name] = now
        self.capacity += info.concurrency
        self.no_nodes_since = None

    def remove(self, name: str, now: float) -> bool:
        """Take ``name`` out of the rotation; False if it was not in it."""
        if name not in self.window:
            return False
        del self.window[name]
        self.capacity -= self.nodes[name].concurrency
        self.lost.append(name)
        self.busy[name] = 0
        if not self.window and self.no_nodes_since is None:
            self.no_nodes_since = now
        return True

    def beat(self, t: float, answered: Iterable[NodeInfo]) -> BeatOutcome:
        """Count missed heartbeats; say who is lost and who joins."""
        outcome = BeatOutcome()
        replies = {node.name: node for node in answered}
        for name in replies:
            self.last_seen[name] = t
        for name in list(self.window):
            if name in replies:
                self.missed[name] = 0
            elif t >= self.grace_until:
                self.missed[name] += 1
                if self.missed[name] >= self.policy.missed_heartbeats:
                    why = f"it missed {self.missed[name]} heartbeats in a row"
                    outcome.lost.append((name, why, {}))
        for name, info in replies.items():
            if not info.consuming:
                # It answers, but takes nothing from its queue (a cancel_consumer).
                if name in self.window:
                    why = (f"it no longer consumes its queue {info.queue} (a remote "
                           "cancel_consumer?); restart the node")  # fmt: skip
                    outcome.lost.append((name, why, {"consuming": False}))
            elif info.stalled_s >= self.policy.stall_limit_s:
                # It answers, but its pool starts nothing: as good as lost.
                if name in self.window:
                    why = (
                        f"its pool started no task for {info.stalled_s:.1f} s while "
                        "a process was free; restart the node"
                    )
                    outcome.lost.append((name, why, {"stalled_s": info.stalled_s}))
            elif name not in self.window:
                outcome.joining.append(info)
        return outcome

    def broker_back(self, now: float) -> None:
        """Nodes reconnect on their own schedule: give them time before
        counting their silence."""
        self.grace_until = now + self.policy.reconnect_grace
        self.missed.clear()
