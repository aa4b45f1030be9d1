"""The client: handles on a cluster and the dispatch of work to its nodes.

- :mod:`.cluster` (:class:`Cluster`) and :mod:`.local` (:class:`LocalCluster`):
  connect, find the nodes, check them, open sessions;
- :mod:`.policy`: the failure and scheduling policy, one value object;
- :mod:`.session`: one search's use of the cluster (what joblib talks to);
- :mod:`.dispatch`: the dispatcher thread and its broker I/O;
- :mod:`.membership`: which nodes get work, heartbeats, lost and joining
  nodes (plain objects, no threads);
- :mod:`.recovery`: retries, stragglers and deadlines as plain functions,
  the heartbeat thread, a lost node's queue;
- :mod:`.blobs`: the client's half of the data plane;
- :mod:`.backend`: the joblib backend; :mod:`.progress`: the progress line.

The client imports :mod:`clustersearch.wire`, never the node.
"""
