"""The Celery configuration the client and the nodes share.

Celery never decodes a pickle: task envelopes and remote control travel as
JSON, results in clustersearch's binary frames (:mod:`.codec`: JSON around
raw bytes). clustersearch's payloads travel as bytes inside them and are
unpickled by clustersearch itself, after verification when a secret is set
(see :mod:`.signing`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from celery import Celery

from . import codec
from .transport import FILE_BACKEND, RPC_BACKEND, TRANSPORT

__all__ = [
    "app_config", "compresses_results", "create_app", "default_backend", "filesystem_root",
    "is_embedded",
]  # fmt: skip

# How often a consumer on the embedded transport looks for new files when
# no doorbell rang (wire/transport.py: a message for its queue rings one).
# Upstream's default, 1 s, would add up to a second to a task's latency
# where doorbells do not reach (a folder shared between hosts); 5 ms,
# before doorbells, cost each idle node 2.6% of a core.
FILESYSTEM_POLL_S = 0.025


def is_embedded(broker_url: str) -> bool:
    """Whether ``broker_url`` is the embedded (filesystem) transport."""
    return urlparse(broker_url).scheme == "filesystem"


def default_backend(broker_url: str) -> str:
    """The result backend used when none is given for ``broker_url``."""
    scheme = urlparse(broker_url).scheme
    if scheme == "filesystem":
        return "file://" + str(filesystem_root(broker_url) / "results")
    if scheme in ("redis", "rediss"):
        return broker_url
    return "rpc://"


def filesystem_root(broker_url: str) -> Path:
    """The folder of a ``filesystem://`` broker."""
    path = unquote(urlparse(broker_url).path)
    if not path or path == "/":
        raise ValueError(
            f"broker {broker_url!r} names no folder: use "
            "'filesystem:///path/to/folder', a folder that the client and every "
            "node can read and write"
        )
    return Path(path)


def app_config(broker_url: str, backend_url: str | None = None) -> dict[str, Any]:
    """Celery settings shared by the client and the nodes."""
    backend_url = backend_url or default_backend(broker_url)
    embedded = is_embedded(broker_url)
    conf: dict[str, Any] = dict(
        broker_url=broker_url,
        result_backend=backend_url,
        task_serializer="json",
        # Results in binary frames (no base64); JSON accepted too (a node
        # of an older version; forged ones are refused by their signature).
        result_serializer=codec.NAME,
        accept_content=["json"],
        result_accept_content=["json", codec.CONTENT_TYPE],
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
        task_acks_late=embedded,
        worker_prefetch_multiplier=1,
        task_create_missing_queues=True,
        broker_connection_retry_on_startup=True,
        result_expires=3600,
        worker_send_task_events=False,
        worker_redirect_stdouts=False,
    )
    if embedded:
        root = filesystem_root(broker_url)
        messages, control = root / "messages", root / "control"
        for folder in (messages, control):
            folder.mkdir(parents=True, exist_ok=True)
        conf["broker_transport"] = TRANSPORT
        conf["broker_transport_options"] = {
            "data_folder_in": str(messages),
            "data_folder_out": str(messages),
            "control_folder": str(control),
            "polling_interval": FILESYSTEM_POLL_S,
            "bell_folder": str(root / "bells"),
        }
    scheme = urlparse(backend_url).scheme
    if scheme == "file":
        Path(unquote(urlparse(backend_url).path)).mkdir(parents=True, exist_ok=True)
        conf["result_backend"] = FILE_BACKEND + backend_url
    elif scheme == "rpc":
        conf["result_backend"] = RPC_BACKEND + backend_url
    return conf


def compresses_results(conf: Any) -> bool:
    """Whether a node with Celery configuration ``conf`` compresses large
    results. Not over the embedded transport's file:// results: client and
    nodes share one machine there, where writing and reading a file costs a
    tenth of zlib's time (a 100-tree Adult forest: 91 MB written in 0.11 s,
    read in 0.05 s; compressing it 0.9 s, decompressing 0.4 s). Everywhere
    else results cross a network (100 Mbit/s on the original boards) and a
    broker's message limit, and zlib shrinks trees 5x."""
    backend = str(conf.get("result_backend") or "")
    return not backend.startswith(FILE_BACKEND)


def create_app(broker_url: str, backend_url: str | None = None) -> Celery:
    """A Celery app for clustersearch on ``broker_url``, never the default app."""
    app = Celery("clustersearch", set_as_current=False)
    app.conf.update(app_config(broker_url, backend_url))
    return app
