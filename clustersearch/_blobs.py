"""The data plane: large arrays travel to each node once, by content hash.

scikit-learn hands X, y and the per-split index arrays to every
``_fit_and_score`` call. Pickled naively, every task message would carry the
whole dataset. Instead, :class:`BlobTable` replaces every large numpy array
in a batch by a reference, ``(tag, digest, kind)``, through the pickler's
``persistent_id``: task messages stay a few kB.

A node that meets a digest it does not hold asks the client for it
(:func:`NodeCache.ensure`): it sends a request to the session's blob queue
and reads the chunks from a reply queue of its own, over the broker the
cluster already has. One process per node fetches (a file lock), the others
wait and find the file. Arrays are stored as ``.npy`` files in the node's
cache folder and memory-mapped read-only, so a node holds one copy in RAM
whatever its number of processes; arrays of Python objects are stored
pickled and loaded per process. The cache is bounded (least recently used
first out) and outlives searches: a second search on the same data sends no
data. A file that is missing or does not match its digest is fetched again.

The client side, :class:`BlobServer`, is a thread with its own broker
connection that answers those requests and counts the bytes it sends per
node.
"""

import contextlib
import fcntl
import functools
import hashlib
import io
import logging
import os
import pickle
import threading
import time
import uuid
import weakref
from collections import Counter
from pathlib import Path

import numpy as np
from kombu import Queue

__all__ = ["BlobServer", "BlobTable", "NodeCache", "parse_size"]

logger = logging.getLogger(__name__)

TAG = "clustersearch-blob"
# Arrays smaller than this travel inside the task message.
MIN_BLOB_BYTES = 8 * 1024
# Chunks stay far below RabbitMQ 4's 16 MiB message limit (and base64, which
# kombu's virtual transports apply, adds a third).
CHUNK_BYTES = 1024 * 1024
RAW = "application/octet-stream"
DEFAULT_CACHE_BYTES = 2 * 1024**3
# A node gives up on a fetch when the client sends nothing for this long.
FETCH_TIMEOUT_S = 120.0

_HASH_BYTES = 16


def _digest():
    return hashlib.blake2b(digest_size=_HASH_BYTES)


# -- client side --------------------------------------------------------------


class _Blob:
    __slots__ = ("digest", "kind", "parts", "nbytes")

    def __init__(self, digest, kind, parts):
        self.digest = digest
        self.kind = kind
        self.parts = parts  # bytes-like objects, concatenated in order
        self.nbytes = sum(len(p) for p in parts)

    def chunks(self, size=CHUNK_BYTES):
        """Yield the blob's bytes in pieces of at most ``size``."""
        buffer = bytearray()
        for part in self.parts:
            view = memoryview(part)
            while len(view):
                take = size - len(buffer)
                buffer += view[:take]
                view = view[take:]
                if len(buffer) == size:
                    yield bytes(buffer)
                    buffer.clear()
        if buffer or not self.nbytes:
            yield bytes(buffer)


def _npy_parts(array):
    """An array as ``.npy`` bytes: its header, then its data, not copied."""
    if array.flags.c_contiguous:
        fortran, data = False, array
    elif array.flags.f_contiguous:
        fortran, data = True, array.T
    else:
        fortran, data = False, np.ascontiguousarray(array)
    header = io.BytesIO()
    np.lib.format.write_array_header_2_0(
        header,
        {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": fortran,
         "shape": array.shape},
    )  # fmt: skip
    return [header.getvalue(), memoryview(data).cast("B")]


class BlobTable:
    """The client's large arrays for one session, by digest.

    ``persistent_id`` is called by the pickler for every object of a batch;
    arrays of at least ``min_bytes`` become references. An array is hashed
    once per session however many batches carry it (it is known by id while
    it is alive, checked with a weak reference).
    """

    def __init__(self, min_bytes=MIN_BLOB_BYTES):
        self.min_bytes = min_bytes
        self.blobs = {}
        self._by_id = {}
        self._lock = threading.Lock()

    def persistent_id(self, obj):
        if type(obj) is not np.ndarray and type(obj) is not np.memmap:
            return None
        if obj.nbytes < self.min_bytes:
            return None
        with self._lock:
            known = self._by_id.get(id(obj))
            if known is not None and known[0]() is obj:
                blob = known[1]
            else:
                blob = self._add(obj)
                self._by_id[id(obj)] = (weakref.ref(obj), blob)
        return (TAG, blob.digest, blob.kind)

    def _add(self, array):
        if array.dtype.hasobject or array.dtype.fields is not None and any(
            field[0].hasobject for field in array.dtype.fields.values()
        ):
            kind, parts = "pkl", [pickle.dumps(array, protocol=pickle.HIGHEST_PROTOCOL)]
        else:
            kind, parts = "npy", _npy_parts(array)
        hasher = _digest()
        for part in parts:
            hasher.update(part)
        digest = hasher.hexdigest()
        blob = self.blobs.get(digest)
        if blob is None:
            blob = self.blobs[digest] = _Blob(digest, kind, parts)
        return blob

    def get(self, digest):
        with self._lock:
            return self.blobs.get(digest)


