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
from collections import Counter
from collections.abc import Container, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from kombu import Queue

from ..exceptions import BlobError, MessageRejected
from ..wire.blobs import (
    CHUNK_BYTES,
    DEFAULT_CACHE_BYTES,
    TAG,
    chunk_bytes,
    chunk_count,
    new_digest,
    reply_queue,
)

if TYPE_CHECKING:
    pass

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


@contextlib.contextmanager
def folder_lock(directory: Path) -> Iterator[None]:
    """Hold ``directory``'s lock (its ``.lock`` file, flock): one process of
    the node at a time in the block (the cache's and the store's writers)."""
    with open(directory / ".lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


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

    def nbytes(self) -> int:
        """Bytes the cached blobs take on disk (the store and the node's
        bookkeeping, in dot-folders, aside)."""
        size = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.directory):
                if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    size += entry.stat().st_size
        return size

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

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        return folder_lock(self.directory)

    def ensure(self, refs, source, connect, node="?", signer=None):
        """Make sure every ``(digest, kind, nbytes)`` in ``refs`` is here; fetch the rest.

        ``connect`` returns a new kombu connection to the cluster's broker;
        ``source`` is the client's blob queue. With ``signer`` (a Signer
        holding a secret) every chunk must carry the client's HMAC. Returns
        the bytes fetched.
        """
        missing = [(d, k, n) for d, k, n in refs if not self._valid(d, k)]
        if not missing:
            return 0
        with self._locked():
            # Another process may have fetched them while we waited.
            missing = [(d, k, n) for d, k, n in missing if not self._valid(d, k)]
            if not missing:
                return 0
            if not source:
                raise BlobError("the task references data but names no client to fetch it from")
            wanted = {d: (k, n) for d, k, n in missing}
            fetched = _Fetch(self, wanted, node, signer).run(source, connect)
            self._evict(keep={d for d, _, _ in refs})
        return fetched

    def _publish(self, digest, kind, tmp):
        """Load the verified file ``tmp``, then publish it under its name."""
        self._open.pop(digest, None)
        with open(tmp, "rb") as f:
            obj = _map_npy(f) if kind == "npy" else pickle.load(f)
            st = os.fstat(f.fileno())
        os.replace(tmp, self.path(digest, kind))
        self._open[digest] = (_identity(st), obj)

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


