"""The task every node runs: verify a batch, fetch its data, fit, sign."""

from __future__ import annotations

import io
import logging
import os
import time
import warnings
from collections import Counter
from contextlib import redirect_stdout
from dataclasses import dataclass
from typing import Any, NoReturn

from billiard.einfo import ExceptionInfo, ExceptionWithTraceback
from celery.worker.request import Request

from .._compat import WorkerLostError
from ..exceptions import MessageRejected
from ..wire.config import compresses_results
from ..wire.context import node_task
from ..wire.protocol import RemoteFailure, StoreCall, node_name
from ..wire.serialization import COMPRESS_OVER, dumps_chunks
from ..wire.signing import Signer
from .cache import NodeCache
from .guard import fit_guard
from .settings import CONF_KEY, NodeSettings
from .stats import FitCounter
from .store import PartStore

__all__ = ["SignedLostRequest", "run_batch"]

logger = logging.getLogger(__name__)


@dataclass
class _Runtime:
    """What one process of a node builds once from the node's settings."""

    settings: NodeSettings
    cache: NodeCache
    signer: Signer
    threads: Any = None

    def cap_threads(self) -> None:
        """Cap BLAS/OpenMP threads so that the node's processes share its cores."""
        if self.threads is None:
            from threadpoolctl import ThreadpoolController

            self.threads = ThreadpoolController()
        self.threads.limit(limits=self.settings.threads_per_process)


_runtime: _Runtime | None = None


def runtime(app: Any) -> _Runtime:
    """This process's cache and signer, from the app's NodeSettings."""
    global _runtime
    settings = app.conf[CONF_KEY]
    if _runtime is None or _runtime.settings is not settings:
        _runtime = _Runtime(
            settings,
            NodeCache(settings.cache_dir, settings.cache_bytes),
            Signer(settings.secret, max_age=settings.max_age_s),
        )
    return _runtime


def _reject(task_id: str, node: str, why: str) -> NoReturn:
    logger.error("node %s rejected task %s, nothing in it was run: %s", node, task_id, why)
    raise MessageRejected(f"node {node!r} rejected the task: {why}")


