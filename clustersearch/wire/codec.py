"""The result codec: a node's result as binary frames, not base64 in JSON.

A node's result is Celery's result record (status, task id, date...) around
clustersearch's envelope, whose payload is bytes: a pickle of tens of MB for
a batch of fitted trees. In JSON, kombu writes such bytes as base64 text
(4/3 of the size) that both sides then scan and convert: about a third of
what a forest fit's results cost before this codec
(``benchmarks/bench_forest.py``). This codec writes the record as JSON with
every bytes value moved out of it into a frame of its own::

    b"CSR1" | header length (4 bytes, big-endian) | header (JSON)
            | for each bytes value: length (8 bytes, big-endian) | the bytes

The header holds ``{"__csbytes__": i}`` where the i-th bytes value was.
Decoding rebuilds the record, each bytes value a read-only ``memoryview``
into the message (no copy), and nothing else: no pickle, no code, every
length checked against the message, so a malformed or hostile message is a
``ValueError`` (kombu's ``DecodeError``), never more. The payload inside is
verified and unpickled by clustersearch, as before (:mod:`.signing`).

Nodes store results with this codec (``result_serializer``); clients accept
it and JSON (a node of an older version, or anything else on the broker,
whose results the signature check judges). A result that cannot be decoded
is dropped by the client's dispatcher (``client/dispatch.py``).
"""

from __future__ import annotations

import struct
from typing import Any

from kombu.serialization import register
from kombu.utils.json import dumps as json_dumps
from kombu.utils.json import loads as json_loads

__all__ = ["CONTENT_TYPE", "NAME", "Chunks", "decode", "encode"]

NAME = "clustersearch"
CONTENT_TYPE = "application/x-clustersearch-result"
_MAGIC = b"CSR1"
_HEADER = struct.Struct(">I")
_LENGTH = struct.Struct(">Q")
_KEY = "__csbytes__"


class Chunks:
    """Bytes held as the pieces they were written in, joined only when the
    message is: a node's pickle of fitted trees, whose large arrays the
    pickler hands over as views of the trees' own memory
    (:func:`.serialization.dumps_chunks`). Copying them into one ``bytes`` first
    (a growing buffer, then its value) cost a node more than the copy into
    the message did. Encoded as one frame; signed piece by piece, which is
    the same signature as over the joined bytes (:mod:`.signing`).
    """

    __slots__ = ("nbytes", "parts")

    def __init__(self, parts: list[memoryview]) -> None:
        self.parts = parts
        self.nbytes = sum(part.nbytes for part in parts)

    def __len__(self) -> int:
        return self.nbytes

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)

    def __repr__(self) -> str:
        # Celery may log a task's return value: never the pickle itself.
        return f"<{self.nbytes} bytes in {len(self.parts)} chunks>"


Frame = bytes | bytearray | memoryview | Chunks


def _take_bytes(obj: Any, frames: list[Frame]) -> Any:
    if isinstance(obj, (bytes, bytearray, memoryview, Chunks)):
        frames.append(obj)
        return {_KEY: len(frames) - 1}
    if isinstance(obj, dict):
        return {key: _take_bytes(value, frames) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_take_bytes(value, frames) for value in obj]
    return obj


def _put_bytes(obj: Any, frames: list[memoryview]) -> Any:
    if isinstance(obj, dict):
        if len(obj) == 1 and _KEY in obj:
            index = obj[_KEY]
            if type(index) is not int or not 0 <= index < len(frames):
                raise ValueError("a clustersearch result refers to a frame it does not have")
            return frames[index]
        return {key: _put_bytes(value, frames) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_put_bytes(value, frames) for value in obj]
    return obj


def encode(obj: Any) -> bytes:
    """``obj`` (JSON-able but for bytes values) as one binary message."""
    frames: list[Frame] = []
    header = json_dumps(_take_bytes(obj, frames)).encode()
    parts: list[bytes | bytearray | memoryview] = [_MAGIC, _HEADER.pack(len(header)), header]
    for frame in frames:
        if isinstance(frame, Chunks):
            parts.append(_LENGTH.pack(frame.nbytes))
            parts.extend(frame.parts)
        else:
            parts.append(_LENGTH.pack(memoryview(frame).nbytes))
            parts.append(frame)
    return b"".join(parts)


def decode(data: bytes | bytearray | memoryview | str) -> Any:
    """Inverse of :func:`encode`; ValueError for anything malformed.

    A JSON result is decoded as JSON: Redis and file:// results carry no
    content type (the backend decodes every result with its own codec), and
    a node of an older version stores JSON.
    """
    if isinstance(data, str):
        data = data.encode()
    if data[:1] == b"{":
        return _checked(json_loads(bytes(data)))
    view = memoryview(data).toreadonly()
    if len(view) < len(_MAGIC) + _HEADER.size or bytes(view[: len(_MAGIC)]) != _MAGIC:
        raise ValueError("not a clustersearch result message")
    offset = len(_MAGIC)
    (size,) = _HEADER.unpack_from(view, offset)
    offset += _HEADER.size
    if offset + size > len(view):
        raise ValueError("a clustersearch result message is cut short (header)")
    header = json_loads(bytes(view[offset : offset + size]))
    offset += size
    frames: list[memoryview] = []
    while offset < len(view):
        if offset + _LENGTH.size > len(view):
            raise ValueError("a clustersearch result message is cut short (frame length)")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += _LENGTH.size
        if offset + length > len(view):
            raise ValueError("a clustersearch result message is cut short (frame)")
        # A view, not a copy: a forest's result is tens of MB, and copying
        # it out cost the client more than verifying it.
        frames.append(view[offset : offset + length])
        offset += length
    return _checked(_put_bytes(header, frames))


def _checked(meta: Any) -> Any:
    # What Celery reads of a result record before anything checks it:
    # anything else would raise inside Celery's result consumer.
    if not (
        isinstance(meta, dict)
        and isinstance(meta.get("status"), str)
        and isinstance(meta.get("task_id"), str)
        and "result" in meta
    ):
        raise ValueError("not a result record (status, task_id, result)")
    return meta


register(NAME, encode, decode, content_type=CONTENT_TYPE, content_encoding="binary")
