"""The node: what a clustersearch worker runs.

- :mod:`.app` builds a node's Celery app from its :class:`~.settings.NodeSettings`;
- :mod:`.task` is the task every node runs (verify, fetch data, fit, sign);
- :mod:`.cache` is the node's blob cache;
- :mod:`.guard` lets the client's stop signal end a fit, never the node;
- :mod:`.pool` is Celery's prefork pool with a faster watch for dead
  processes, and the stuck-pool detector;
- :mod:`.control` answers the client's discovery and heartbeat.

The node imports :mod:`clustersearch.wire`, never the client.
"""
