"""The data plane's shared part: how blobs are named, chunked and sized.

scikit-learn hands X, y and the per-split index arrays to every
``_fit_and_score`` call. Pickled naively, every task message would carry the
whole dataset. Instead the client (``client.blobs.BlobTable``) replaces every
large numpy array in a batch by a reference, ``(TAG, digest, kind)``, through
the pickler's ``persistent_id``: task messages stay a few kB. A node that
meets a digest it does not hold asks the client for it over the broker
(``node.cache.NodeCache``): a JSON request ``{"digests", "reply_to", "node"}``
to the client's blob queue, answered with raw chunks whose headers are
``{"digest", "index", "count", "kind"}``, plus ``{"t", "mac"}`` with a
secret: an HMAC over the digest, the index, the count and the bytes (or
``{"digest", "error"}``).

Anyone who can publish to the broker can publish to a node's reply queue
too. The task lists each reference as ``(digest, kind, nbytes)`` under its
signature, so the node knows how many chunks of which sizes to expect
(:func:`chunk_bytes`) and drops any other; what it accepts never exceeds the
declared size, and the data is checked against its digest. The reply queue
is named after the node (:func:`reply_queue`), and the client sends chunks
only to reply queues of its own nodes (:func:`reply_queue_node`).
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from pathlib import Path

from ..exceptions import ConfigurationError

__all__ = [
    "CHUNK_BYTES",
    "DEFAULT_CACHE_BYTES",
    "DEFAULT_STORE_BYTES",
    "MIN_BLOB_BYTES",
    "RAW",
    "TAG",
    "chunk_bytes",
    "chunk_count",
    "default_cache_dir",
    "new_digest",
    "parse_size",
    "reply_queue",
    "reply_queue_node",
]

TAG = "clustersearch-blob"
# Arrays smaller than this travel inside the task message.
MIN_BLOB_BYTES = 8 * 1024
# Chunks stay far below RabbitMQ 4's 16 MiB message limit (and base64, which
# kombu's virtual transports apply, adds a third).
CHUNK_BYTES = 1024 * 1024
RAW = "application/octet-stream"
DEFAULT_CACHE_BYTES = 2 * 1024**3
# Bound of a node's store of forest parts (node/store.py).
DEFAULT_STORE_BYTES = 2 * 1024**3

_HASH_BYTES = 16
_REPLY_PREFIX = "clustersearch.reply."
_REPLY_QUEUE = re.compile(re.escape(_REPLY_PREFIX) + r"(.+)\.[0-9a-f]{32}")


def chunk_count(nbytes: int) -> int:
    """How many chunks carry a blob of ``nbytes`` (one, empty, for 0)."""
    return max(1, -(-nbytes // CHUNK_BYTES))


def chunk_bytes(nbytes: int, index: int) -> int:
    """The size of chunk ``index`` of a blob of ``nbytes``."""
    return max(0, min(CHUNK_BYTES, nbytes - index * CHUNK_BYTES))


def reply_queue(node: str) -> str:
    """A fresh reply queue for one fetch of node ``node``."""
    return f"{_REPLY_PREFIX}{node}.{uuid.uuid4().hex}"


def reply_queue_node(name: object) -> str | None:
    """The node a reply queue name belongs to, or None if it is not one."""
    match = _REPLY_QUEUE.fullmatch(name) if isinstance(name, str) else None
    return match.group(1) if match else None


def new_digest() -> hashlib.blake2b:
    """A fresh hasher for blob digests (BLAKE2b, 128 bits)."""
    return hashlib.blake2b(digest_size=_HASH_BYTES)


def parse_size(text: int | str) -> int:
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
        raise ConfigurationError(f"not a size: {text!r} (write it like 2GB, 512MiB or 1000000)")
    return size


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "clustersearch" / "blobs"
