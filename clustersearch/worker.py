"""The node side: the Celery app factory, the task every node runs, and its
remote-control command.

A node is a Celery worker that consumes one queue of its own,
``clustersearch.<node>``, so that the client routes each piece of work to the
node it chose. Start one with ``clustersearch worker --broker URL`` or, with
Celery's own command line::

    CLUSTERSEARCH_BROKER_URL=amqp://user:pass@broker// \\
        celery -A clustersearch.worker worker -Q clustersearch.pine1 -n pine1@%h -c 4

Nodes import only this module and what it needs (no estimator code of ours).
"""

import io
import os
import platform
import socket
import sys
import time
import traceback
from contextlib import redirect_stdout
from pathlib import Path
from urllib.parse import unquote, urlparse

from celery import Celery
from celery.worker.control import inspect_command

from . import __version__
from ._serialization import CONTENT_TYPE, SERIALIZER, loads
from ._transport import FILE_BACKEND, TRANSPORT

__all__ = ["QUEUE_PREFIX", "TASK_NAME", "app_config", "create_app", "queue_for"]

TASK_NAME = "clustersearch.run_batch"
QUEUE_PREFIX = "clustersearch."
INFO_COMMAND = "clustersearch_info"

# How often an idle node looks for new files on the embedded transport. Its
# default, 1 s, would add up to a second to every task's latency.
_FILESYSTEM_POLL_S = 0.005


def queue_for(node: str) -> str:
    """The name of the queue that node ``node`` consumes."""
    return QUEUE_PREFIX + node


def default_backend(broker_url: str) -> str:
    """The result backend used when none is given for ``broker_url``."""
    scheme = urlparse(broker_url).scheme
    if scheme == "filesystem":
        return "file://" + str(_filesystem_root(broker_url) / "results")
    if scheme in ("redis", "rediss"):
        return broker_url
    return "rpc://"


def _filesystem_root(broker_url: str) -> Path:
    path = unquote(urlparse(broker_url).path)
    if not path or path == "/":
        raise ValueError(
            f"broker {broker_url!r} names no folder: use "
            "'filesystem:///path/to/folder', a folder that the client and every "
            "node can read and write"
        )
    return Path(path)


def app_config(broker_url: str, backend_url: str | None = None) -> dict:
    """Celery settings shared by the client and the nodes.

    Task envelopes and remote control stay JSON; clustersearch's own tasks
    and results use its pickle-based content type, set per message.
    """
    backend_url = backend_url or default_backend(broker_url)
    conf = dict(
        broker_url=broker_url,
        result_backend=backend_url,
        task_serializer="json",
        result_serializer=SERIALIZER,
        accept_content=["json", CONTENT_TYPE],
        result_accept_content=["json", CONTENT_TYPE],
        # A fit is acknowledged when it starts, so that no broker timeout
        # (RabbitMQ's consumer_timeout, 30 min; Redis's visibility_timeout,
        # 1 h) ever redelivers a fit that is still running. The client, not
        # the broker, resends the work of a node that died (it watches the
        # nodes), and counts each fit once. A node holds no more than one
        # unstarted message per process: the client decides where work
        # goes, not the broker's prefetch.
        # The embedded transport is the exception: without an event loop a
        # node's main process blocks while it holds a started fit and an
        # unstarted one (billiard waits for a free process) and answers no
        # heartbeat or revoke, so there it takes a message only when a process
        # is free. That transport deletes a message once read: nothing to
        # redeliver either way.
        task_acks_late=urlparse(broker_url).scheme == "filesystem",
        worker_prefetch_multiplier=1,
        # A pool process that dies (OOM killer, SIGKILL) fails its fit only
        # after this wait for a result it might have sent (Celery's default,
        # 10 s, for each lost fit); a result travels in milliseconds.
        worker_lost_wait=1.0,
        task_create_missing_queues=True,
        broker_connection_retry_on_startup=True,
        result_expires=3600,
        worker_send_task_events=False,
        worker_redirect_stdouts=False,
    )
    if urlparse(broker_url).scheme == "filesystem":
        root = _filesystem_root(broker_url)
        messages, control = root / "messages", root / "control"
        for folder in (messages, control):
            folder.mkdir(parents=True, exist_ok=True)
        conf["broker_transport"] = TRANSPORT
        conf["broker_transport_options"] = {
            "data_folder_in": str(messages),
            "data_folder_out": str(messages),
            "control_folder": str(control),
            "polling_interval": _FILESYSTEM_POLL_S,
        }
    if urlparse(backend_url).scheme == "file":
        Path(unquote(urlparse(backend_url).path)).mkdir(parents=True, exist_ok=True)
        conf["result_backend"] = FILE_BACKEND + backend_url
    return conf


