"""The remote-control commands of clustersearch besides ``clustersearch_info``.

Celery's own ``revoke`` is unsigned: anyone who can publish to the broker
could stop any fit. With a secret, the client stops fits with
``clustersearch_revoke`` instead, whose arguments are signed like a task
(kind ``"revoke"``, the sorted task ids, the time); nodes with a secret
refuse Celery's ``revoke`` and ``terminate`` (``node.remote``). A captured
revoke replayed within ``max_age`` only stops fits its client already gave up.
"""

from __future__ import annotations

import json
from typing import Any

from ..exceptions import MessageRejected
from .protocol import STOP_SIGNAL
from .signing import Signer

__all__ = ["REVOKE_COMMAND", "revoke_arguments", "verified_revoke"]

REVOKE_COMMAND = "clustersearch_revoke"


def _ids_bytes(task_ids: list[str]) -> bytes:
    return json.dumps(sorted(task_ids), separators=(",", ":")).encode()


def revoke_arguments(signer: Signer, task_ids: list[str]) -> dict[str, Any]:
    """The arguments of a ``clustersearch_revoke`` broadcast (signed with a secret)."""
    ids = [str(t) for t in task_ids]
    return {"task_ids": ids, "auth": signer.sign("revoke", "", _ids_bytes(ids), STOP_SIGNAL)}


def verified_revoke(signer: Signer, task_ids: Any, auth: Any) -> list[str]:
    """The task ids of a ``clustersearch_revoke``; MessageRejected unless
    signed with ``signer``'s secret (any list passes without a secret)."""
    if not isinstance(task_ids, list) or not all(isinstance(t, str) for t in task_ids):
        raise MessageRejected("clustersearch_revoke: task_ids is not a list of strings")
    signer.verify("revoke", "", _ids_bytes(task_ids), auth, STOP_SIGNAL)
    return task_ids