class _Fetch:
    """One fetch of missing blobs over a reply queue of the node's own.

    Anyone who can publish to the broker can publish to that queue: a chunk
    is taken only if it is the next one of a blob this fetch asked for, of
    the size its signed reference implies (``wire.blobs.chunk_bytes``);
    anything else is dropped and logged. So the bytes written never exceed
    the declared sizes, and junk does not keep the fetch alive (only a chunk
    taken resets its timeout). With a secret each chunk must also carry the
    client's HMAC (over the digest, its index and its bytes). A blob whose chunks fit but whose digest does
    not (junk of the right size got in first) is asked for again, up to
    ``MAX_TRIES`` times. An error the client sends fails the blob unless its
    data arrives within ``ERROR_GRACE_S`` (it could be forged too).
    """

    MAX_TRIES = 3
    ERROR_GRACE_S = 5.0

    def __init__(self, cache, wanted, node, signer=None):
        self.cache, self.wanted, self.node = cache, wanted, node
        self.signer = signer if signer is not None and signer.enabled else None
        self.reply = reply_queue(node)
        self.files, self.hashers, self.next = {}, {}, {}
        self.done, self.failed, self.errors = set(), {}, {}
        self.tries = Counter({d: 1 for d in wanted})
        self.again = []
        self.dropped: Counter[str] = Counter()
        self.total = 0
        self.progress = 0

    def _drop(self, why):
        self.dropped[why] += 1
        if self.dropped[why] <= 3:
            logger.warning("node %s dropped a data chunk that is not the client's: %s",
                           self.node, why)  # fmt: skip

    def on_chunk(self, message):
        message.ack()
        headers = message.headers if isinstance(message.headers, dict) else {}
        digest = headers.get("digest")
        if not isinstance(digest, str) or digest not in self.wanted:
            return self._drop("no header naming a blob this node asked for")
        if digest in self.done or digest in self.failed:
            return None
        kind, nbytes = self.wanted[digest]
        if "error" in headers:
            self.errors.setdefault(digest, (time.monotonic(), str(headers["error"])[:200]))
            return None
        index, count, body = headers.get("index"), headers.get("count"), message.body
        if type(index) is not int or type(count) is not int or headers.get("kind") != kind:
            return self._drop("malformed headers")
        if count != chunk_count(nbytes):
            return self._drop(f"{count} chunks claimed for a {nbytes}-byte blob")
        if index != self.next.get(digest, 0):
            return self._drop("chunk out of order")
        if not isinstance(body, bytes | bytearray) or len(body) != chunk_bytes(nbytes, index):
            return self._drop("chunk of the wrong size")
        if self.signer is not None:
            auth = {"t": headers.get("t"), "mac": headers.get("mac")}
            try:
                self.signer.verify("chunk", digest, body, auth, [index, count], check_age=False)
            except MessageRejected:
                return self._drop("chunk not signed by the client")
        if digest not in self.files:
            tmp = self.cache.directory / f".{digest}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part"
            self.files[digest] = (tmp, open(tmp, "wb"))
            self.hashers[digest] = new_digest()
        self.files[digest][1].write(body)
        self.hashers[digest].update(body)
        self.next[digest] = index + 1
        self.total += len(body)
        self.progress += 1
        self.errors.pop(digest, None)
        if index + 1 < count:
            return None
        tmp, f = self.files.pop(digest)
        f.close()
        self.next.pop(digest)
        if self.hashers.pop(digest).hexdigest() == digest:
            self.cache._publish(digest, kind, tmp)
            self.done.add(digest)
            return None
        tmp.unlink()
        if self.tries[digest] >= self.MAX_TRIES:
            self.failed[digest] = f"arrived corrupted {self.tries[digest]} times"
        else:
            logger.warning("node %s: blob %s arrived corrupted; asking again", self.node, digest)
            self.tries[digest] += 1
            self.again.append(digest)
        return None

    def _request(self, producer, source, digests):
        producer.publish(
            {"digests": sorted(digests), "reply_to": self.reply, "node": self.node},
            routing_key=source, exchange="", serializer="json", delivery_mode=1,
        )  # fmt: skip

    def run(self, source, connect):
        queue = Queue(self.reply, routing_key=self.reply, durable=False, auto_delete=True,
                      expires=600)  # fmt: skip
        try:
            with connect() as conn:
                queue = queue.bind(conn.default_channel)
                queue.declare()
                with conn.Consumer(queue, on_message=self.on_chunk):
                    producer = conn.Producer()
                    self._request(producer, source, self.wanted)
                    self._wait(conn, producer, source)
                with contextlib.suppress(Exception):
                    queue.delete()
        finally:
            for tmp, f in self.files.values():
                f.close()
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
            if sum(self.dropped.values()):
                logger.warning("node %s dropped %d chunks that were not the client's (%s)",
                               self.node, sum(self.dropped.values()), dict(self.dropped))  # fmt: skip
        if self.failed:
            raise BlobError("could not fetch data from the client: " + "; ".join(
                f"{d}: {why}" for d, why in sorted(self.failed.items())))  # fmt: skip
        return self.total

    def _wait(self, conn, producer, source):
        deadline = time.monotonic() + FETCH_TIMEOUT_S
        while len(self.done) + len(self.failed) < len(self.wanted):
            before = self.progress
            try:
                conn.drain_events(timeout=1.0)
            except TimeoutError:
                pass
            if self.again:
                self._request(producer, source, self.again)
                self.again = []
            now = time.monotonic()
            for digest, (since, error) in list(self.errors.items()):
                if now - since > self.ERROR_GRACE_S and digest not in self.next:
                    self.failed[digest] = error
                    del self.errors[digest]
            if self.progress != before:
                # Only a chunk taken counts: junk never keeps a fetch alive.
                deadline = now + FETCH_TIMEOUT_S
            elif now > deadline:
                raise BlobError(
                    f"the client sent no data for {FETCH_TIMEOUT_S:.0f} s "
                    f"(queue {source}): is the search still running?"
                )
