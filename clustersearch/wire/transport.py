"""The embedded transport: kombu's filesystem transport and Celery's file://
result backend, with atomic writes.

Both upstream classes write a message or a result in place. A reader that
polls at that moment takes a half-written file: kombu's consumer renames it
away and decodes an empty string (``JSONDecodeError``), Celery's result
reader unpickles a truncated result. Measured here: one fixture start in a
few dozen failed that way. Writing to a hidden temporary name and renaming
it into place (atomic on POSIX) closes both races.

Doorbells: upstream, a consumer looks for new files every
``polling_interval``. That costs an idle node a few percent of a core at
5 ms, and a message (or a freed process slot) waits up to that long to be
seen. Here each consumer also opens a named pipe per queue it consumes, in
the transport's ``bell_folder``; whoever writes a message for that queue
writes a byte to its pipe, and the consumer wakes at once. A result written
to the file:// backend rings the backend folder's pipe, which the client
listens to. Polling stays as the fallback (a queue with several consumers
wakes one of them; a folder shared between hosts carries no bytes from one
host to another; a system without named pipes has none).
"""

from __future__ import annotations

import logging
import mmap
import os
import select
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable
from queue import Empty
from time import monotonic
from typing import Any

from celery.backends.filesystem import FilesystemBackend as _CeleryFilesystemBackend
from celery.backends.rpc import RPCBackend as _CeleryRPCBackend
from celery.signals import worker_shutting_down
from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

__all__ = [
    "FILE_BACKEND", "RPC_BACKEND", "Bells", "FilesystemBackend", "RPCBackend", "Transport", "ring",
]  # fmt: skip

logger = logging.getLogger(__name__)

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


def _bell_path(folder: str, name: str) -> str | None:
    if not folder or not name or "/" in name or name in (".", "..") or len(name) > 200:
        return None
    return os.path.join(folder, name)


def ring(folder: str | None, name: str) -> None:
    """Wake whoever waits on the doorbell ``name`` in ``folder`` (see
    :class:`Bells`); nothing if nobody listens. Never raises."""
    path = _bell_path(folder or "", name)
    if path is None:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # no pipe (ENOENT), nobody reading it (ENXIO)
        return
    try:
        os.write(fd, b"\0")
    except OSError:  # full (EAGAIN): it has been rung already
        pass
    finally:
        os.close(fd)


class Bells:
    """The named pipes one process waits on (see the module's docstring).

    Each pipe is also held open for writing here, so that a ringer closing
    its end never leaves the pipe at end-of-file (which would wake every
    wait at once). ``ring_self`` wakes a wait from another thread of this
    process. Nothing is opened before the first :meth:`listen` or
    :meth:`wait`; :meth:`close` (or garbage collection) closes it all.
    """

    def __init__(self, folder: str | None) -> None:
        self.folder = folder if folder and hasattr(os, "mkfifo") else None
        self._lock = threading.Lock()
        self._fds: list[int] = []  # every descriptor held, for close()
        self._names: set[str] = set()
        self._poll: Any = None
        self._self_w: int | None = None
        self._closer = weakref.finalize(self, _close_all, self._fds)

    def _start(self) -> Any:
        with self._lock:
            if self._poll is None:
                r, w = os.pipe()
                os.set_blocking(r, False)
                os.set_blocking(w, False)
                self._fds += [r, w]
                poll = select.poll()
                poll.register(r, select.POLLIN)
                self._self_w, self._poll = w, poll
            return self._poll

    def listen(self, names: Iterable[str]) -> None:
        """Open the pipes of ``names`` not opened yet (each name once)."""
        for name in names:
            if name not in self._names:
                self._names.add(name)
                self._open(name)

    def _open(self, name: str) -> None:
        path = _bell_path(self.folder or "", name)
        if self.folder is None or path is None:
            return
        poll = self._start()
        try:
            os.makedirs(self.folder, exist_ok=True)
            try:
                os.mkfifo(path, 0o600)
            except FileExistsError:
                pass
            r = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            try:
                w = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                os.close(r)
                raise
        except OSError as exc:
            # A folder without named pipes: this queue is polled, as upstream.
            logger.debug("no doorbell for %r in %r: %s", name, self.folder, exc)
            return
        with self._lock:
            self._fds += [r, w]
        poll.register(r, select.POLLIN)

    def wait(self, timeout: float) -> bool:
        """Wait until rung or ``timeout`` seconds; whether it was rung."""
        ready = self._start().poll(max(0.0, timeout) * 1000)
        for fd, _ in ready:
            try:
                while os.read(fd, 4096):
                    pass
            except OSError:  # drained (EAGAIN), or closed meanwhile
                pass
        return bool(ready)

    def ring_self(self) -> None:
        """Wake this process's :meth:`wait` (from another thread)."""
        if self._self_w is None:
            return  # nobody has waited yet
        try:
            os.write(self._self_w, b"\0")
        except OSError:  # full: rung already; closed: nobody waits
            pass

    def close(self) -> None:
        with self._lock:
            self._poll, self._self_w = None, None
            self._names.clear()
            _close_all(self._fds)


