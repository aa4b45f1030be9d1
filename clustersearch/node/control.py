"""The remote-control command with which the client finds and watches nodes."""

from __future__ import annotations

import os
import socket
from typing import Any

from celery.worker.control import inspect_command

from ..wire.protocol import INFO_COMMAND, QUEUE_PREFIX, local_versions, node_name
from ..wire.signing import Signer
from .pool import pool_watch
from .settings import CONF_KEY

__all__ = ["node_info"]


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
        # Which secret the node holds (None: it accepts unsigned work).
        "secret": signer.fingerprint(),
    }


@inspect_command(name=INFO_COMMAND)
def _clustersearch_info(state: Any) -> dict[str, Any]:
    consumer = state.consumer
    settings = state.app.conf[CONF_KEY]
    queues = [q.name for q in consumer.task_consumer.queues] if consumer.task_consumer else []
    info = node_info(consumer.hostname, queues, consumer.pool.limit, Signer(settings.secret))
    info["stalled_s"] = pool_watch.stalled_s(consumer.pool.limit)
    # False once it stopped taking work from its queue (cancel_consumer): a
    # node that still answers but runs nothing is lost to the client.
    info["consuming"] = any(q.startswith(QUEUE_PREFIX) for q in queues)
    return info
