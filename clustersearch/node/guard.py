"""Lets the client's stop signal end a fit, never the node."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from ..wire.protocol import STOP_SIGNAL

__all__ = ["FitGuard", "fit_guard", "install_fit_guard"]


class FitGuard:
    """Lets STOP_SIGNAL kill a pool process only while it runs a fit.

    A pool process that dies in the pool's own code can take the node down
    with it: on the embedded transport (billiard's blocking pool) the
    processes share locks on the pool's pipes, and one killed while it
    reports a result or reads its next task dies holding a lock that every
    later process of the node then waits for, forever. A revoke arrives at
    any moment, so the signal is blocked in the process and a thread of its
    own takes it: it kills the process at once if a fit is running (as
    SIGTERM would, a fit in C code included), and drops it otherwise (the
    fit has finished; the client ignores its result). The lock keeps a fit
    from finishing while the thread decides.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = False
        self.pid: int | None = None

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
                if self.running:
                    os.kill(os.getpid(), signal.SIGKILL)

    @contextmanager
    def fit(self) -> Iterator[None]:
        with self.lock:
            self.running = True
        try:
            yield
        finally:
            with self.lock:
                self.running = False


fit_guard = FitGuard()


def install_fit_guard(**kwargs: object) -> None:
    """``worker_process_init`` handler: every pool process gets the guard."""
    fit_guard.install()
