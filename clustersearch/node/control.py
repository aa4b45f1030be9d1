"""The remote-control command with which the client finds and watches nodes."""

from __future__ import annotations

import os
import socket
from typing import Any

from celery.worker.control import inspect_command

from .._compat import worker_task_counts
from ..wire.protocol import INFO_COMMAND, QUEUE_PREFIX, local_versions, node_name
from ..wire.signing import Signer
from .cache import NodeCache
from .memory import node_memory
from .pool import pool_watch
from .settings import CONF_KEY
from .stats import FitCounter
from .store import PartStore

__all__ = ["node_info", "sign_info"]


def node_info(
    hostname: str | None, queues: list[str], concurrency: int, signer: Signer
) -> dict[str, Any]:
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
        # Whether the node requires signed work. Which secret it holds is
        # proved by answering the client's challenge (sign_info), never told.
        "signed": signer.enabled,
    }


def sign_info(info: dict[str, Any], signer: Signer, nonce: Any) -> dict[str, Any]:
    """Add the answer to the client's challenge ``nonce``: an HMAC over the
    nonce and the whole reply (``Signer.prove``). Call it last: a field
    added after it is not covered and fails the client's check."""
    if signer.enabled and isinstance(nonce, str) and nonce:
        info["proof"] = signer.prove(nonce, info)
    return info


# Nodes whose earlier runs' fit counters this process has removed.
_counters_cleared: set[str] = set()


@inspect_command(
    name=INFO_COMMAND, args=[("nonce", str), ("memory", bool)], signature="[nonce] [memory]"
)
def _clustersearch_info(state: Any, nonce: Any = None, memory: Any = False) -> dict[str, Any]:
    consumer = state.consumer
    settings = state.app.conf[CONF_KEY]
    queues = [q.name for q in consumer.task_consumer.queues] if consumer.task_consumer else []
    signer = Signer(settings.secret)
    info = node_info(consumer.hostname, queues, consumer.pool.limit, signer)
    info["stalled_s"] = pool_watch.stalled_s(consumer.pool.limit)
    # False once it stopped taking work from its queue (cancel_consumer): a
    # node that still answers but runs nothing is lost to the client.
    info["consuming"] = any(q.startswith(QUEUE_PREFIX) for q in queues)
    # The forest parts it keeps (node/store.py): bytes on disk, and its bound.
    store = PartStore(settings.cache_dir, settings.store_bytes, info["node"])
    info["store_bytes"] = store.nbytes()
    info["store_limit"] = settings.store_bytes
    # For `clustersearch top`: tasks running and waiting in this node, the
    # fits its pool processes finished since it started (node/stats.py), and
    # its data cache.
    info["running"], info["queued"] = worker_task_counts()
    counter = FitCounter(settings.cache_dir, info["node"], os.getpid())
    if info["node"] not in _counters_cleared:
        counter.forget_others()
        _counters_cleared.add(info["node"])
    info["fits_done"], info["mean_fit_s"] = counter.read()
    info["cache_bytes"] = NodeCache(settings.cache_dir, settings.cache_bytes).nbytes()
    info["cache_limit"] = settings.cache_bytes
    if memory is True:
        # Only when asked (`clustersearch nodes`): reading every process's
        # smaps takes tens of milliseconds, too long for each heartbeat.
        info["memory_pss"], info["memory_data"] = node_memory(settings.cache_dir)
    # Signed last: the proof covers every field above.
    return sign_info(info, signer, nonce)
