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
import logging
import os
import platform
import signal
import socket
import sys
import threading
import time
import traceback
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from urllib.parse import unquote, urlparse

from celery import Celery
from celery.concurrency import asynpool, prefork
from celery.signals import worker_process_init
from celery.worker.control import inspect_command

from . import __version__
from ._serialization import dumps, loads
from ._signing import DEFAULT_MAX_AGE_S, MessageRejected, Signer, load_secret
from ._transport import FILE_BACKEND, RPC_BACKEND, TRANSPORT

__all__ = [
    "QUEUE_PREFIX", "STOP_SIGNAL", "TASK_NAME", "app_config", "create_app", "queue_for",
]  # fmt: skip

logger = logging.getLogger(__name__)

TASK_NAME = "clustersearch.run_batch"
QUEUE_PREFIX = "clustersearch."
INFO_COMMAND = "clustersearch_info"
# The signal with which the client stops the fits of a search it gave up
# (``revoke(terminate=True, signal=STOP_SIGNAL)``); see ``_FitGuard``.
STOP_SIGNAL = "SIGUSR2"

# How often an idle node looks for new files on the embedded transport. Its
# default, 1 s, would add up to a second to every task's latency.
_FILESYSTEM_POLL_S = 0.005


# How often a node's pool looks for pool processes that died (Celery: 5 s).
POOL_CHECK_S = 0.5


class _AsynPool(asynpool.AsynPool):
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
    def timers(self):
        return {self.maintain_pool: POOL_CHECK_S}


class TaskPool(prefork.TaskPool):
    """Celery's prefork pool (``--pool prefork``) with a faster check for
    dead processes; nodes use it through the ``worker_pool`` setting."""

    Pool = _AsynPool


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

    Celery decodes JSON only, never a pickle: task envelopes, results and
    remote control. clustersearch's payloads travel as bytes inside the JSON
    and are unpickled by clustersearch itself, after verification when a
    secret is set (see ``_signing``).
    """
    backend_url = backend_url or default_backend(broker_url)
    conf = dict(
        broker_url=broker_url,
        result_backend=backend_url,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
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
        # The embedded transport's blocking pool fails the fit of a pool
        # process that died (OOM killer, SIGKILL) only after this wait for a
        # result it might have sent (Celery's default, 10 s, for each lost
        # fit); a result travels in milliseconds. The event-loop pool of the
        # other transports fails it as soon as it reaps the process, which
        # TaskPool looks for every POOL_CHECK_S.
        worker_lost_wait=1.0,
        worker_pool=f"{__name__}:TaskPool",
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
    elif urlparse(backend_url).scheme == "rpc":
        conf["result_backend"] = RPC_BACKEND + backend_url
    return conf


def create_app(broker_url: str, backend_url: str | None = None) -> Celery:
    """A Celery app for clustersearch on ``broker_url``, never the default app."""
    app = Celery("clustersearch", set_as_current=False)
    app.conf.update(app_config(broker_url, backend_url))
    app.task(name=TASK_NAME, bind=True, shared=False)(run_batch)
    worker_process_init.connect(_guard_fits, weak=False, dispatch_uid=STOP_SIGNAL)
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


class _FitGuard:
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

    def __init__(self):
        self.lock = threading.Lock()
        self.running = False
        self.pid = None

    def install(self):
        if self.pid == os.getpid():
            return
        self.pid = os.getpid()
        signum = getattr(signal, STOP_SIGNAL)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signum})
        threading.Thread(
            target=self._take, args=(signum,), name="clustersearch-stop", daemon=True
        ).start()

    def _take(self, signum):
        while True:
            signal.sigwait({signum})
            with self.lock:
                if self.running:
                    os.kill(os.getpid(), signal.SIGKILL)

    @contextmanager
    def fit(self):
        with self.lock:
            self.running = True
        try:
            yield
        finally:
            with self.lock:
                self.running = False


_fit_guard = _FitGuard()


def _guard_fits(**kwargs):
    _fit_guard.install()


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


_node_cache = None
_node_signer = None

# A task message carries references to the data, not the data: anything
# bigger is not ours (and is refused before it is looked at).
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024


def _max_payload():
    from ._blobs import parse_size

    return parse_size(os.environ.get("CLUSTERSEARCH_MAX_PAYLOAD") or MAX_PAYLOAD_BYTES)


def node_cache():
    """This process's view of the node's blob cache (see ``_blobs``)."""
    global _node_cache
    if _node_cache is None:
        from ._blobs import NodeCache

        _node_cache = NodeCache.from_environ()
    return _node_cache


def node_signer() -> Signer:
    """The node's signer, from ``$CLUSTERSEARCH_SECRET`` (the CLI sets it)."""
    global _node_signer
    if _node_signer is None:
        max_age = float(os.environ.get("CLUSTERSEARCH_MAX_AGE_S", DEFAULT_MAX_AGE_S))
        _node_signer = Signer(load_secret(), max_age=max_age)
    return _node_signer


def _reject(task_id, node, why):
    logger.error("node %s rejected task %s, nothing in it was run: %s", node, task_id, why)
    raise MessageRejected(f"node {node!r} rejected the task: {why}")


