"""The module ``celery -A clustersearch.worker worker`` loads.

A node is a Celery worker that consumes one queue of its own,
``clustersearch.<node>``, so that the client routes each piece of work to the
node it chose. Start one with ``clustersearch worker --broker URL`` or, with
Celery's own command line::

    CLUSTERSEARCH_BROKER_URL=amqp://user:pass@broker// \\
        celery -A clustersearch.worker worker -Q clustersearch.pine1 -n pine1@%h -c 4 \\
            --without-gossip --without-mingle --without-heartbeat

(the last three as ``clustersearch worker`` passes them: nodes need not
talk to each other, and with many nodes that chatter floods the broker).

It imports the node (:mod:`clustersearch.node`) and the wire, never the
client. The app is built from the environment (``CLUSTERSEARCH_BROKER_URL``,
``CLUSTERSEARCH_RESULT_BACKEND`` and the node settings of
:meth:`~clustersearch.node.settings.NodeSettings.from_environ`) when Celery
looks it up, never on import.
"""

from __future__ import annotations

import os
from typing import Any

__all__: list[str] = []


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        from .node.app import create_node_app
        from .node.settings import NodeSettings

        # ``celery -b URL`` sets CELERY_BROKER_URL before it looks up the app.
        broker = os.environ.get("CLUSTERSEARCH_BROKER_URL") or os.environ.get(
            "CELERY_BROKER_URL"
        )
        if not broker:
            raise AttributeError(
                "set CLUSTERSEARCH_BROKER_URL to the broker's URL before "
                "'celery -A clustersearch.worker worker'"
            )
        return create_node_app(
            broker, os.environ.get("CLUSTERSEARCH_RESULT_BACKEND"), NodeSettings.from_environ()
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