def _claim(cache: NodeCache, task_id: str) -> bool:
    """Mark ``task_id`` as run here, atomically, before it runs: False when
    it already was (a replayed message), even by another process of this
    node at the same moment."""
    folder = cache.directory / ".seen"
    folder.mkdir(exist_ok=True)
    if not task_id or "/" in task_id or task_id.startswith("."):
        return False
    try:
        os.close(os.open(folder / task_id, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    return True


def _blob_refs(blobs: Any) -> list[tuple[str, str, int]] | None:
    """The task's ``(digest, kind, nbytes)`` references, or None if malformed."""
    try:
        refs = [(str(d), str(k), n) for d, k, n in blobs]
    except (TypeError, ValueError):
        return None
    if any(type(n) is not int or n < 0 for _, _, n in refs):
        return None
    return refs


def _warnings_raised(caught: list[warnings.WarningMessage]) -> list[tuple[str, str, str, int]]:
    """``(category module, category name, message, count)`` of each distinct
    warning the fits raised.

    The fits run under the client's warning filters (scikit-learn's
    ``delayed`` carries them), so what is recorded here is what a local
    search would have shown. Categories travel by name: the client looks
    them up (:func:`clustersearch.wire.protocol.warning_category`).
    """
    counts: Counter[tuple[str, str, str]] = Counter()
    for w in caught:
        category = w.category
        counts[category.__module__, category.__qualname__, str(w.message)] += 1
    return [(module, name, message, n) for (module, name, message), n in counts.items()]


def _count_fits(here: _Runtime, node: str, batch: Any, seconds: float) -> None:
    """Add a finished batch's fits to the node's count (``clustersearch top``)."""
    try:
        fits = len(batch)
    except TypeError:
        fits = 1
    try:
        # The pool's parent is the node's main process, which reports the count.
        FitCounter(here.settings.cache_dir, node, os.getppid()).add(fits, seconds)
    except OSError as exc:  # a statistic: never the fit's failure
        logger.warning("node %s could not count its fits: %s", node, exc)


def run_batch(
    task: Any, payload: Any, source: Any = None, blobs: Any = (), auth: Any = None
) -> dict[str, Any]:
    """Run one joblib batch of calls; return its results and where it ran.

    ``payload`` is the pickled batch. It is verified (with a secret) and
    unpickled here, not by Celery: a payload that fails verification is
    refused unread, and one that cannot be loaded on this node (a missing
    module, a version mismatch) comes back to the client as an error instead
    of a dropped message. ``blobs`` lists the ``(digest, kind, nbytes)`` of the
    arrays the payload refers to; those the node lacks are fetched from the
    client's queue ``source`` first.

    Returns ``{"payload": pickled result, "auth": signature}``.
    """
    node = node_name(task.request.hostname)
    task_id = task.request.id or ""
    here = runtime(task.app)
    signer = here.signer
    if not isinstance(payload, bytes):
        _reject(task_id, node, f"the payload is {type(payload).__name__}, not bytes")
    limit = here.settings.max_payload
    if len(payload) > limit:
        _reject(task_id, node, f"a {len(payload)}-byte payload is over the "
                f"{limit}-byte limit (--max-payload)")  # fmt: skip
    refs = _blob_refs(blobs)
    if refs is None:
        _reject(task_id, node, "malformed list of data references")
    # Signed for this node: another node refuses it.
    context = [source, [list(r) for r in refs], node]
    try:
        signer.verify("task", task_id, payload, auth, context)
    except MessageRejected as exc:
        _reject(task_id, node, str(exc))
    if signer.enabled and not _claim(here.cache, task_id):
        _reject(task_id, node, "this task id already ran here (a replayed message)")

    started = time.time()
    printed = io.StringIO()
    caught: list[warnings.WarningMessage] = []
    fetched = 0
    try:
        from joblib import parallel_config

        here.cap_threads()
        fetched = here.cache.ensure(refs, source, task.app.connection_for_write, node, signer)
        batch = here.cache.loads(payload)
        # One fit per process: joblib calls made inside a fit run
        # sequentially here (the node's processes already fill its cores).
        # What the fits print (scikit-learn's verbose lines) goes back to the
        # client, which prints it there. Our estimators inside a fit see
        # node_task() and fit as plain scikit-learn: no nested dispatch.
        with (
            fit_guard.fit(task_id, here.cache.directory),
            parallel_config(backend="sequential"),
            node_task(),
        ):
            with redirect_stdout(printed), warnings.catch_warnings(record=True) as caught:
                if isinstance(batch, StoreCall):
                    # A request to this node's store of forest parts.
                    store = PartStore(here.settings.cache_dir, here.settings.store_bytes, node)
                    output = store.run(batch)
                else:
                    began = time.monotonic()
                    output = batch()
                    _count_fits(here, node, batch, time.monotonic() - began)
    except BaseException as exc:
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        output = RemoteFailure(exc, node)
    result = {
        "output": output,
        "stdout": printed.getvalue(),
        "warnings": _warnings_raised(caught),
        "node": node,
        "pid": os.getpid(),
        "fetched": fetched,
        "started": started,
        "finished": time.time(),
    }
    try:
        compress = COMPRESS_OVER if compresses_results(task.app.conf) else None
        data = dumps_chunks(result, compress_over=compress)
    except Exception as exc:
        result["output"] = RemoteFailure(exc, node)
        data = dumps_chunks(result)
    return {"payload": data, "auth": signer.sign("result", task_id, data)}


class SignedLostRequest(Request):
    """Celery's request, with the worker-lost failure signed.

    When a pool process dies running a task, the node's main process (not
    the dead one) stores a ``WorkerLostError`` FAILURE for it, and the client
    retries the work. Anyone who can publish to the result backend could
    send that FAILURE too; so, with a secret, the node adds a signature
    over the task id, its own name and the message as the error's second
    argument (``Signer.sign("lost", ...)``), and the client retries only a
    worker-lost that verifies (``client/dispatch.py``).
    """

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> Any:
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        if isinstance(exc, WorkerLostError):
            exc_info = self._signed_lost(exc)
        return super().on_failure(exc_info, send_failed_event, return_ok)

    def _worker_lost_info(self, exc: BaseException) -> Any:
        # Celery's own path for a process that reported its exit (SystemExit)
        # before it ended: the WorkerLostError it makes, signed.
        info = super()._worker_lost_info(exc)
        return self._signed_lost(info.exception)

    def _signed_lost(self, exc: BaseException) -> Any:
        signer = Signer(self.task.app.conf[CONF_KEY].secret)
        what = str(exc.args[0]) if exc.args else "the worker process died"
        if signer.enabled:
            node = node_name(self.hostname)
            exc = WorkerLostError(what, signer.sign("lost", self.id, what.encode(), node))
        try:
            raise exc
        except WorkerLostError:
            return ExceptionInfo()
