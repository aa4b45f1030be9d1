"""Errors raised by clustersearch.

Every error derives from :class:`ClusterSearchError`; the specific ones also
derive from the builtin that fits, so ``except ConnectionError`` still works.
Errors cross the broker, so each one pickles with its message intact.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BlobError",
    "BrokerUnreachableError",
    "CallbackNotSupportedError",
    "ClusterSearchError",
    "ConfigurationError",
    "JournalError",
    "MissingDependencyError",
    "NoWorkersError",
    "NodeFailureError",
    "NodeLostError",
    "PartLostError",
    "NodeStartupError",
    "MessageRejected",
    "NotPicklableError",
    "RemoteTraceback",
    "SecretMismatchError",
    "StoreFullError",
    "TreesOnNodesError",
    "VersionMismatchError",
]


class ClusterSearchError(Exception):
    """Root of every error raised by clustersearch."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        # Subclasses with several builtin bases (ConnectionError, OSError)
        # would otherwise be rebuilt from ``args`` with OSError's signature.
        return (type(self), (str(self),))


class BrokerUnreachableError(ClusterSearchError, ConnectionError):
    """The broker or the result backend did not accept a connection."""


class CallbackNotSupportedError(ClusterSearchError, ValueError):
    """A scikit-learn callback whose copies on the nodes could not report back."""


class ConfigurationError(ClusterSearchError, ValueError):
    """A setting is invalid: a policy value, a secret, a size."""


class JournalError(ClusterSearchError, ValueError):
    """A result journal cannot be used: not a journal, another format, damaged."""


class MissingDependencyError(ClusterSearchError, ImportError):
    """A broker or result backend needs a package that is not installed.

    The message names the package and the extra that brings it, e.g.
    ``pip install 'clustersearch[redis]'``.
    """


class NoWorkersError(ClusterSearchError, TimeoutError):
    """No clustersearch node answered on the broker."""


class NodeFailureError(ClusterSearchError, RuntimeError):
    """A fit was lost on every try: its worker process or its node died.

    The message names each node and what happened there. In a search it
    follows ``error_score`` like an exception raised by the fit itself.
    """


class NodeStartupError(ClusterSearchError, RuntimeError):
    """A worker process of a :class:`~clustersearch.LocalCluster` did not start."""


class NotPicklableError(ClusterSearchError, TypeError):
    """An estimator, scorer, splitter or parameter cannot be sent to the nodes."""


class RemoteTraceback(ClusterSearchError):
    """The traceback of an exception raised on a node.

    It is attached as ``__cause__`` of the exception re-raised in the client,
    so the node's traceback prints under the client's.
    """

    def __str__(self) -> str:
        return "\n" + super().__str__()


class VersionMismatchError(ClusterSearchError, RuntimeError):
    """A node runs versions that could change results or break unpickling."""


class SecretMismatchError(ClusterSearchError, PermissionError):
    """A node and the client do not hold the same secret (or one has none)."""


class MessageRejected(ClusterSearchError, PermissionError):
    """A message failed verification (signature, age, replay, size); nothing
    in it was unpickled."""


class BlobError(ClusterSearchError, RuntimeError):
    """A node could not fetch data (a blob) from the client."""


class NodeLostError(ClusterSearchError, ConnectionError):
    """Work pinned to one node (it needs what that node holds) could not run
    there: the node was lost, or never was among the live nodes. Pinned work
    never runs elsewhere; the caller decides where to ask next."""


class PartLostError(ClusterSearchError, RuntimeError):
    """Every copy of a part of a forest kept on the nodes is gone.

    The message names the part, its trees and the nodes that held it. A
    forest never answers with the parts it has left: refit it.
    """


class TreesOnNodesError(ClusterSearchError, AttributeError):
    """What needs a forest's trees (``apply``, ``feature_importances_``...)
    was asked of a forest whose trees stay on the nodes (``keep="nodes"``):
    call its ``to_local()``. An AttributeError, so that ``hasattr`` says
    such a forest has no ``feature_importances_``, as scikit-learn expects."""


class StoreFullError(ClusterSearchError, MemoryError):
    """A node's store of forest parts would exceed its bound (``clustersearch
    worker --store-size``); the message names the node and the limit."""
