"""A node's own memory: kept small, and measured.

A node with ``--concurrency 4`` on a 2 GB board held a quarter of the RAM
before its first fit (benchmarks/bench_node_memory.py, docs/benchmarks.md).
Where it went, and what is done about it here:

- The pool processes are forked after the main process imported
  scikit-learn, numpy and scipy, so those pages start shared. Python's
  cyclic garbage collector then wrote to every tracked object's header in
  each child (its first full collection), copying most of that memory into
  each child. :func:`before_fork` moves every object alive at that point to
  the collector's permanent generation (``gc.freeze``): it is never scanned,
  and its pages stay shared.
- Modules the fits need (``_fit_and_score``, the scorers, the forests and
  trees) were imported by each child on its first task, four private
  copies: imported once, in the main process, before the fork
  (:data:`PRELOAD`, and the modules ``CLUSTERSEARCH_PRELOAD`` or
  ``clustersearch worker --preload`` name).
- glibc's malloc kept what a fit freed (arenas per thread, a heap top it
  trims lazily, a mmap threshold that grows after each large free): once a
  pool process has been idle :data:`IDLE_S` after a task, it collects its
  garbage and hands free memory back (:func:`after_task`), with few
  arenas (:func:`tune_malloc`). Not after every task: trimming the heap
  after each one, and mapping each block over 256 KiB on its own (a fixed
  mmap threshold), made every next fit fault its memory back in: 10% more
  of the nodes' CPU on the 108-fit benchmark grid, the gap between the
  embedded transport and loky (docs/benchmarks.md).

``CLUSTERSEARCH_LEAN_MEMORY=0`` turns all of it off (for the benchmark's
baseline). :func:`node_memory` is what ``clustersearch nodes`` reports.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import importlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

__all__ = [
    "IDLE_S", "PRELOAD", "after_task", "before_fork", "before_task", "idle_cleanups", "lean",
    "node_memory", "tune_malloc",
]  # fmt: skip

logger = logging.getLogger(__name__)

# Imported before the pool forks: what unpickling and scoring any search's
# fit needs (scikit-learn's _fit_and_score and its scorers), and the forests
# (with the trees): 7 MB in the main process, against about 6 MB in each
# pool process that fits one (benchmarks/bench_node_memory.py).
PRELOAD = ("sklearn.model_selection._validation", "sklearn.metrics", "sklearn.ensemble")

# glibc's mallopt parameter (malloc.h).
_M_ARENA_MAX = -8

# A pool process cleans up once it has been idle this long after a task.
# Not sooner: with 0.5 s, nodes slowed to 1/2 and 1/4 of a CPU (whose
# processes wait between tasks while the scheduler keeps long fits for
# faster nodes) ended the mixed-node benchmark 1.03x to 1.13x its bound in
# 4 runs, against 1.01x to 1.02x without the clean-up and with 2 s
# (benchmarks/bench_makespan.py --nodes mixed); a clean-up that a task
# meets holds it up (the collector holds the interpreter, a trim the heap).
IDLE_S = 2.0


def lean() -> bool:
    """Whether the memory measures are on (``CLUSTERSEARCH_LEAN_MEMORY``, default on)."""
    return os.environ.get("CLUSTERSEARCH_LEAN_MEMORY", "1").lower() not in ("0", "false", "no")


def _libc() -> Any:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
            return None  # not glibc
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def tune_malloc() -> None:
    """Few arenas, in the node's main process (its pool processes inherit
    the setting)."""
    if _LIBC is None or not lean():
        return
    _LIBC.mallopt(_M_ARENA_MAX, 2)


def before_fork() -> None:
    """Called in the main process just before the pool forks its processes."""
    if not lean():
        return
    extra = os.environ.get("CLUSTERSEARCH_PRELOAD", "")
    for module in [*PRELOAD, *filter(None, (m.strip() for m in extra.split(",")))]:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            logger.warning("could not preload %s: %s", module, exc)
    gc.collect()
    gc.freeze()


class _Idle:
    """A pool process's tasks, as its cleaner thread sees them."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.busy = False
        self.dirty = False  # a task ran since the last clean-up
        self.last = 0.0  # when the last task ended (monotonic)
        self.pid: int | None = None  # the process the cleaner runs in
        self.cleanups = 0


_IDLE = _Idle()


def before_task(**_: Any) -> None:
    """In a pool process before each task (Celery's ``task_prerun``)."""
    if not lean():
        return
    with _IDLE.cond:
        _IDLE.busy = True


def after_task(**_: Any) -> None:
    """In a pool process after each task (``task_postrun``): what the fit
    left behind is freed once the process has been idle :data:`IDLE_S`."""
    if not lean():
        return
    with _IDLE.cond:
        _IDLE.busy = False
        _IDLE.dirty = True
        _IDLE.last = time.monotonic()
        if _IDLE.pid != os.getpid():  # threads do not survive a fork
            _IDLE.pid = os.getpid()
            threading.Thread(
                target=_clean_when_idle, name="clustersearch-idle-cleanup", daemon=True
            ).start()
        _IDLE.cond.notify()


def _clean_when_idle() -> None:
    state = _IDLE
    while True:
        with state.cond:
            while state.busy or not state.dirty:
                state.cond.wait()
            left = state.last + IDLE_S - time.monotonic()
            if left > 0:
                state.cond.wait(left)
                continue
            state.dirty = False
        gc.collect()
        with state.cond:
            if state.busy:  # a task came in meanwhile: trim later
                state.dirty = True
                continue
        if _LIBC is not None:
            _LIBC.malloc_trim(0)
        with state.cond:
            state.cleanups += 1


def idle_cleanups() -> int:
    """How many times this process cleaned up after its tasks (for tests)."""
    with _IDLE.cond:
        return _IDLE.cleanups


_HEX = frozenset(b"0123456789abcdef")


def _children(pid: int) -> list[int]:
    found = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                kids = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
                for kid in map(int, kids):
                    found += [kid, *_children(kid)]
    return found


def node_memory(data_dir: str | os.PathLike[str], pid: int | None = None) -> tuple[int, int]:
    """``(pss, data)``: the proportional set size, in bytes, of process
    ``pid`` (this one) and all its descendants, and the part of it that maps
    files under ``data_dir`` (the node's data cache, shared by its
    processes). ``(0, 0)`` where ``/proc`` has no ``smaps`` (not Linux)."""
    pid = os.getpid() if pid is None else pid
    prefix = str(Path(data_dir)) + os.sep
    pss = data = 0
    for proc in [pid, *_children(pid)]:
        in_data = False
        try:
            with open(f"/proc/{proc}/smaps", "rb") as f:
                for line in f:
                    if line.startswith(b"Pss:"):
                        kb = int(line.split()[1]) * 1024
                        pss += kb
                        if in_data:
                            data += kb
                    elif line[0] in _HEX:
                        # A mapping's first line: "start-end perms offset dev inode [path]".
                        fields = line.split(None, 5)
                        path = fields[5].strip().decode(errors="replace") if len(fields) > 5 else ""
                        in_data = path.startswith(prefix)
        except OSError:
            continue
    return pss, data
