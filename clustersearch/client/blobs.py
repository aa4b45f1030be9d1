"""The client's half of the data plane (see ``wire.blobs``).

:class:`BlobTable` replaces every large numpy array of a batch by a
reference while the batch is pickled; an array is hashed once per session
however many batches carry it. :class:`BlobServer` is a thread with its own
broker connection that answers the nodes' requests for blobs and counts the
bytes it sends per node.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import pickle
import threading
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from kombu import Queue

from ..wire.blobs import (
    CHUNK_BYTES,
    MIN_BLOB_BYTES,
    RAW,
    TAG,
    chunk_count,
    new_digest,
    reply_queue_node,
)

if TYPE_CHECKING:
    pass

__all__ = ["BlobServer", "BlobTable"]

logger = logging.getLogger(__name__)


class _Blob:
    __slots__ = ("digest", "kind", "parts", "nbytes")

    def __init__(self, digest: str, kind: str, parts: list[bytes | memoryview]) -> None:
        self.digest = digest
        self.kind = kind
        self.parts = parts  # bytes-like objects, concatenated in order
        self.nbytes = sum(len(p) for p in parts)

    def chunks(self, size: int = CHUNK_BYTES) -> Iterator[bytes]:
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


def _npy_parts(array: np.ndarray) -> list[bytes | memoryview]:
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
    # numpy declares ndarray's buffer protocol for Python >= 3.12 only.
    return [header.getvalue(), memoryview(data).cast("B")]  # type: ignore[arg-type]


class BlobTable:
    """The client's large arrays for one session, by digest.

    ``persistent_id`` is called by the pickler for every object of a batch;
    arrays of at least ``min_bytes`` become references. An array is hashed
    once per session however many batches carry it (it is known by id while
    it is alive, checked with a weak reference).
    """

    def __init__(self, min_bytes: int = MIN_BLOB_BYTES) -> None:
        self.min_bytes = min_bytes
        self.blobs: dict[str, _Blob] = {}
        self._by_id: dict[int, tuple[weakref.ref[np.ndarray], _Blob]] = {}
        self._lock = threading.Lock()

    def persistent_id(self, obj: Any) -> tuple[str, str, str] | None:
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

    def _add(self, array: np.ndarray) -> _Blob:
        parts: list[bytes | memoryview]
        if array.dtype.hasobject or array.dtype.fields is not None and any(
            field[0].hasobject for field in array.dtype.fields.values()
        ):
            kind, parts = "pkl", [pickle.dumps(array, protocol=pickle.HIGHEST_PROTOCOL)]
        else:
            kind, parts = "npy", _npy_parts(array)
        hasher = new_digest()
        for part in parts:
            hasher.update(part)
        digest = hasher.hexdigest()
        blob = self.blobs.get(digest)
        if blob is None:
            blob = self.blobs[digest] = _Blob(digest, kind, parts)
        return blob

    def get(self, digest: str) -> _Blob | None:
        with self._lock:
            return self.blobs.get(digest)


class BlobServer:
    """Answers the nodes' requests for blobs, on a thread of its own.

    Parameters
    ----------
    app : celery.Celery
        The client's app: its broker carries requests and chunks.
    table : BlobTable
    nodes : callable, optional
        Returns the names of the session's nodes: chunks go only to a reply
        queue named after one of them (``wire.blobs.reply_queue``); any other
        request is refused and logged. None answers any node.
    signer : Signer, optional
        With a secret, every chunk carries an HMAC over its blob's digest,
        its index and its bytes (headers ``t`` and ``mac``): a node then
        drops any chunk the client did not send before writing it.
    """

    def __init__(self, app, table, nodes=None, signer=None):
        self.app = app
        self.table = table
        self.nodes = nodes
        self.signer = signer
        self.refused = 0
        self.queue_name = f"clustersearch.blobs.{uuid.uuid4().hex}"
        self.bytes_per_node: Counter[str] = Counter()
        self.blobs_per_node: Counter[str] = Counter()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: Exception | None = None
        self._thread = threading.Thread(
            target=self._run, name="clustersearch-blobs", daemon=True
        )
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _queue(self) -> Queue:
        return Queue(
            self.queue_name,
            routing_key=self.queue_name,
            durable=False,
            auto_delete=True,
            # RabbitMQ drops the queue if the client dies without deleting it.
            expires=3600,
        )

    def _run(self) -> None:
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

    def _on_request(self, message: Any, *, producer: Any) -> None:
        try:
            request = message.decode()
            reply_to, node = request["reply_to"], request.get("node", "?")
            owner = reply_queue_node(reply_to)
            if owner is None or owner != node or (
                self.nodes is not None and node not in self.nodes()
            ):
                self.refused += 1
                logger.warning("refused a blob request to reply queue %.100r from %.100r: "
                               "not a reply queue of this session's nodes", reply_to, node)  # fmt: skip
                return
            for digest in request["digests"]:
                blob = self.table.get(digest)
                if blob is None:
                    producer.publish(
                        b"", routing_key=reply_to, exchange="", content_type=RAW,
                        content_encoding="binary", delivery_mode=1,
                        headers={"digest": digest, "error": "unknown to this client"},
                    )  # fmt: skip
                    continue
                count = chunk_count(blob.nbytes)
                for index, chunk in enumerate(blob.chunks()):
                    auth = self.signer.sign("chunk", digest, chunk, [index, count]) if (
                        self.signer is not None) else {}  # fmt: skip
                    producer.publish(
                        chunk, routing_key=reply_to, exchange="", content_type=RAW,
                        content_encoding="binary", delivery_mode=1,
                        headers={"digest": digest, "index": index, "count": count,
                                 "kind": blob.kind, **auth},
                    )  # fmt: skip
                self.bytes_per_node[node] += blob.nbytes
                self.blobs_per_node[node] += 1
        except Exception:
            logger.exception("could not answer a blob request")
        finally:
            message.ack()
