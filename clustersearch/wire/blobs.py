"""The data plane's shared part: how blobs are named, chunked and sized.

scikit-learn hands X, y and the per-split index arrays to every
``_fit_and_score`` call. Pickled naively, every task message would carry the
whole dataset. Instead the client (``client.blobs.BlobTable``) replaces every
large numpy array in a batch by a reference, ``(TAG, digest, kind)``, through
the pickler's ``persistent_id``: task messages stay a few kB. A node that
meets a digest it does not hold asks the client for it over the broker
(``node.cache.NodeCache``): a JSON request ``{"digests", "reply_to", "node"}``
to the client's blob queue, answered with raw chunks whose headers are
``{"digest", "index", "count", "kind"}`` (or ``{"digest", "error"}``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..exceptions import ConfigurationError

__all__ = [
    "CHUNK_BYTES",
    "DEFAULT_CACHE_BYTES",
    "MIN_BLOB_BYTES",
    "RAW",
    "TAG",
    "default_cache_dir",
    "new_digest",
    "parse_size",
]

TAG = "clustersearch-blob"
# Arrays smaller than this travel inside the task message.
MIN_BLOB_BYTES = 8 * 1024
# Chunks stay far below RabbitMQ 4's 16 MiB message limit (and base64, which
# kombu's virtual transports apply, adds a third).
CHUNK_BYTES = 1024 * 1024
RAW = "application/octet-stream"
DEFAULT_CACHE_BYTES = 2 * 1024**3

_HASH_BYTES = 16


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