def _seen_marker(task_id):
    folder = node_cache().directory / ".seen"
    folder.mkdir(exist_ok=True)
    if not task_id or "/" in task_id or task_id.startswith("."):
        return None
    return folder / task_id


def run_batch(task, payload, source=None, blobs=(), auth=None):
    """Run one joblib batch of calls; return its results and where it ran.

    ``payload`` is the pickled batch. It is verified (with a secret) and
    unpickled here, not by Celery: a payload that fails verification is
    refused unread, and one that cannot be loaded on this node (a missing
    module, a version mismatch) comes back to the client as an error instead
    of a dropped message. ``blobs`` lists the ``(digest, kind)`` of the
    arrays the payload refers to; those the node lacks are fetched from the
    client's queue ``source`` first.

    Returns ``{"payload": pickled result, "auth": signature}``.
    """
    node = node_name(task.request.hostname)
    task_id = task.request.id or ""
    signer = node_signer()
    if not isinstance(payload, bytes):
        _reject(task_id, node, f"the payload is {type(payload).__name__}, not bytes")
    limit = _max_payload()
    if len(payload) > limit:
        _reject(task_id, node, f"a {len(payload)}-byte payload is over the "
                f"{limit}-byte limit ($CLUSTERSEARCH_MAX_PAYLOAD)")  # fmt: skip
    try:
        refs = [(str(d), str(k)) for d, k in blobs]
    except (TypeError, ValueError):
        _reject(task_id, node, "malformed list of data references")
    context = [source, [list(r) for r in refs]]
    try:
        signer.verify("task", task_id, payload, auth, context)
    except MessageRejected as exc:
        _reject(task_id, node, str(exc))
    marker = _seen_marker(task_id) if signer.enabled else None
    if marker is not None and marker.exists():
        _reject(task_id, node, "this task id already ran here (a replayed message)")

    started = time.time()
    printed = io.StringIO()
    fetched = 0
    try:
        from joblib import parallel_config

        _cap_threads()
        cache = node_cache()
        fetched = cache.ensure(refs, source, task.app.connection_for_write, node)
        batch = cache.loads(payload)
        # One fit per process: joblib calls made inside a fit run
        # sequentially here (the node's processes already fill its cores).
        # What the fits print (scikit-learn's verbose lines) goes back to the
        # client, which prints it there.
        with _fit_guard.fit(), parallel_config(backend="sequential"):
            with redirect_stdout(printed):
                output = batch()
    except BaseException as exc:
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        output = RemoteFailure(exc, node)
    result = {
        "output": output,
        "stdout": printed.getvalue(),
        "node": node,
        "pid": os.getpid(),
        "fetched": fetched,
        "started": started,
        "finished": time.time(),
    }
    try:
        data = dumps(result)
    except Exception as exc:
        result["output"] = RemoteFailure(exc, node)
        data = dumps(result)
    if marker is not None:
        marker.touch()
    return {"payload": data, "auth": signer.sign("result", task_id, data)}


def local_versions() -> dict:
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
        "celery": sys.modules["celery"].__version__,
        "cloudpickle": cloudpickle.__version__,
    }


def node_info(hostname: str | None, queues: list[str], concurrency: int) -> dict:
    """What a node says about itself when the client looks for nodes."""
    return {
        "node": node_name(hostname),
        "hostname": hostname,
        "host": socket.gethostname(),
        "queues": queues,
        "concurrency": concurrency,
        "cpu_count": os.cpu_count(),
        "pid": os.getpid(),
        "versions": local_versions(),
        # Which secret the node holds (None: it accepts unsigned work).
        "secret": node_signer().fingerprint(),
    }


class _PoolWatch:
    """How long a node's pool has started nothing while it could.

    A node whose pool is stuck (a pool process frozen before it took its
    task, or one that died holding a lock of the pool, as SIGTERM could do on
    the embedded transport) still answers heartbeats from its main process,
    so it does not look lost, yet its work never starts. Each heartbeat
    reports for how long, at every heartbeat since, a task has waited while
    a pool process was free and no task has started; the client takes work
    away from a node stalled as long as it would from a silent one.
    """

    def __init__(self):
        self._since = None
        self._started = None

    def stalled_s(self, limit: int) -> float:
        from celery.worker import state

        waiting = any(r.time_start is None for r in list(state.reserved_requests))
        running = len(state.active_requests)
        started = state.all_total_count[0]
        now = time.monotonic()
        if not waiting or running >= limit:
            self._since = None
            return 0.0
        if self._since is None or started != self._started:
            self._since, self._started = now, started
        return now - self._since


_pool_watch = _PoolWatch()


@inspect_command(name=INFO_COMMAND)
def _clustersearch_info(state):
    consumer = state.consumer
    queues = [q.name for q in consumer.task_consumer.queues] if consumer.task_consumer else []
    info = node_info(consumer.hostname, queues, consumer.pool.limit)
    info["stalled_s"] = _pool_watch.stalled_s(consumer.pool.limit)
    return info


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
