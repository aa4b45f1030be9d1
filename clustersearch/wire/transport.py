"""The embedded transport: kombu's filesystem transport and Celery's file://
result backend, with atomic writes.

Both upstream classes write a message or a result in place. A reader that
polls at that moment takes a half-written file: kombu's consumer renames it
away and decodes an empty string (``JSONDecodeError``), Celery's result
reader unpickles a truncated result. Measured here: one fixture start in a
few dozen failed that way. Writing to a hidden temporary name and renaming
it into place (atomic on POSIX) closes both races.
"""

from __future__ import annotations

import os
import uuid
import weakref
from time import monotonic
from typing import Any

from celery.backends.filesystem import FilesystemBackend as _CeleryFilesystemBackend
from celery.backends.rpc import RPCBackend as _CeleryRPCBackend
from celery.signals import worker_shutting_down
from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

__all__ = ["FILE_BACKEND", "RPC_BACKEND", "FilesystemBackend", "RPCBackend", "Transport"]

TRANSPORT = "clustersearch.wire.transport:Transport"
# Celery's ``backend+url`` form: this class, on a file:// URL.
FILE_BACKEND = "clustersearch.wire.transport:FilesystemBackend+"


def _write_atomically(path: str | bytes | os.PathLike[str], data: bytes) -> None:
    folder, name = os.path.split(os.fsdecode(path))
    # A leading dot: kombu's consumer matches '<anything>.<queue>.msg' only.
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class Channel(filesystem.Channel):
    # kombu.transport.filesystem.Channel._put's own signature, which names its
    # second parameter unlike the abstract channel's.
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        filename = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        path = os.path.join(self.data_folder_out, filename)
        try:
            _write_atomically(path, str_to_bytes(dumps(payload)))
        except OSError as exc:
            raise ChannelError(f"Cannot add file {path!r} to directory") from exc


# Set in a node's main process when it is asked to shut down.
_shutting_down: list[Any] = []


def _on_shutting_down(**kwargs: Any) -> None:
    # Celery's signal handler calls this: no locks, no threads.
    _shutting_down.append(kwargs.get("how"))


worker_shutting_down.connect(_on_shutting_down, weak=False, dispatch_uid=__name__)

# The longest a node's loop waits before it looks for a shutdown request.
_DRAIN_SLICE_S = 0.1


class Transport(filesystem.Transport):
    Channel = Channel

    def drain_events(self, connection: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        # This transport has no event loop: a node runs Celery's blocking
        # loop, which looks for a shutdown request (SIGTERM, SIGQUIT) only
        # between calls, and calls with a 2 s timeout: a node took that long
        # (more on a busy machine) to start its shutdown. Wait in slices,
        # and return once a shutdown is asked.
        deadline = None if timeout is None else monotonic() + timeout
        while True:
            left = _DRAIN_SLICE_S if deadline is None else deadline - monotonic()
            try:
                return super().drain_events(
                    connection, timeout=max(0.0, min(_DRAIN_SLICE_S, left)), **kwargs
                )
            except TimeoutError:
                if _shutting_down or (deadline is not None and monotonic() >= deadline):
                    raise


class FilesystemBackend(_CeleryFilesystemBackend):
    def set(self, key: str | bytes, value: str | bytes) -> None:
        _write_atomically(self._filename(key), str_to_bytes(value))


# Celery's ``backend+url`` form for rpc:// URLs.
RPC_BACKEND = "clustersearch.wire.transport:RPCBackend+"


class RPCBackend(_CeleryRPCBackend):
    """Celery's rpc:// backend, declaring its reply queue once per channel.

    Upstream declares the client's reply queue before every task it sends
    (the queue is auto-delete, so kombu does not cache the declaration): a
    synchronous round trip to RabbitMQ per task. The queue lives as long as
    the client consumes from it, which it does while it has work out; a new
    channel (after a reconnect) declares it again.
    """

    _declared_on: weakref.ref[Any] | None = None

    def on_task_call(self, producer: Any, task_id: str) -> None:
        channel = producer.channel
        if self._declared_on is not None and self._declared_on() is channel:
            return
        super().on_task_call(producer, task_id)
        self._declared_on = weakref.ref(channel)
