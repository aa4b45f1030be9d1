"""Message authentication: HMAC-SHA256 with a secret shared by the client
and its nodes.

Work and results are pickles, and unpickling runs code. With a secret set,
every task payload is verified on the node, and every result on the client,
before anything is unpickled; Celery itself decodes only JSON (the envelope,
the remote-control channel), never a pickle. What is signed:

- a task: ``"task"``, its Celery task id, the time it was signed, where the
  node fetches the data it references and their digests (so the data, which
  is checked against its digest, is covered too), and the payload;
- a task also names the node it is for: another node refuses it;
- a result: ``"result"``, the task id, the time, and the payload;
- a worker-lost report (a node's pool process died running a task):
  ``"lost"``, the task id, the time, the node and Celery's message;
- a node's info reply: ``"info"``, the client's fresh nonce (the challenge
  of that broadcast), the node's name and the whole reply (``proof``).

The kind and the task id in the signed bytes keep a result from passing for
a task, and a payload from passing under another task's id. A task older
than ``max_age`` is refused (a clock more than that apart from the client's
is too: the error says so); a node refuses a task id it has already run
(see ``worker``).

Why HMAC rather than Celery's ``auth`` serializer: Celery's signs task
messages only, not results (the client would still unpickle whatever the
result backend holds), needs a certificate and key per node plus a CA, and
adds a public-key signature per message. One shared secret is what a shelf
of boards can manage, covers both directions, and costs microseconds.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from typing import Any

from ..exceptions import ConfigurationError, MessageRejected
from .codec import Chunks

__all__ = ["MessageRejected", "Signer", "load_secret"]

DEFAULT_MAX_AGE_S = 3600.0


def load_secret(
    secret: str | bytes | None = None, secret_file: str | os.PathLike[str] | None = None
) -> bytes | None:
    """The secret as bytes: ``secret``, else ``secret_file``'s content, else
    ``$CLUSTERSEARCH_SECRET``, else ``$CLUSTERSEARCH_SECRET_FILE``; None if
    none is set. Whitespace around it (a file's trailing newline) is not
    part of the secret, wherever it comes from, so that
    ``Cluster(secret=open(path).read())`` matches ``--secret-file path``."""
    if secret is None and secret_file is None:
        secret = os.environ.get("CLUSTERSEARCH_SECRET") or None
        if secret is None:
            secret_file = os.environ.get("CLUSTERSEARCH_SECRET_FILE") or None
    if secret is None and secret_file is not None:
        with open(secret_file, "rb") as f:
            secret = f.read().strip()
    if secret is None:
        return None
    if isinstance(secret, str):
        secret = secret.encode()
    secret = bytes(secret).strip()
    if len(secret) < 16:
        raise ConfigurationError(
            "the clustersearch secret is too short: use at least 16 characters, "
            "e.g. the output of: python -c 'import secrets; print(secrets.token_hex(32))'"
        )
    return bytes(secret)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


class Signer:
    """Signs and verifies task and result payloads; a no-op without a secret.

    Parameters
    ----------
    secret : bytes or None
    max_age : float
        Seconds a signed task stays valid.
    """

    def __init__(self, secret: bytes | None, max_age: float = DEFAULT_MAX_AGE_S) -> None:
        self.secret = secret
        self.max_age = max_age

    @property
    def enabled(self) -> bool:
        return self.secret is not None

    def prove(self, nonce: str, info: dict) -> str | None:
        """A node's answer to the client's challenge ``nonce``: an HMAC over
        the nonce, the node's name and everything else its info reply holds
        (but ``proof``). Replaying a captured reply fails (a fresh nonce per
        broadcast), and nothing in it tells anything about the secret."""
        if self.secret is None or not nonce:
            return None
        content = {k: v for k, v in info.items() if k != "proof"}
        return self._mac("info", str(nonce), 0.0, [info.get("node"), content], b"")

    def check_proof(self, nonce: str, info: dict) -> bool:
        """Whether ``info`` answers the challenge ``nonce`` with this secret."""
        proof = info.get("proof")
        if self.secret is None or not isinstance(proof, str):
            return False
        try:
            expected = self.prove(nonce, info)
        except (TypeError, ValueError):
            return False
        return expected is not None and hmac.compare_digest(expected, proof)

    def _mac(
        self, kind: str, task_id: str, signed_at: float, context: Any, payload: bytes | memoryview | Chunks
    ) -> str:
        # sign() and verify() return before this when there is no secret.
        assert self.secret is not None
        mac = hmac.new(self.secret, digestmod=hashlib.sha256)
        for part in (kind.encode(), task_id.encode(), repr(float(signed_at)).encode(),
                     _canonical(context)):  # fmt: skip
            mac.update(len(part).to_bytes(8, "big"))
            mac.update(part)
        for piece in payload.parts if isinstance(payload, Chunks) else (payload,):
            mac.update(piece)
        return mac.hexdigest()

    def sign(
        self, kind: str, task_id: str, payload: bytes | memoryview | Chunks, context: Any = None
    ) -> dict[str, Any]:
        """The ``auth`` field to send with ``payload``."""
        if self.secret is None:
            return {}
        signed_at = time.time()
        return {"t": signed_at, "mac": self._mac(kind, task_id, signed_at, context, payload)}

    def verify(
        self,
        kind: str,
        task_id: str,
        payload: bytes | memoryview,
        auth: Any,
        context: Any = None,
        *,
        check_age: bool = True,
    ) -> None:
        """Raise MessageRejected unless ``auth`` signs ``payload``."""
        if self.secret is None:
            return
        if not isinstance(auth, dict) or "mac" not in auth or "t" not in auth:
            raise MessageRejected(
                f"unsigned {kind} refused: this side has a secret, so the other "
                "side must sign with the same one (Cluster(secret=...), "
                "$CLUSTERSEARCH_SECRET or 'clustersearch worker --secret-file')"
            )
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise MessageRejected(f"{kind} payload is not bytes")
        try:
            signed_at = float(auth["t"])
            expected = self._mac(kind, task_id, signed_at, context, payload)
        except (TypeError, ValueError) as exc:
            raise MessageRejected(f"malformed signature on a {kind}: {exc}") from None
        if not hmac.compare_digest(expected, str(auth["mac"])):
            raise MessageRejected(
                f"{kind} {task_id} has a wrong signature: it was altered, or the "
                "sender's secret differs from this side's"
            )
        if check_age:
            age = time.time() - signed_at
            if age > self.max_age or age < -self.max_age:
                raise MessageRejected(
                    f"{kind} {task_id} was signed {age:.0f} s ago, outside the "
                    f"{self.max_age:.0f} s window: a replay, or the clocks of the "
                    "client and this node are that far apart (check NTP)"
                )