def _close_all(fds: list[int]) -> None:
    while fds:
        try:
            os.close(fds.pop())
        except OSError:
            pass


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
        ring(self.transport_options.get("bell_folder"), queue)

    # A message acknowledged or rejected frees a prefetch slot: a consumer
    # waiting for one (a node whose process just finished a fit) looks again
    # at once instead of at its next poll.
    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
        super().basic_ack(delivery_tag, multiple)
        self.connection.bells.ring_self()

    def basic_reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        super().basic_reject(delivery_tag, requeue)
        self.connection.bells.ring_self()


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

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self.bells = Bells(client.transport_options.get("bell_folder"))

    def drain_events(self, connection: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        # Upstream's loop (kombu.transport.virtual.Transport.drain_events),
        # waiting on the doorbells between looks instead of sleeping.
        # This transport has no event loop: a node runs Celery's blocking
        # loop, which looks for a shutdown request (SIGTERM, SIGQUIT) only
        # between calls, and calls with a 2 s timeout: a node took that long
        # (more on a busy machine) to start its shutdown. Wait in slices,
        # and return once a shutdown is asked.
        deadline = None if timeout is None else monotonic() + timeout
        while True:
            self.bells.listen(q for ch in self.channels for q in ch._active_queues)
            # Set when the connection is established (kombu's typing says None).
            assert self.cycle is not None
            try:
                self.cycle.get(self._deliver, timeout=timeout)
                return None
            except Empty:
                pass
            now = monotonic()
            if _shutting_down or (deadline is not None and now >= deadline):
                raise TimeoutError()
            wait = min(self.polling_interval or 0.0, _DRAIN_SLICE_S)
            if deadline is not None:
                wait = min(wait, deadline - now)
            self.bells.wait(wait)

    def close_connection(self, connection: Any) -> None:
        super().close_connection(connection)
        self.bells.close()


# The doorbell of a file:// backend's folder (a hidden name: Celery's
# cleanup looks only at its own result files).
RESULTS_BELL = ".bell"


# A stored result this large is mapped, not read (see FilesystemBackend.get).
MAP_OVER = 1024 * 1024


class FilesystemBackend(_CeleryFilesystemBackend):
    def get(self, key: str | bytes) -> Any:
        # A forest's result is tens of MB: mapped read-only, the client
        # verifies and unpickles it where it lies (wire/codec.py decodes it
        # into views) instead of first copying it into a bytes object. The
        # mapping outlives the file, which the client deletes once read.
        try:
            with open(self._filename(key), "rb") as f:
                if os.fstat(f.fileno()).st_size < MAP_OVER:
                    return f.read()
                return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            return None

    def set(self, key: str | bytes, value: str | bytes) -> None:
        _write_atomically(self._filename(key), str_to_bytes(value))
        ring(os.fsdecode(self.path), RESULTS_BELL)

    def listen(self, callback: Callable[[], Any]) -> Callable[[], None]:
        """Call ``callback()`` (from a thread) whenever a result is stored
        in this folder, until the returned function is called. Results are
        still polled: this only says when to look."""
        bells = Bells(os.fsdecode(self.path))
        bells.listen([RESULTS_BELL])
        stopped = threading.Event()

        def run() -> None:
            try:
                while not stopped.is_set():
                    if bells.wait(0.5) and not stopped.is_set():
                        callback()
            finally:
                bells.close()

        def stop() -> None:
            stopped.set()
            bells.ring_self()

        threading.Thread(target=run, name="clustersearch-results-bell", daemon=True).start()
        return stop


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
