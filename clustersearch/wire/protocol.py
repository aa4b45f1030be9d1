"""Names and message shapes that the client and the nodes agree on.

A task message (JSON, Celery's envelope) carries one joblib batch::

    args   = (payload,)                      # pickled batch (bytes)
    kwargs = {"source": blob queue of the client,
              "blobs": [[digest, kind], ...], # data the payload refers to
              "auth": signature}              # see .signing

and its result (JSON) is ``{"payload": pickled result, "auth": signature}``;
the pickled result is a dict with the keys of :data:`RESULT_KEYS`.
"""

from __future__ import annotations

import platform
import socket
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any

from .. import __version__

__all__ = [
    "INFO_COMMAND",
    "QUEUE_PREFIX",
    "RESULT_KEYS",
    "STOP_SIGNAL",
    "STORE_OPS",
    "TASK_NAME",
    "RemoteFailure",
    "StoreCall",
    "local_versions",
    "node_name",
    "warning_category",
    "queue_for",
]

TASK_NAME = "clustersearch.run_batch"
QUEUE_PREFIX = "clustersearch."
# The remote-control command with which the client finds nodes (and beats).
INFO_COMMAND = "clustersearch_info"
# The signal with which the client stops the fits of a search it gave up
# (``revoke(terminate=True, signal=STOP_SIGNAL)``); see ``node.guard``.
STOP_SIGNAL = "SIGUSR2"

# What a node's pickled result holds.
RESULT_KEYS = ("output", "stdout", "warnings", "node", "pid", "fetched", "started", "finished")


# What a client may ask of a node's store of forest parts (``node/store.py``):
# build parts from seeds and keep them, sum their trees' outputs on X, send
# them back, drop them.
STORE_OPS = ("build", "outputs", "fetch", "drop")


@dataclass(frozen=True)
class StoreCall:
    """A request to a node's store of forest parts.

    It travels as the payload of an ordinary task (signed, its arrays sent
    as blob references like a batch's), pinned to one node: the node runs
    it in its store (``node/store.py``) instead of calling it. ``forest``
    names the forest (hex), ``parts`` the parts concerned (empty: all of
    them, for ``drop``), ``args`` the operation's arguments.
    """

    op: str
    forest: str
    parts: tuple[int, ...] = ()
    args: dict[str, Any] = field(default_factory=dict)


def queue_for(node: str) -> str:
    """The name of the queue that node ``node`` consumes."""
    return QUEUE_PREFIX + node


def node_name(hostname: str | None) -> str:
    """The node name of a Celery worker hostname (``name@host``)."""
    return (hostname or socket.gethostname()).split("@", 1)[0]


class RemoteFailure:
    """An exception raised by a batch on a node, sent back as a value.

    Returning it (rather than letting Celery store a failure) keeps the
    original exception type, and its traceback as text.
    """

    def __init__(self, exc: BaseException, node: str) -> None:
        from .serialization import dumps, loads

        self.node = node
        self.traceback = "".join(traceback.format_exception(exc))
        self.exception: BaseException
        try:
            loads(dumps(exc))
            self.exception = exc
        except Exception:
            # An exception that does not survive pickling is sent as its text.
            self.exception = RuntimeError(f"{type(exc).__name__}: {exc}")

    def exception_with_traceback(self) -> BaseException:
        from ..exceptions import RemoteTraceback

        exc = self.exception
        exc.__cause__ = RemoteTraceback(
            f'Raised on node {self.node!r}:\n"""\n{self.traceback}"""'
        )
        return exc


def local_versions() -> dict[str, Any]:
    """The versions that must agree between a client and its nodes."""
    import cloudpickle
    import joblib
    import numpy
    import sklearn

    return {
        "python": platform.python_version(),
        "clustersearch": __version__,
        "scikit-learn": sklearn.__version__,
        "numpy": numpy.__version__,
        "joblib": joblib.__version__,
        "celery": sys.modules["celery"].__version__ if "celery" in sys.modules else None,
        "cloudpickle": cloudpickle.__version__,
    }


def warning_category(module: str, name: str) -> type[Warning] | None:
    """The warning class a node named (``module``, ``qualname``), if this
    process has it and it is a Warning; None otherwise."""
    import importlib

    try:
        obj: Any = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError):
        return None
    return obj if isinstance(obj, type) and issubclass(obj, Warning) else None
