"""What a node takes from Celery's remote control (the pidbox).

Celery's remote control is unsigned: whoever can publish to the broker can
broadcast ``shutdown``, ``cancel_consumer`` (the node keeps answering
heartbeats but takes no more work), ``pool_shrink``, ``rate_limit``...
A node refuses every state-changing command (Celery's ``control`` type)
unless its operator started it with ``--allow-remote-control``; each refusal
is logged. Inspection (``ping``, ``stats``, ``active``, ``active_queues``,
``registered``...) keeps working, so Flower and ``celery inspect`` still see
the node, but ``conf`` answers with passwords and URL credentials masked,
and ``hello`` (Celery's startup sync between nodes) no longer merges the
revoked task ids a sender lists. A node with a secret takes ``revoke`` and
``terminate`` only as the signed ``clustersearch_revoke`` (``wire.control``);
without a secret, Celery's own revoke works as before.

The hook is a consumer bootstep that runs after Celery's ``Control`` step
has built the node's mailbox and before it starts listening: it gives the
mailbox a copy of Celery's handler table with those entries replaced
(Celery's global table is left alone).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import bootsteps
from celery.worker.control import control_command

from .._compat import (
    celery_revoke,
    control_commands,
    hidden_settings_filtered,
    pidbox_node,
)
from ..exceptions import MessageRejected
from ..wire.control import REVOKE_COMMAND, verified_revoke
from ..wire.protocol import INFO_COMMAND, STOP_SIGNAL
from ..wire.signing import Signer
from .guard import mark_stopped
from .settings import CONF_KEY

__all__ = ["ControlGuard", "guarded_handlers"]

logger = logging.getLogger(__name__)

# Control commands that change nothing but an event being sent.
_HARMLESS = {"heartbeat", REVOKE_COMMAND, INFO_COMMAND}
# Stop fits: authenticated senders only when the node has a secret.
_REVOKES = {"revoke", "terminate", "revoke_by_stamped_headers"}


def _refusal(name: str, why: str) -> Callable[..., dict[str, str]]:
    def refused(state: Any, **arguments: Any) -> dict[str, str]:
        logger.warning(
            "node refused the remote-control command %r (%s); arguments: %.200r",
            name, why, arguments,
        )  # fmt: skip
        return {"error": f"clustersearch node refuses {name!r}: {why}"}

    refused.__name__ = name
    return refused


def _conf_masked(original: Callable[..., Any]) -> Callable[..., Any]:
    def conf(state: Any, **arguments: Any) -> Any:
        return hidden_settings_filtered(original(state, **arguments))

    return conf


def _hello_without_revokes(original: Callable[..., Any]) -> Callable[..., Any]:
    def hello(state: Any, from_node: Any = None, revoked: Any = None, **arguments: Any) -> Any:
        if revoked:
            logger.info("ignored the %d revoked ids node %r sent", len(revoked), from_node)
        return original(state, from_node=from_node, **arguments)

    return hello


def guarded_handlers(handlers: dict[str, Any], *, allow: bool, signed: bool) -> dict[str, Any]:
    """A copy of the mailbox's ``handlers`` with what a node refuses replaced."""
    guarded = dict(handlers)
    if "conf" in guarded:
        guarded["conf"] = _conf_masked(guarded["conf"])
    if allow:
        return guarded
    if "hello" in guarded:
        guarded["hello"] = _hello_without_revokes(guarded["hello"])
    for name, kind in control_commands().items():
        if name not in guarded or kind != "control" or name in _HARMLESS:
            continue
        if name in _REVOKES:
            if signed:
                guarded[name] = _refusal(
                    name, "this node has a secret and takes revokes only signed with it "
                    "(clustersearch_revoke)")  # fmt: skip
        else:
            guarded[name] = _refusal(
                name, "state-changing remote control is off; start the node with "
                "'clustersearch worker --allow-remote-control' to allow it")  # fmt: skip
    return guarded


class ControlGuard(bootsteps.Step):
    """Consumer bootstep: installs :func:`guarded_handlers` in the node's mailbox."""

    requires = ("celery.worker.consumer.control:Control",)

    def create(self, c: Any) -> None:
        node = pidbox_node(c)
        if node is None:
            return
        settings = c.app.conf[CONF_KEY]
        node.handlers = guarded_handlers(
            node.handlers,
            allow=settings.allow_remote_control,
            signed=settings.secret is not None,
        )


@control_command(name=REVOKE_COMMAND, signature="task_ids auth")
def _clustersearch_revoke(state: Any, task_ids: Any = None, auth: Any = None, **_: Any) -> Any:
    settings = state.app.conf[CONF_KEY]
    try:
        ids = verified_revoke(Signer(settings.secret, max_age=settings.max_age_s), task_ids, auth)
    except MessageRejected as exc:
        logger.warning("node refused a revoke: %s", exc)
        return {"error": str(exc)}
    # Marked before the signal: a task taken but not yet fitting stops too.
    try:
        mark_stopped(settings.cache_dir, ids)
    except OSError:
        logger.warning("could not mark %d stopped tasks", len(ids), exc_info=True)
    return celery_revoke(state, ids, STOP_SIGNAL)