class BlobServer:
    """Answers the nodes' requests for blobs, on a thread of its own.

    Parameters
    ----------
    app : celery.Celery
        The client's app: its broker carries requests and chunks.
    table : BlobTable
    """

    def __init__(self, app, table):
        self.app = app
        self.table = table
        self.queue_name = f"clustersearch.blobs.{uuid.uuid4().hex}"
        self.bytes_per_node = Counter()
        self.blobs_per_node = Counter()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error = None
        self._thread = threading.Thread(
            target=self._run, name="clustersearch-blobs", daemon=True
        )
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error

    def close(self):
        self._stop.set()
        self._thread.join()

    def _queue(self):
        return Queue(
            self.queue_name,
            routing_key=self.queue_name,
            durable=False,
            auto_delete=True,
            # RabbitMQ drops the queue if the client dies without deleting it.
            expires=3600,
        )

    def _run(self):
        while not self._stop.is_set():
            try:
                # Requests are rare (a node's first task on new data): on
                # polling transports, look for them less often than nodes
                # look for work.
                options = {"polling_interval": 0.02}
                with self.app.connection_for_write(transport_options=options) as conn:
                    conn.ensure_connection(max_retries=3)
                    producer = conn.Producer()
                    queue = self._queue()
                    with conn.Consumer(
                        queue, on_message=functools.partial(self._on_request, producer=producer),
                        accept=["json"],
                    ):  # fmt: skip
                        self._ready.set()
                        while not self._stop.is_set():
                            try:
                                conn.drain_events(timeout=0.1)
                            except TimeoutError:
                                pass
                    with contextlib.suppress(Exception):
                        queue.bind(conn.default_channel).delete()
                    return
            except Exception as exc:
                if not self._ready.is_set():
                    self._error = exc
                    self._ready.set()
                    return
                logger.warning("blob server lost the broker; reconnecting", exc_info=True)
                time.sleep(0.5)

    def _on_request(self, message, *, producer):
        try:
            request = message.decode()
            reply_to, node = request["reply_to"], request.get("node", "?")
            for digest in request["digests"]:
                blob = self.table.get(digest)
                if blob is None:
                    producer.publish(
                        b"", routing_key=reply_to, exchange="", content_type=RAW,
                        content_encoding="binary", delivery_mode=1,
                        headers={"digest": digest, "error": "unknown to this client"},
                    )  # fmt: skip
                    continue
                count = max(1, -(-blob.nbytes // CHUNK_BYTES))
                for index, chunk in enumerate(blob.chunks()):
                    producer.publish(
                        chunk, routing_key=reply_to, exchange="", content_type=RAW,
                        content_encoding="binary", delivery_mode=1,
                        headers={"digest": digest, "index": index, "count": count,
                                 "kind": blob.kind},
                    )  # fmt: skip
                self.bytes_per_node[node] += blob.nbytes
                self.blobs_per_node[node] += 1
        except Exception:
            logger.exception("could not answer a blob request")
        finally:
            message.ack()


# -- node side ----------------------------------------------------------------


class BlobError(RuntimeError):
    """A blob could not be fetched from the client."""


def parse_size(text) -> int:
    """``'2GB'``, ``'512MiB'``, ``'1e9'`` or an int, in bytes."""
    if isinstance(text, int):
        return text
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
             "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}  # fmt: skip
    value = str(text).strip().lower().replace(" ", "")
    number = value.rstrip("kmgtib")
    unit = value[len(number):]
    try:
        size = int(float(number) * units[unit])
    except (KeyError, ValueError):
        size = -1
    if size < 0:
        raise ValueError(f"not a size: {text!r} (write it like 2GB, 512MiB or 1000000)")
    return size


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "clustersearch" / "blobs"


def _identity(st):
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _map_npy(f):
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

    def __init__(self, directory, max_bytes=DEFAULT_CACHE_BYTES):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._open = {}  # digest -> (file identity, object), this process

    @classmethod
    def from_environ(cls):
        directory = os.environ.get("CLUSTERSEARCH_CACHE_DIR") or default_cache_dir()
        size = os.environ.get("CLUSTERSEARCH_CACHE_BYTES")
        return cls(directory, parse_size(size) if size else DEFAULT_CACHE_BYTES)

    def path(self, digest, kind):
        return self.directory / f"{digest}.{kind}"

    # -- presence and integrity

    def _valid(self, digest, kind):
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
                hasher = _digest()
                data = [] if kind == "pkl" else None
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
    def _touch(path, st):
        # Least recently used by access time, which we set ourselves.
        with contextlib.suppress(OSError):
            os.utime(path, ns=(time.time_ns(), st.st_mtime_ns))

    @contextlib.contextmanager
    def _locked(self):
        with open(self.directory / ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def ensure(self, refs, source, connect, node="?"):
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

    def _fetch(self, wanted, source, connect, node):
        reply = f"clustersearch.reply.{uuid.uuid4().hex}"
        queue = Queue(reply, routing_key=reply, durable=False, auto_delete=True, expires=600)
        files, hashers, done, errors = {}, {}, set(), []
        total = 0

        def on_chunk(message):
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
                hashers[digest] = _digest()
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

    def _evict(self, keep):
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

    def load(self, digest, kind):
        known = self._open.get(digest)
        if known is None:
            if not self._valid(digest, kind):
                raise BlobError(f"blob {digest} is not on this node")
            known = self._open[digest]
        return known[1]

    def loads(self, payload):
        """Unpickle a task payload, resolving its references from the cache."""
        cache = self

        class _Unpickler(pickle.Unpickler):
            def persistent_load(self, pid):
                if isinstance(pid, tuple) and len(pid) == 3 and pid[0] == TAG:
                    return cache.load(pid[1], pid[2])
                raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")

        return _Unpickler(io.BytesIO(payload)).load()
