"""Lets the client's stop signal end a fit, never the node."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..wire.protocol import STOP_SIGNAL

__all__ = ["FitGuard", "StoppedBeforeFit", "fit_guard", "install_fit_guard", "mark_stopped"]

# Stop marks older than this are pruned: a mark matters only for a task that
# a pool process took in the moments before its revoke arrived.
_MARK_KEEP_S = 3600.0


class StoppedBeforeFit(RuntimeError):
    """The client stopped this task before its fit began: it does not run."""


def _marks(cache_dir: Path) -> Path:
    return Path(cache_dir) / ".stopped"


def _is_marked(cache_dir: Path, task_id: str) -> bool:
    """Whether ``task_id`` was stopped (:func:`mark_stopped`)."""
    return (_marks(cache_dir) / task_id).exists()


def mark_stopped(cache_dir: Path, task_ids: Iterable[str]) -> None:
    """Record, before the stop signal is sent, that ``task_ids`` are stopped.

    The signal alone cannot stop a task that a pool process has taken but
    whose fit has not begun (it verifies the task, fetches data): the guard
    drops a signal outside a fit, as it cannot tell it from a late one for
    the task before. The mark closes that window: the guard reads it as the
    fit begins (see :meth:`FitGuard.fit`). Written by the node's main
    process, in the ``clustersearch_revoke`` handler.
    """
    folder = _marks(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for task_id in task_ids:
        if task_id and "/" not in task_id and not task_id.startswith("."):
            (folder / task_id).touch()
    old = time.time() - _MARK_KEEP_S
    for mark in folder.iterdir():
        try:
            if mark.stat().st_mtime < old:
                mark.unlink()
        except OSError:
            pass


class FitGuard:
    """Lets STOP_SIGNAL kill a pool process only while it runs a fit.

    A pool process that dies in the pool's own code can take the node down
    with it: on the embedded transport (billiard's blocking pool) the
    processes share locks on the pool's pipes, and one killed while it
    reports a result or reads its next task dies holding a lock that every
    later process of the node then waits for, forever. A revoke arrives at
    any moment, so the signal is blocked in the process and a thread of its
    own takes it: it kills the process at once if the fit of the stopped
    task is running (as SIGTERM would, a fit in C code included), and drops
    it otherwise (the fit has finished, and the client ignores its result;
    or the process has moved on to the next task, whose fit must go on).
    The lock keeps a fit from finishing while the thread decides.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = False
        self.pid: int | None = None
        # The task whose fit runs, and where its stop mark would be.
        self.task_id = ""
        self.cache_dir: Path | None = None

    def install(self) -> None:
        if self.pid == os.getpid():
            return
        self.pid = os.getpid()
        signum = getattr(signal, STOP_SIGNAL)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signum})
        threading.Thread(
            target=self._take, args=(signum,), name="clustersearch-stop", daemon=True
        ).start()

    def _take(self, signum: int) -> None:
        while True:
            signal.sigwait({signum})
            with self.lock:
                if self.running and self._meant_for_this_fit():
                    os.kill(os.getpid(), signal.SIGKILL)

    def _meant_for_this_fit(self) -> bool:
        """Whether the stop is for the task now fitting: its mark is there
        (``clustersearch_revoke`` marks before it signals). A signal for a
        task that has ended (Celery sends it when it sees the task start,
        which may be after the task ended here and the next one began) is
        dropped: it must not kill the next task's fit. Without a cache
        folder (Celery's own revoke, no marks) every stop kills the fit."""
        if self.cache_dir is None or not self.task_id:
            return True
        return _is_marked(self.cache_dir, self.task_id)

    @contextmanager
    def fit(self, task_id: str = "", cache_dir: Path | None = None) -> Iterator[None]:
        """Run a fit killable by the stop signal.

        With ``cache_dir``, a task stopped before its fit began (see
        :func:`mark_stopped`) raises :class:`StoppedBeforeFit` instead. The
        mark is read after the fit counts as running: a stop whose mark
        came too late for the check sends its signal into the fit.
        """
        with self.lock:
            self.running = True
            self.task_id, self.cache_dir = task_id, cache_dir
            if cache_dir is not None and task_id and _is_marked(cache_dir, task_id):
                self.running = False
                raise StoppedBeforeFit(f"task {task_id} was stopped before its fit began")
        try:
            yield
        finally:
            with self.lock:
                self.running = False
                self.task_id, self.cache_dir = "", None


fit_guard = FitGuard()


def install_fit_guard(**kwargs: object) -> None:
    """``worker_process_init`` handler: every pool process gets the guard."""
    fit_guard.install()
