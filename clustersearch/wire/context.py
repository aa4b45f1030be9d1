"""Where code runs: whether this process is running a batch for a node.

An estimator of ours fitted inside a node's task (a cluster forest that is
the estimator of a cluster search) must fit there as plain scikit-learn: a
node never opens a cluster session or sends tasks. The node sets the marker
(``node.task``) while a batch runs; the estimators read it. It lives in the
wire because both sides use it and neither imports the other.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["in_node_task", "node_task"]

_lock = threading.Lock()
# How many batches this process runs now (a pool process runs one; a
# threaded pool may run several).
_running = 0


def in_node_task() -> bool:
    """Whether this process is running a node's batch of work now."""
    return _running > 0


@contextmanager
def node_task() -> Iterator[None]:
    """Mark this process as running a node's batch for the block's duration."""
    global _running
    with _lock:
        _running += 1
    try:
        yield
    finally:
        with _lock:
            _running -= 1
