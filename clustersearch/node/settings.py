"""A node's settings, held in its Celery app's configuration.

The command line (or, for ``celery -A clustersearch.worker``, the
environment, read once in the node's main process) builds one
:class:`NodeSettings`; it is stored as ``app.conf.clustersearch_node`` and
the node's pool processes, forked from the main process, read it there.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..wire.blobs import (
    DEFAULT_CACHE_BYTES,
    DEFAULT_STORE_BYTES,
    default_cache_dir,
    parse_size,
)
from ..wire.signing import DEFAULT_MAX_AGE_S, load_secret

__all__ = ["CONF_KEY", "MAX_PAYLOAD_BYTES", "NodeSettings"]

CONF_KEY = "clustersearch_node"

# A task message carries references to the data, not the data: anything
# bigger is not ours (and is refused before it is looked at).
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class NodeSettings:
    """What a node needs besides its broker.

    Parameters
    ----------
    cache_dir : path
        Folder of the node's blob cache, shared by its processes.
    cache_bytes : int, default=2 GiB
        Bound of the cache, least recently used out.
    threads_per_process : int, default=1
        BLAS/OpenMP threads each fit may use.
    max_payload : int, default=64 MiB
        Task payloads above this are refused unread.
    max_age_s : float, default=3600
        Signed tasks older than this (or from a clock that far off) are refused.
    secret : bytes or None
        The secret shared with the clients (never shown in a repr, so not by
        ``celery inspect conf`` either).
    allow_remote_control : bool, default=False
        Obey Celery's state-changing remote control (``shutdown``,
        ``cancel_consumer``, ``pool_shrink``..., and unsigned ``revoke``) from
        anyone who can publish to the broker (``node.remote``).
    store_bytes : int, default=2 GiB
        Bound of the node's store of forest parts (``node.store``): a part
        that would take it over is refused.
    """

    cache_dir: Path = field(default_factory=default_cache_dir)
    cache_bytes: int = DEFAULT_CACHE_BYTES
    threads_per_process: int = 1
    max_payload: int = MAX_PAYLOAD_BYTES
    max_age_s: float = DEFAULT_MAX_AGE_S
    secret: bytes | None = field(default=None, repr=False)
    allow_remote_control: bool = False
    store_bytes: int = DEFAULT_STORE_BYTES

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> NodeSettings:
        """The settings ``$CLUSTERSEARCH_*`` give (for ``celery -A
        clustersearch.worker``): CACHE_DIR, CACHE_BYTES,
        THREADS_PER_PROCESS, MAX_PAYLOAD, MAX_AGE_S, SECRET or SECRET_FILE,
        ALLOW_REMOTE_CONTROL (1 to allow), STORE_BYTES."""
        get = environ.get
        secret = get("CLUSTERSEARCH_SECRET") or None
        secret_file = None if secret else get("CLUSTERSEARCH_SECRET_FILE") or None
        return cls(
            cache_dir=Path(get("CLUSTERSEARCH_CACHE_DIR") or default_cache_dir()),
            cache_bytes=parse_size(get("CLUSTERSEARCH_CACHE_BYTES") or DEFAULT_CACHE_BYTES),
            threads_per_process=int(get("CLUSTERSEARCH_THREADS_PER_PROCESS") or 1),
            max_payload=parse_size(get("CLUSTERSEARCH_MAX_PAYLOAD") or MAX_PAYLOAD_BYTES),
            max_age_s=float(get("CLUSTERSEARCH_MAX_AGE_S") or DEFAULT_MAX_AGE_S),
            secret=load_secret(secret, secret_file) if (secret or secret_file) else None,
            allow_remote_control=(get("CLUSTERSEARCH_ALLOW_REMOTE_CONTROL") or "0").lower()
            in ("1", "true", "yes"),
            store_bytes=parse_size(get("CLUSTERSEARCH_STORE_BYTES") or DEFAULT_STORE_BYTES),
        )
