"""A node's blob cache: the data a task refers to, fetched once per node.

A node that meets a digest it does not hold asks the client for it
(:meth:`NodeCache.ensure`): it sends a request to the session's blob queue
and reads the chunks from a reply queue of its own, over the broker the
cluster already has. One process per node fetches (a file lock), the others
wait and find the file. Arrays are stored as ``.npy`` files in the node's
cache folder and memory-mapped read-only, so a node holds one copy in RAM
whatever its number of processes; arrays of Python objects are stored
pickled and loaded per process. The cache is bounded (least recently used
first out) and outlives searches: a second search on the same data sends no
data. A file that is missing or does not match its digest is fetched again.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import pickle
import time
import uuid
from collections.abc import Callable, Container, Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from kombu import Queue

from ..exceptions import BlobError
from ..wire.blobs import CHUNK_BYTES, DEFAULT_CACHE_BYTES, TAG, new_digest

if TYPE_CHECKING:
    import hashlib

__all__ = ["NodeCache"]

logger = logging.getLogger(__name__)

# A node gives up on a fetch when the client sends nothing for this long.
FETCH_TIMEOUT_S = 120.0


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _map_npy(f: IO[bytes]) -> np.ndarray:
    """Map the ``.npy`` file open as ``f``, read-only: pages shared by all
    processes of the node."""
    f.seek(0)
    version = np.lib.format.read_magic(f)
    read_header = (
        np.lib.format.read_array_header_1_0
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0
    )
    shape, fortran, dtype = read_header(f)
    if not shape or 0 in shape:
        return np.zeros(shape, dtype=dtype)
    mapped = np.memmap(
        f, dtype=dtype, mode="r", offset=f.tell(), shape=shape, order="F" if fortran else "C"
    )
    return np.asarray(mapped)


class NodeCache:
    """A node's blobs on disk, shared by its processes, least recently used out.

    Parameters
    ----------
    directory : path
    max_bytes : int
        The cache's bound; the blobs a task needs stay even above it.
    """

    def __init__(
        self, directory: str | os.PathLike[str], max_bytes: int = DEFAULT_CACHE_BYTES
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        # digest -> (file identity, object), this process
        self._open: dict[str, tuple[tuple[int, int, int, int], Any]] = {}

    def path(self, digest: str, kind: str) -> Path:
        return self.directory / f"{digest}.{kind}"

    # -- presence and integrity

    def _valid(self, digest: str, kind: str) -> bool:
        """Whether the file for ``digest`` is there and intact.

        A file is hashed once per process, and again whenever it changes
        (another inode, size or time). What is hashed is what is loaded: the
        same open file is mapped, so a file replaced in between is not used.
        """
        path = self.path(digest, kind)
        try:
            st = path.stat()
        except FileNotFoundError:
            self._open.pop(digest, None)
            return False
        known = self._open.get(digest)
        if known is not None and known[0] == _identity(st):
            self._touch(path, st)
            return True
        self._open.pop(digest, None)
        try:
            with open(path, "rb") as f:
                hasher = new_digest()
                data: list[bytes] | None = [] if kind == "pkl" else None
                while block := f.read(4 * CHUNK_BYTES):
                    hasher.update(block)
                    if data is not None:
                        data.append(block)
                if hasher.hexdigest() != digest:
                    logger.warning("blob %s is corrupted: fetching it again", digest)
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                    return False
                st = os.fstat(f.fileno())
                obj = _map_npy(f) if data is None else pickle.loads(b"".join(data))
        except FileNotFoundError:
            return False
        self._open[digest] = (_identity(st), obj)
        self._touch(path, st)
        return True

    @staticmethod
    def _touch(path: Path, st: os.stat_result) -> None:
        # Least recently used by access time, which we set ourselves.
        with contextlib.suppress(OSError):
            os.utime(path, ns=(time.time_ns(), st.st_mtime_ns))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.directory / ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def ensure(
        self,
        refs: Sequence[tuple[str, str]],
        source: str | None,
        connect: Callable[[], Any],
        node: str = "?",
    ) -> int:
        """Make sure every ``(digest, kind)`` in ``refs`` is here; fetch the rest.

        ``connect`` returns a new kombu connection to the cluster's broker;
        ``source`` is the client's blob queue. Returns the bytes fetched.
        """
        missing = [(d, k) for d, k in refs if not self._valid(d, k)]
        if not missing:
            return 0
        with self._locked():
            # Another process may have fetched them while we waited.
            missing = [(d, k) for d, k in missing if not self._valid(d, k)]
            if not missing:
                return 0
            if not source:
                raise BlobError("the task references data but names no client to fetch it from")
            fetched = self._fetch(dict(missing), source, connect, node)
            self._evict(keep={d for d, _ in refs})
        return fetched

    def _fetch(
        self, wanted: dict[str, str], source: str, connect: Callable[[], Any], node: str
    ) -> int:
        reply = f"clustersearch.reply.{uuid.uuid4().hex}"
        queue = Queue(reply, routing_key=reply, durable=False, auto_delete=True, expires=600)
        files: dict[str, tuple[Path, IO[bytes]]] = {}
        hashers: dict[str, hashlib.blake2b] = {}
        done: set[str] = set()
        errors: list[str] = []
        total = 0

        def on_chunk(message: Any) -> None:
            nonlocal total
            headers = message.headers or {}
            digest = headers.get("digest")
            message.ack()
            if digest not in wanted or digest in done:
                return
            if "error" in headers:
                errors.append(f"{digest}: {headers['error']}")
                done.add(digest)
                return
            if digest not in files:
                tmp = self.directory / f".{digest}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part"
                files[digest] = (tmp, open(tmp, "wb"))
                hashers[digest] = new_digest()
            body = message.body
            files[digest][1].write(body)
            hashers[digest].update(body)
            total += len(body)
            if headers["index"] + 1 == headers["count"]:
                tmp, f = files.pop(digest)
                f.close()
                if hashers[digest].hexdigest() != digest:
                    tmp.unlink()
                    errors.append(f"{digest}: arrived corrupted")
                else:
                    # Load what was verified, then publish it under its name.
                    self._open.pop(digest, None)
                    with open(tmp, "rb") as f:
                        if wanted[digest] == "npy":
                            obj = _map_npy(f)
                        else:
                            obj = pickle.load(f)
                        st = os.fstat(f.fileno())
                    os.replace(tmp, self.path(digest, wanted[digest]))
                    self._open[digest] = (_identity(st), obj)
                done.add(digest)

        try:
            with connect() as conn:
                channel = conn.default_channel
                queue = queue.bind(channel)
                queue.declare()
                with conn.Consumer(queue, on_message=on_chunk):
                    conn.Producer().publish(
                        {"digests": sorted(wanted), "reply_to": reply, "node": node},
                        routing_key=source, exchange="", serializer="json",
                        delivery_mode=1,
                    )  # fmt: skip
                    deadline = time.monotonic() + FETCH_TIMEOUT_S
                    while len(done) < len(wanted):
                        before = total + len(done)
                        try:
                            conn.drain_events(timeout=1.0)
                        except TimeoutError:
                            pass
                        now = time.monotonic()
                        if total + len(done) != before:
                            deadline = now + FETCH_TIMEOUT_S
                        elif now > deadline:
                            raise BlobError(
                                f"the client sent no data for {FETCH_TIMEOUT_S:.0f} s "
                                f"(queue {source}): is the search still running?"
                            )
                with contextlib.suppress(Exception):
                    queue.delete()
        finally:
            for tmp, f in files.values():
                f.close()
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        if errors:
            raise BlobError("could not fetch data from the client: " + "; ".join(errors))
        return total

    def _evict(self, keep: Container[str]) -> None:
        entries = []
        size = 0
        for entry in os.scandir(self.directory):
            if entry.name.startswith("."):
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            size += st.st_size
            entries.append((st.st_atime_ns, st.st_size, entry.path, entry.name.split(".")[0]))
        if size <= self.max_bytes:
            return
        for _, nbytes, path, digest in sorted(entries):
            if size <= self.max_bytes:
                break
            if digest in keep:
                continue
            # Processes that have it mapped keep their (unlinked) copy.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self._open.pop(digest, None)
            size -= nbytes

    # -- loading

    def load(self, digest: str, kind: str) -> Any:
        known = self._open.get(digest)
        if known is None:
            if not self._valid(digest, kind):
                raise BlobError(f"blob {digest} is not on this node")
            known = self._open[digest]
        return known[1]

    def loads(self, payload: bytes) -> Any:
        """Unpickle a task payload, resolving its references from the cache."""
        cache = self

        class _Unpickler(pickle.Unpickler):
            def persistent_load(self, pid: Any) -> Any:
                if isinstance(pid, tuple) and len(pid) == 3 and pid[0] == TAG:
                    return cache.load(pid[1], pid[2])
                raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")

        return _Unpickler(io.BytesIO(payload)).load()
