"""The node's pool: Celery's prefork pool, watched more closely."""

from __future__ import annotations

import time
from typing import Any

from .._compat import prefork_pool_classes, worker_pool_state
from .memory import before_fork, tune_malloc

__all__ = ["POOL_CHECK_S", "PoolWatch", "TaskPool", "pool_watch"]

# How often a node's pool looks for pool processes that died (Celery: 5 s).
POOL_CHECK_S = 0.5

_AsynPoolBase, _PreforkTaskPool = prefork_pool_classes()


class _AsynPool(_AsynPoolBase):  # type: ignore[misc,valid-type]
    """Celery's event-loop pool, looking for dead processes every POOL_CHECK_S.

    Celery learns that a pool process died when the process's sentinel pipe
    closes, and then reaps it. A process killed with SIGKILL closes its pipes
    a moment before the kernel lets it be reaped; when the pool looks in that
    moment it finds nothing to reap, stops watching the sentinel, and the dead
    process (and the fit it held) waits for the pool's periodic check. Celery
    runs that every 5 s; here, in about half the kills of a busy pool process,
    a lost fit was reported 4-5 s late instead of 0.03 s.
    """

    @property
    def timers(self) -> dict[Any, float]:
        return {self.maintain_pool: POOL_CHECK_S}


class TaskPool(_PreforkTaskPool):  # type: ignore[misc,valid-type]
    """Celery's prefork pool (``--pool prefork``) with a faster check for
    dead processes; nodes use it through the ``worker_pool`` setting."""

    Pool = _AsynPool

    def on_start(self) -> None:
        # The pool processes fork here: what they share with the main
        # process should stay shared (node/memory.py).
        tune_malloc()
        before_fork()
        super().on_start()


class PoolWatch:
    """How long a node's pool has started nothing while it could.

    A node whose pool is stuck (a pool process frozen before it took its
    task, or one that died holding a lock of the pool, as SIGTERM could do on
    the embedded transport) still answers heartbeats from its main process,
    so it does not look lost, yet its work never starts. Each heartbeat
    reports for how long, at every heartbeat since, a task has waited while
    a pool process was free and no task has started; the client takes work
    away from a node stalled as long as it would from a silent one.
    """

    def __init__(self) -> None:
        self._since: float | None = None
        self._started: int | None = None

    def stalled_s(self, limit: int) -> float:
        waiting, running, started = worker_pool_state()
        now = time.monotonic()
        if not waiting or running >= limit:
            self._since = None
            return 0.0
        if self._since is None or started != self._started:
            self._since, self._started = now, started
        return now - self._since


pool_watch = PoolWatch()
