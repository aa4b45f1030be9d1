"""How work and results travel: one kombu serializer, registered by name.

Task messages and results are pickled with cloudpickle, which sends classes
and functions defined in ``__main__`` or a notebook by value (plain pickle
sends only their name, which the nodes cannot import). The Celery envelope
and the remote-control channel (ping, inspect) stay JSON: only clustersearch's
own tasks use this content type, per message.
"""

import io
import pickle

import cloudpickle
from kombu.serialization import register

__all__ = ["CONTENT_TYPE", "SERIALIZER", "dumps", "loads"]

SERIALIZER = "clustersearch"
CONTENT_TYPE = "application/x-clustersearch-pickle"


def dumps(obj) -> bytes:
    """Serialize ``obj`` for a node (protocol 5, by value for ``__main__``)."""
    buffer = io.BytesIO()
    cloudpickle.CloudPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


def loads(data: bytes):
    """Inverse of :func:`dumps`."""
    return pickle.loads(data)


register(
    SERIALIZER,
    dumps,
    loads,
    content_type=CONTENT_TYPE,
    content_encoding="binary",
)