def create_app(broker_url: str, backend_url: str | None = None) -> Celery:
    """A Celery app for clustersearch on ``broker_url``, never the default app."""
    app = Celery("clustersearch", set_as_current=False)
    app.conf.update(app_config(broker_url, backend_url))
    app.task(name=TASK_NAME, bind=True, shared=False)(run_batch)
    return app


# -- What a node runs ---------------------------------------------------------

_thread_controller = None


def _cap_threads():
    """Cap BLAS/OpenMP threads so that the node's processes share its cores."""
    global _thread_controller
    from threadpoolctl import ThreadpoolController

    if _thread_controller is None:
        _thread_controller = ThreadpoolController()
    limit = int(os.environ.get("CLUSTERSEARCH_THREADS_PER_PROCESS", "1"))
    _thread_controller.limit(limits=limit)


class RemoteFailure:
    """An exception raised by a batch on a node, sent back as a value.

    Returning it (rather than letting Celery store a failure) keeps the
    original exception type, and its traceback as text.
    """

    def __init__(self, exc: BaseException, node: str):
        self.node = node
        self.traceback = "".join(traceback.format_exception(exc))
        try:
            from ._serialization import dumps

            loads(dumps(exc))
            self.exception = exc
        except Exception:
            # An exception that does not survive pickling is sent as its text.
            self.exception = RuntimeError(f"{type(exc).__name__}: {exc}")

    def exception_with_traceback(self) -> BaseException:
        from .exceptions import RemoteTraceback

        exc = self.exception
        exc.__cause__ = RemoteTraceback(
            f'Raised on node {self.node!r}:\n"""\n{self.traceback}"""'
        )
        return exc


def node_name(hostname: str | None) -> str:
    """The node name of a Celery worker hostname (``name@host``)."""
    return (hostname or socket.gethostname()).split("@", 1)[0]


def run_batch(task, payload: bytes):
    """Run one joblib batch of calls; return its results and where it ran.

    The payload is unpickled here, not by Celery, so that a payload which
    cannot be loaded on this node (a missing module, a version mismatch)
    comes back to the client as an error instead of a dropped message.
    """
    node = node_name(task.request.hostname)
    started = time.time()
    printed = io.StringIO()
    try:
        from joblib import parallel_config

        _cap_threads()
        batch = loads(payload)
        # One fit per process: joblib calls made inside a fit run
        # sequentially here (the node's processes already fill its cores).
        # What the fits print (scikit-learn's verbose lines) goes back to the
        # client, which prints it there.
        with parallel_config(backend="sequential"), redirect_stdout(printed):
            output = batch()
    except BaseException as exc:
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        output = RemoteFailure(exc, node)
    return {
        "output": output,
        "stdout": printed.getvalue(),
        "node": node,
        "pid": os.getpid(),
        "started": started,
        "finished": time.time(),
    }


def node_info(hostname: str | None, queues: list[str], concurrency: int) -> dict:
    """What a node says about itself when the client looks for nodes."""
    import joblib
    import numpy
    import sklearn

    return {
        "node": node_name(hostname),
        "hostname": hostname,
        "host": socket.gethostname(),
        "queues": queues,
        "concurrency": concurrency,
        "cpu_count": os.cpu_count(),
        "pid": os.getpid(),
        "versions": {
            "python": platform.python_version(),
            "clustersearch": __version__,
            "scikit-learn": sklearn.__version__,
            "numpy": numpy.__version__,
            "joblib": joblib.__version__,
            "celery": sys.modules["celery"].__version__,
        },
    }


@inspect_command(name=INFO_COMMAND)
def _clustersearch_info(state):
    consumer = state.consumer
    queues = [q.name for q in consumer.task_consumer.queues] if consumer.task_consumer else []
    return node_info(consumer.hostname, queues, consumer.pool.limit)


# ``celery -A clustersearch.worker worker`` looks up ``app`` here; it is built
# from the environment only then, never by importing this module.
def __getattr__(name):
    if name in ("app", "celery"):
        # ``celery -b URL`` sets CELERY_BROKER_URL before it looks up the app.
        broker = os.environ.get("CLUSTERSEARCH_BROKER_URL") or os.environ.get(
            "CELERY_BROKER_URL"
        )
        if not broker:
            raise AttributeError(
                "set CLUSTERSEARCH_BROKER_URL to the broker's URL before "
                "'celery -A clustersearch.worker worker'"
            )
        return create_app(broker, os.environ.get("CLUSTERSEARCH_RESULT_BACKEND"))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
