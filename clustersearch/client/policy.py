"""How a cluster handles failures and schedules work: one value object."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from numbers import Real
from typing import Any

from ..exceptions import ConfigurationError

__all__ = ["Policy"]


@dataclass(frozen=True)
class Policy:
    """The failure and scheduling policy of a :class:`~clustersearch.Cluster`.

    Like urllib3's ``Retry``: an immutable value, given to ``Cluster`` whole
    (``Cluster(url, policy=Policy(...))``) or field by field
    (``Cluster(url, heartbeat_interval=2)``); :meth:`replace` derives one.

    Parameters
    ----------
    discovery_timeout : float, default=1.0
        Seconds to wait for nodes to answer when looking for them.
    connect_timeout : float, default=5.0
        Seconds to wait for the broker before giving up with
        :class:`~clustersearch.exceptions.BrokerUnreachableError`.
    queued_per_node : int, default=1
        Batches a node may hold beyond its concurrency, so that it never
        idles while its next fit travels. 0: nothing waits at a node (for
        fits longer than the broker's redelivery timeouts).
    heartbeat_interval : float, default=5.0
        During a search the client asks every node for its info this often
        (seconds). The same broadcast finds nodes that join mid-search: they
        get work at once.
    missed_heartbeats : int, default=3
        Consecutive unanswered heartbeats after which a node counts as lost:
        its unfinished work is sent to the other nodes, its stale copies are
        revoked and taken out of its queue, and its late results are ignored.
        A lost node that answers again rejoins. Detection takes
        ``missed_heartbeats - 1`` to ``missed_heartbeats`` intervals, plus
        the wait for replies (the interval, at most one second).
    max_retries : int, default=2
        A batch of fits whose worker process or node died is sent again (call
        by call, preferably to other nodes) at most this many times. A fit
        lost ``max_retries + 1`` times ends as scikit-learn's ``error_score``
        entry, its reason a :class:`~clustersearch.exceptions.NodeFailureError`
        naming each node and what happened there.
    no_node_timeout : float, default=30.0
        With every node lost, or the broker unreachable, for this long
        (seconds) the search fails with NoWorkersError (or
        BrokerUnreachableError) instead of waiting.
    straggler_factor : float or None, default=3.0
        When no batch waits to be sent and a node is idle, a batch in flight
        for more than ``straggler_factor`` times the median batch time (and
        at least a second) is sent to the idle node as well; the first result
        wins and the other copy is revoked. None turns this off.
    reconnect_grace : float, default=10.0
        After the broker comes back, nodes get this long (seconds) to
        reconnect before their silence counts as missed heartbeats.
    longest_first : bool, default=True
        Send a search's fits expected to take longest first, so that a long
        fit does not start last and hold the whole search. Their cost is
        learned as fits finish (from their parameters, training-set size and
        node); fits with parameter values not tried yet go first. A node
        takes a batch only if it would not end later there than on a node
        that frees up soon (a slow node does not take a long fit at the
        end), and a batch counts as a straggler after ``straggler_factor``
        times its own expected time. The search's joblib ``Parallel`` then
        hands every batch over at once (when ``pre_dispatch`` is left at its
        default), at most ``n_fits / (32 x the nodes' concurrency)`` fits a
        batch. ``cv_results_`` is the same in any order. False: fits go in
        the search's order, batched by joblib (docs/architecture.md).
    """

    discovery_timeout: float = 1.0
    connect_timeout: float = 5.0
    queued_per_node: int = 1
    heartbeat_interval: float = 5.0
    missed_heartbeats: int = 3
    max_retries: int = 2
    no_node_timeout: float = 30.0
    straggler_factor: float | None = 3.0
    reconnect_grace: float = 10.0
    longest_first: bool = True

    # A node whose pool starts nothing while a task waits and a process is
    # free (it still answers heartbeats) loses its work after as long as a
    # silent node, but never sooner than this: Celery gives a new pool
    # process 4 s to come up before it replaces it.
    STALL_FLOOR_S = 10.0
    # A backup copy of a straggler's batch is sent only after this long: for
    # short fits a duplicate buys nothing.
    STRAGGLER_MIN_S = 1.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "straggler_factor" and value is None:
                continue
            if f.name == "longest_first":
                if not isinstance(value, bool):
                    raise ConfigurationError(f"Policy: longest_first must be a bool, got {value!r}")
                continue
            integral = f.name in ("queued_per_node", "missed_heartbeats", "max_retries")
            ok = isinstance(value, int) if integral else isinstance(value, Real)
            if not ok or isinstance(value, bool):
                kind = "an int" if integral else "a number"
                raise ConfigurationError(f"Policy: {f.name} must be {kind}, got {value!r}")
            low = 1 if f.name == "missed_heartbeats" else 0
            positive = f.name in ("heartbeat_interval", "straggler_factor")
            if not value >= low or (positive and not value > 0):  # NaN too
                bound = "> 0" if positive else f">= {low}"
                raise ConfigurationError(f"Policy: {f.name} must be {bound}, got {value!r}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes: Any) -> Policy:
        """A copy with ``changes``."""
        return dataclasses.replace(self, **changes)

    @property
    def silent_limit_s(self) -> float:
        """After how long without an answer a node is lost."""
        return self.missed_heartbeats * self.heartbeat_interval

    @property
    def stall_limit_s(self) -> float:
        """After how long a node whose pool starts nothing is lost."""
        return max(self.STALL_FLOOR_S, self.silent_limit_s)

    @property
    def reply_timeout(self) -> float:
        """How long a heartbeat waits for replies: a node answers in
        milliseconds; a second covers a slow network."""
        return min(1.0, self.heartbeat_interval)
