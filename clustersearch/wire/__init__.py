"""The wire: what the client and the nodes share.

Task and queue names, the shape of task and result messages, how payloads
are pickled (:mod:`.serialization`) and signed (:mod:`.signing`), the
embedded transport (:mod:`.transport`), the data plane's chunk format
(:mod:`.blobs`) and the Celery configuration both sides use
(:mod:`.config`). The client (:mod:`clustersearch.client`) and the node
(:mod:`clustersearch.node`) import this package, never each other.
"""
