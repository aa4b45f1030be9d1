"""How a node ends: with the client that started it, and soon after SIGTERM.

The nodes of a :class:`~clustersearch.LocalCluster` belong to its client. A
client that dies without closing it (SIGKILL, the OOM killer, a notebook
kernel restarted) runs no cleanup, and its nodes lived on, polling their
transport folder for ever. So the client holds the write end of a pipe, the
lifeline, and each node the read end (``clustersearch worker --watch-fd``).
The client never writes to it: the node reads end-of-file when every copy of
the write end is closed, that is when the client is gone, however it died, or
when it closed the cluster. The node then stops at once (its fits belong to a
client that cannot take their results): it kills its pool processes and
itself, and a small process of its own removes the cluster's folder
(``--watch-remove``) once they are gone.

Only the client may hold the write end: ``os.pipe`` makes it
non-inheritable (no program the client starts gets it; the nodes get the read
end alone, through ``pass_fds``), and processes the client forks without
exec close it at once (``os.register_at_fork``). Linux's parent-death signal
is no substitute: it fires when the *thread* that started the node exits.

:func:`bound_shutdown` bounds a node's own shutdown: after SIGTERM (warm) it
waits for the running fits, after SIGQUIT (cold) for nothing, then gives
Celery :data:`SHUTDOWN_GRACE_S` to finish and ends the node itself.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .._compat import run_exit_handlers, running_fits

__all__ = ["SHUTDOWN_GRACE_S", "bound_shutdown", "exit_now", "watch"]

# -- The node's side ------------------------------------------------------------

# Runs alone (-I -S: nothing but the standard library), in a session of its
# own: it outlives the node it cleans up after.
_REMOVER = (
    "import os, shutil, sys\n"
    "fd = int(sys.argv[1])\n"
    "while os.read(fd, 1):\n"
    "    pass\n"
    "shutil.rmtree(sys.argv[2], ignore_errors=True)\n"
)


def watch(fd: int, folder: str | os.PathLike[str] | None = None) -> threading.Thread:
    """Stop this node when the client at the other end of ``fd`` is gone.

    Call it in the node's main process, before its pool starts. ``folder``
    (the cluster's folder, which its nodes share) is removed once this node
    and its pool processes are gone.
    """
    os.set_inheritable(fd, False)
    folder = None if folder is None else str(Path(folder).resolve())
    thread = threading.Thread(
        target=_watch, args=(fd, folder), name="clustersearch-lifeline", daemon=True
    )
    thread.start()
    return thread


def _watch(fd: int, folder: str | None) -> None:
    try:
        while os.read(fd, 1):
            pass  # the client writes nothing; end-of-file: it is gone
    except OSError:
        pass
    _say("its client is gone: stopping now, running fits abandoned")
    if folder is not None:
        _remove_when_gone(folder)
    _end_now(1, whole_group=True)


def _remove_when_gone(folder: str) -> None:
    # Not here, now: this process's other threads (and a pool process
    # started meanwhile) could write into the folder after its removal. The
    # remover waits for the end-of-file on a pipe whose write end only this
    # process and those it forks from now on hold, that is until every one
    # of them is gone. Each node of the cluster starts one: the last to run
    # finds no node left to write into the folder.
    read_fd, write_fd = os.pipe()
    try:
        subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _REMOVER, str(read_fd), folder],
            pass_fds=(read_fd,), start_new_session=True, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    except OSError as exc:
        _say(f"cannot start the process that removes {folder}: {exc}")
    finally:
        os.close(read_fd)
    # write_fd stays open until this process ends.


def _children(pid: int) -> set[int]:
    pids: set[int] = set()
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                pids.update(int(p) for p in (task / "children").read_text().split())
    return pids


def _end_now(exitcode: int, *, whole_group: bool = False) -> None:
    """End this node and its pool processes at once."""
    me = os.getpid()
    if whole_group and os.getpgid(0) == me:
        # The leader of its own process group (LocalCluster starts each node
        # in a session of its own): one signal ends the node and every pool
        # process, also one started a moment ago.
        os.killpg(me, signal.SIGKILL)
    for pid in _children(me):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    # Pool processes that escaped the sweep die with this process (Celery
    # gives them a parent-death signal).
    os._exit(exitcode)


def exit_now(code: int = 0) -> None:
    """End the process of a node whose worker has shut down, skipping the
    interpreter's teardown: with scikit-learn, SciPy and Celery loaded it
    took 2 s on a busy 2-core machine, for nothing. The exit handlers still
    run (logging's flush, multiprocessing's temporary folder)."""
    run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _say(message: str) -> None:
    with contextlib.suppress(Exception):
        sys.stderr.write(f"clustersearch worker (pid {os.getpid()}): {message}\n")
        sys.stderr.flush()


# -- A bounded shutdown ---------------------------------------------------------

# What Celery gets, after the last running fit of a warm shutdown (or at once,
# for a cold one), to finish its own before the node ends itself. An idle
# node's own warm shutdown took 5 to 9 s on a busy 2-core machine (2 to 3.5 s
# once the embedded transport's loop stopped waiting 2 s at a time, see
# _transport): billiard's pool threads and Celery's timer each sleep up to a
# second between looks at their state, and the interpreter's exit takes a
# second or two. A cold one can block for good: Celery's SIGQUIT handler
# stops the pool itself, which on the embedded transport waits for the
# running fits, and no other handler runs meanwhile.
SHUTDOWN_GRACE_S = 3.0

# The signals that stop a node, and how (Celery's words; Ctrl-C first asks
# for a warm shutdown).
_HOW = {"SIGTERM": "Warm", "SIGINT": "Warm", "SIGQUIT": "Cold"}
_EXITCODE = {"Warm": 0, "Cold": 1}

_shutdown: dict[str, Any] = {"pid": None, "wake": None, "how": None}


def bound_shutdown(grace_s: float = SHUTDOWN_GRACE_S) -> None:
    """Bound this node's shutdown; call it in the node's main process before
    the worker starts.

    After SIGTERM (warm) the node still lets its running fits finish, as
    Celery does; after SIGQUIT (cold) it does not wait for them. Then, if
    Celery has not ended the process within ``grace_s``, the node kills its
    pool processes and exits.
    """
    from celery.signals import worker_ready

    if _shutdown["pid"] == os.getpid():
        return
    # The signal handler wakes the thread through a pipe: no lock (a lock
    # taken in a handler deadlocks when a second signal interrupts it), and
    # the thread is started now, not in the handler, for the same reason.
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    _shutdown.update(pid=os.getpid(), wake=write_fd, how=None)
    threading.Thread(
        target=_shutdown_deadline, args=(read_fd, grace_s), name="clustersearch-shutdown",
        daemon=True,
    ).start()  # fmt: skip
    worker_ready.connect(_watch_signals, weak=False, dispatch_uid=__name__)


def _watch_signals(**kwargs: Any) -> None:
    # Celery has installed its handlers by now. Ours runs first and only
    # notes the request: Celery's may block (see SHUTDOWN_GRACE_S).
    if _shutdown["pid"] != os.getpid():
        return
    for name, how in _HOW.items():
        signum = getattr(signal, name)
        previous = signal.getsignal(signum)
        if previous not in _handlers:  # once, though the consumer restarts
            handler = functools.partial(_on_signal, how, previous)
            _handlers.append(handler)
            signal.signal(signum, handler)


_handlers: list[Any] = []


def _on_signal(how: str, previous: Any, signum: int, frame: Any) -> Any:
    if _shutdown["pid"] == os.getpid():  # not in a pool process forked since
        if _shutdown["how"] is None or how == "Cold":
            _shutdown["how"] = how
        with contextlib.suppress(OSError):
            os.write(_shutdown["wake"], b"!")
    if callable(previous):
        return previous(signum, frame)
    if previous == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    return None


def _shutdown_deadline(read_fd: int, grace_s: float) -> None:
    os.read(read_fd, 1)
    while _shutdown["how"] == "Warm" and running_fits():
        time.sleep(0.1)  # the running fits finish first
    time.sleep(grace_s)
    how = _shutdown["how"]
    since = "its last fit" if how == "Warm" else "the signal"
    _say(f"{how.lower()} shutdown not over {grace_s} s after {since}: ending it now")
    _end_now(_EXITCODE[how])
