"""Handles on a cluster: connect to the broker, find the nodes, open sessions.

:class:`Cluster` connects to a running cluster; :class:`LocalCluster` starts
real worker processes on this machine, over an embedded transport (kombu's
filesystem transport, in a private folder) unless given a broker.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import html
import logging
import os
import secrets
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from kombu import Connection

from .._compat import broadcast_until
from .._optional import check_url, missing_dependency
from ..exceptions import (
    BrokerUnreachableError,
    ConfigurationError,
    NoWorkersError,
    SecretMismatchError,
    VersionMismatchError,
)
from ..wire.config import create_app, default_backend
from ..wire.protocol import INFO_COMMAND, local_versions, node_name, queue_for
from ..wire.signing import Signer, load_secret
from .backend import ClusterBackend
from .policy import Policy
from .progress import Progress, progress_enabled
from .recovery import is_connection_error
from .session import Session

if TYPE_CHECKING:
    from celery import Celery
    from typing_extensions import Self

    from .local import LocalCluster

__all__ = ["Cluster", "NodeInfo", "check_nodes", "redact", "resolve_cluster"]

logger = logging.getLogger(__name__)

# A heartbeat round ends once every node it expects answered, after a
# quarter as long again (for nodes that join), and at least this long after.
_JOIN_WAIT = 0.25
_MIN_JOIN_WAIT_S = 0.005
# When no node answers discovery, it is asked again for this many times
# discovery_timeout before NoWorkersError.
_RETRY_FACTOR = 3


@dataclass(frozen=True)
class NodeInfo:
    """A live node, as it describes itself.

    Attributes
    ----------
    name : str
        The node's name; its queue is ``clustersearch.<name>``.
    queue : str
    concurrency : int
        Worker processes, i.e. fits at a time.
    hostname : str
        Celery's name for the node's worker (``name@host``).
    host : str
        The machine's host name.
    cpu_count : int
    pid : int
        The node's main worker process.
    versions : dict
        Python, clustersearch, scikit-learn, numpy, joblib, celery and
        cloudpickle.
    signed : bool
        Whether the node requires signed work. A client with a secret admits
        such a node only once it answered a fresh challenge with that secret
        (:meth:`Cluster.nodes`).
    stalled_s : float
        For how long the node's pool has started no task while one waited and
        a process was free (0 for a healthy node).
    consuming : bool
        Whether the node takes work from its queue (False after a
        ``cancel_consumer``: it answers, but runs nothing).
    store_bytes : int
        Bytes of forest parts the node keeps for forests fitted with
        ``keep="nodes"`` (its store, ``clustersearch worker --store-size``).
    store_limit : int
        The bound of that store (0: not reported).
    running : int
        Tasks (batches of fits) the node's pool runs now.
    queued : int
        Tasks the node holds that have not started.
    fits_done : int
        Fits the node's processes finished since it started.
    mean_fit_s : float
        Their mean duration in seconds (0 before the first).
    cache_bytes : int
        Bytes of data in the node's cache folder.
    cache_limit : int
        The cache's bound (``clustersearch worker --cache-size``; 0: not
        reported).
    memory_pss : int
        Bytes of memory the node's processes hold together (their
        proportional set size: a page shared by n processes counts 1/n to
        each); 0 unless asked (``Cluster.nodes(memory=True)``) or not on
        Linux.
    memory_data : int
        The part of ``memory_pss`` that maps the node's cached data (shared
        by its processes, and given back to the kernel under pressure).
    """

    name: str
    queue: str
    concurrency: int
    hostname: str
    host: str
    cpu_count: int
    pid: int
    versions: dict = field(default_factory=dict, compare=False)
    signed: bool = field(default=False, compare=False)
    stalled_s: float = field(default=0.0, compare=False)
    consuming: bool = field(default=True, compare=False)
    store_bytes: int = field(default=0, compare=False)
    store_limit: int = field(default=0, compare=False)
    running: int = field(default=0, compare=False)
    queued: int = field(default=0, compare=False)
    fits_done: int = field(default=0, compare=False)
    mean_fit_s: float = field(default=0.0, compare=False)
    cache_bytes: int = field(default=0, compare=False)
    cache_limit: int = field(default=0, compare=False)
    memory_pss: int = field(default=0, compare=False)
    memory_data: int = field(default=0, compare=False)

    @classmethod
    def from_reply(cls, info: Any) -> NodeInfo:
        """The node an info reply describes; ValueError (saying what is
        wrong) for a reply that is not a valid one: the client ignores it."""
        if not isinstance(info, dict):
            raise ValueError(f"the reply is a {type(info).__name__}, not a dict")
        name = _field(info, "node", str, required=True)
        if not name or "/" in name or len(name) > 200:
            raise ValueError("the node name is empty, too long or has a '/'")
        queues = _field(info, "queues", list) or []
        queues = [q for q in queues if isinstance(q, str) and q.startswith("clustersearch.")]
        concurrency = _field(info, "concurrency", int, required=True)
        if concurrency < 1:
            raise ValueError(f"concurrency {concurrency!r} is not at least 1")
        stalled = _duration(info, "stalled_s")
        store = [_field(info, key, int) or 0 for key in ("store_bytes", "store_limit")]
        if min(store) < 0:
            raise ValueError(f"store sizes {store!r} are negative")
        counts = {key: _field(info, key, int) or 0 for key in _COUNTS}
        negative = [key for key, value in counts.items() if value < 0]
        if negative:
            raise ValueError(f"{negative[0]!r} is negative")
        mean_fit = _duration(info, "mean_fit_s")
        versions = _field(info, "versions", dict) or {}
        if not all(isinstance(k, str) and isinstance(v, str | None) for k, v in versions.items()):
            raise ValueError("versions is not a mapping of names to version strings")
        return cls(
            name=name,
            queue=queues[0] if queues else queue_for(name),
            concurrency=concurrency,
            hostname=_field(info, "hostname", str) or name,
            host=_field(info, "host", str) or "",
            cpu_count=_field(info, "cpu_count", int) or 0,
            pid=_field(info, "pid", int) or 0,
            versions=versions,
            signed=bool(_field(info, "signed", bool)),
            consuming=_field(info, "consuming", bool) is not False,
            stalled_s=stalled,
            store_bytes=store[0],
            store_limit=store[1],
            mean_fit_s=mean_fit,
            **counts,
        )


# Counters a node reports for `clustersearch top`: non-negative integers.
_COUNTS = ("running", "queued", "fits_done", "cache_bytes", "cache_limit", "memory_pss",
           "memory_data")


def nodes_html(nodes: Sequence[NodeInfo]) -> str:
    """An HTML table of ``nodes`` (for notebooks)."""
    header = ("node", "host", "processes", "python", "scikit-learn", "clustersearch", "signed")
    rows = [
        (n.name, n.host, n.concurrency, n.versions.get("python", "?"),
         n.versions.get("scikit-learn", "?"), n.versions.get("clustersearch", "?"),
         "yes" if n.signed else "no")
        for n in nodes
    ]  # fmt: skip
    cells = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    total = sum(n.concurrency for n in nodes)
    return (
        "<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr></thead>"
        f"<tbody>{cells}</tbody></table><small>{len(nodes)} nodes, {total} worker processes</small>"
    )


def _duration(info: dict, key: str) -> float:
    """Field ``key`` of ``info`` as seconds (0.0 when absent)."""
    value = _field(info, key, (int, float)) or 0
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float
        seconds = float("inf")
    if not 0 <= seconds < float("inf"):
        raise ValueError(f"{key!r} is not a duration")
    return seconds


def _field(info: dict, key: str, kind: Any, required: bool = False) -> Any:
    value = info.get(key)
    if value is None:
        if required:
            raise ValueError(f"{key!r} is missing")
        return None
    # bool is an int to isinstance: a concurrency of True is not one.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        # The value is the sender's: not repeated.
        raise ValueError(f"{key!r} is a {type(value).__name__}, not {getattr(kind, '__name__', kind)}")
    return value


def redact(url: str) -> str:
    """``url`` with its password masked, for messages and reprs."""
    parsed = urlparse(url)
    if parsed.password:
        netloc = parsed.netloc.replace(":" + parsed.password + "@", ":**@", 1)
        return parsed._replace(netloc=netloc).geturl()
    return url


class Cluster:
    """A handle on a running clustersearch cluster.

    Parameters
    ----------
    broker_url : str
        The Celery broker, e.g. ``"amqp://user:password@broker-host//"``,
        ``"redis://broker-host:6379/0"`` or ``"filesystem:///shared/folder"``.
    backend : str, default=None
        Celery result backend. None picks ``rpc://`` for RabbitMQ, the broker
        itself for Redis, and a ``results`` folder for ``filesystem://``.
    policy : Policy, default=None
        How failures are handled and work is scheduled (heartbeats, retries,
        stragglers, timeouts); None is ``Policy()``.
    progress : bool, default=None
        Show a progress bar during fits; None shows it on a terminal or in a
        notebook.
    **settings
        Fields of :class:`~clustersearch.Policy` that replace those of
        ``policy``: ``discovery_timeout``, ``connect_timeout``,
        ``queued_per_node``, ``heartbeat_interval``, ``missed_heartbeats``,
        ``max_retries``, ``no_node_timeout``, ``straggler_factor``,
        ``reconnect_grace``. Each reads back as an attribute
        (``cluster.max_retries``).
    secret : str or bytes, default=None
        Shared secret that signs work and verifies results (HMAC-SHA256);
        None reads ``$CLUSTERSEARCH_SECRET`` (or the file named by
        ``$CLUSTERSEARCH_SECRET_FILE``), and without either messages are not
        signed. Nodes must hold the same one (``clustersearch worker
        --secret-file``). See README, "Security".
    check_versions : bool, default=True
        Before the first fit, compare every node's Python, scikit-learn,
        numpy, joblib, cloudpickle and clustersearch versions with this
        client's, and refuse (VersionMismatchError) where a difference could
        change results or break unpickling. False skips the check.

    See Also
    --------
    LocalCluster : starts worker processes on this machine.
    Policy : the failure and scheduling settings.

    Examples
    --------
    >>> from clustersearch import Cluster, ClusterGridSearchCV
    >>> cluster = Cluster("amqp://remote:secret@pine0//")  # doctest: +SKIP
    >>> cluster.nodes()  # doctest: +SKIP
    [NodeInfo(name='pine1', queue='clustersearch.pine1', concurrency=4, ...), ...]
    >>> search = ClusterGridSearchCV(estimator, grid, cluster=cluster)  # doctest: +SKIP
    """

    def __init__(
        self,
        broker_url: str,
        backend: str | None = None,
        *,
        policy: Policy | None = None,
        progress: bool | None = None,
        secret: str | bytes | None = None,
        check_versions: bool = True,
        **settings: Any,
    ) -> None:
        unknown = sorted(set(settings) - set(Policy.field_names()))
        if unknown:
            raise ConfigurationError(
                f"Cluster() got unexpected keyword arguments {unknown}; the policy "
                f"settings are {list(Policy.field_names())}"
            )
        self.broker_url = broker_url
        self.backend = backend
        self.policy = (policy or Policy()).replace(**settings)
        self.progress = progress
        self.check_versions = check_versions
        # Never pickled (see __reduce__).
        self._signer = Signer(load_secret(secret))
        self._app: Celery | None = None
        self._app_lock = threading.Lock()
        self._checked = False
        self._refused: list[NodeInfo] = []

    def __getattr__(self, name: str) -> Any:
        # The policy's settings read as the cluster's own (cluster.max_retries).
        if name in Policy.field_names() and "policy" in self.__dict__:
            return getattr(self.policy, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # clone() deep-copies a search's parameters: it must share this handle,
    # not copy its connections.
    def __deepcopy__(self, memo: dict[int, Any]) -> Cluster:
        return self

    def __copy__(self) -> Cluster:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (Cluster, (self.broker_url, self.backend), self._public_state())

    def _public_state(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "progress": self.progress,
            "check_versions": self.check_versions,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        # A handle unpickled on a node holds no secret.
        self.__dict__.setdefault("_signer", Signer(None))
        self.__dict__.setdefault("_app", None)
        self.__dict__.setdefault("_app_lock", threading.Lock())
        self.__dict__.setdefault("_checked", False)
        self.__dict__.setdefault("_refused", [])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({redact(self.broker_url)!r})"

    def _repr_html_(self) -> str:
        """A notebook's view: the broker and a table of the live nodes (asks them)."""
        head = f"<b>{html.escape(type(self).__name__)}</b> <code>{html.escape(redact(self.broker_url))}</code>"
        try:
            nodes = self.nodes()
        except Exception as exc:  # shown, not raised: a repr must not fail
            return f"{head}<br>no answer: <code>{html.escape(str(exc))}</code>"
        return head + nodes_html(nodes)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def app(self) -> Celery:
        """The client's Celery app (created on first use, never the default app)."""
        with self._app_lock:
            if self._app is None:
                self._app = create_app(self.broker_url, self.backend)
            return self._app

    @property
    def backend_url(self) -> str:
        return self.backend or default_backend(self.broker_url)

    def check_connection(self) -> None:
        """Raise BrokerUnreachableError unless the broker and backend answer
        (MissingDependencyError when a package they need is missing)."""
        check_url(self.broker_url, "broker")
        check_url(self.backend_url, "result backend")
        conn = None
        try:
            conn = self.app.connection_for_write()
            conn.ensure_connection(max_retries=1, timeout=self.policy.connect_timeout)
        except Exception as exc:
            raise missing_dependency(exc, self.broker_url, "broker") or BrokerUnreachableError(
                f"cannot reach the broker at {redact(self.broker_url)!r}: {exc}. "
                "Check that it runs, that this machine can reach its host and "
                "port, and the user name and password in the URL"
            ) from exc
        finally:
            if conn is not None:
                conn.release()
        scheme = urlparse(self.backend_url).scheme
        if scheme in ("redis", "rediss"):
            try:
                timeout = self.policy.connect_timeout
                Connection(self.backend_url, connect_timeout=timeout).ensure_connection(
                    max_retries=1, timeout=timeout
                )
            except Exception as exc:
                missing = missing_dependency(exc, self.backend_url, "result backend")
                raise missing or BrokerUnreachableError(
                    f"cannot reach the result backend at {redact(self.backend_url)!r}: "
                    f"{exc}. Check that Redis runs and that this machine can reach it"
                ) from exc

    def nodes(
        self,
        timeout: float | None = None,
        *,
        expect: Collection[str] | None = None,
        memory: bool = False,
    ) -> list[NodeInfo]:
        """The live nodes, sorted by name.

        Parameters
        ----------
        timeout : float, default=None
            Seconds to wait for answers; None uses ``discovery_timeout``.
        expect : collection of str, default=None
            Names of the nodes expected to answer (a heartbeat): once each
            has, the round ends after a quarter as long again (for nodes
            that join) instead of waiting out ``timeout``.
        memory : bool, default=False
            Ask each node for its memory (``NodeInfo.memory_pss``), which
            takes it tens of milliseconds.

        Returns
        -------
        list of NodeInfo
        """
        if not self._checked:
            self.check_connection()
            self._checked = True
        timeout = self.policy.discovery_timeout if timeout is None else timeout
        found, refused = self._ask(timeout, expect, memory)
        self._refused = [refused[name] for name in sorted(set(refused) - set(found))]
        return [found[name] for name in sorted(found)]

    def _ask(
        self, timeout: float, expect: Collection[str] | None, memory: bool
    ) -> tuple[dict[str, NodeInfo], dict[str, NodeInfo]]:
        """One info broadcast: the valid nodes, and those that failed the
        challenge."""
        # The challenge: a node with a secret answers with an HMAC over this
        # fresh nonce and its whole reply (node/control.py, sign_info).
        nonce = secrets.token_hex(16)
        arguments: dict[str, Any] = {"nonce": nonce}
        if memory:
            arguments["memory"] = True
        destination = self._destination()
        expected = {node_name(h) for h in destination} if destination else set(expect or ())
        found: dict[str, NodeInfo] = {}
        refused: dict[str, NodeInfo] = {}
        start = time.monotonic()

        def on_reply(reply: Any) -> float | None:
            for info in reply.values() if isinstance(reply, dict) else (reply,):
                node = self._admitted(info, nonce, refused)
                if node is not None:
                    found[node.name] = node
            if not expected or not expected <= found.keys():
                return None
            if destination:
                return time.monotonic()  # nobody else is asked
            # Every expected node answered (a heartbeat): not the whole
            # timeout (Celery would wait it out, without a limit); a quarter
            # as long again for a node that joins, which answers about as
            # fast, so in a random place among the others (the heartbeat
            # waits out the timeout every few rounds, for a slower one).
            now = time.monotonic()
            return now + max((now - start) * _JOIN_WAIT, _MIN_JOIN_WAIT_S)

        ask = functools.partial(
            broadcast_until, self.app, INFO_COMMAND, arguments, timeout, on_reply, destination
        )
        try:
            ask()
        except Exception as exc:
            if not is_connection_error(exc):
                raise
            # A pooled connection that died with the broker (a restart since
            # the last search) fails once; the pool reconnects on next use.
            ask()
        return found, refused

    def _admitted(self, info: Any, nonce: str, refused: dict[str, NodeInfo]) -> NodeInfo | None:
        """The node an info reply describes, if it is valid and proves this
        client's secret (those that do not are added to ``refused``)."""
        try:
            node = NodeInfo.from_reply(info)
        except ValueError as exc:
            logger.warning("ignored an info reply that is not a valid node's: %s", exc)
            return None
        if self._signer.enabled and not (node.signed and self._signer.check_proof(nonce, info)):
            # No secret, another one, or a reply replayed or forged by
            # someone who can publish to the broker.
            logger.warning(
                "ignored node %r: its reply does not prove this client's secret "
                "(%s)", node.name,
                "another secret, or a forged or replayed reply" if node.signed
                else "it says it has no secret",
            )  # fmt: skip
            refused[node.name] = node
            return None
        return node

    def _destination(self) -> list[str] | None:
        """The Celery hostnames asked (None: every node on the broker)."""
        return None

    def require_nodes(self) -> list[NodeInfo]:
        """The live nodes; NoWorkersError naming the broker when there is none."""
        nodes = self.nodes()
        if not nodes and not self._refused:
            # Nobody answered in time: a loaded machine, or boards busy with
            # another client's fits, can answer late. Asked once more, for
            # longer, before giving up (only this path pays for it).
            logger.info("no node answered within %s s; asking again for %s s",
                        self.policy.discovery_timeout, _RETRY_FACTOR * self.policy.discovery_timeout)  # fmt: skip
            nodes = self.nodes(timeout=_RETRY_FACTOR * self.policy.discovery_timeout)
        idle = [node.name for node in nodes if not node.consuming]
        if idle:
            logger.warning("nodes %s answer but do not consume their queues (a remote "
                           "cancel_consumer?): left out; restart them", idle)  # fmt: skip
            nodes = [node for node in nodes if node.consuming]
        if not nodes and self._refused:
            # Says so when a node has no secret; else a wrong proof.
            check_nodes(self._refused[:1], self._signer, check_versions=False)
            raise SecretMismatchError(
                f"node {self._refused[0].name!r} cannot take work: it holds a different "
                "secret than this client (its answer to the challenge does not match "
                "this client's secret), or its reply was forged"
            )
        if not nodes:
            raise NoWorkersError(
                f"no clustersearch node answered on {redact(self.broker_url)!r} "
                f"within {self.policy.discovery_timeout} s, nor when asked again for "
                f"{_RETRY_FACTOR * self.policy.discovery_timeout} s. Start one on each machine "
                f"with 'clustersearch worker --broker {redact(self.broker_url)}', "
                "or raise discovery_timeout for a slow network"
            )
        return nodes

    @contextlib.contextmanager
    def session(self, *, verbose: int = 0, drop: object = None) -> Iterator[Session]:
        """Open a dispatch session on the live nodes (used by the estimators).

        ``drop`` is sent as None wherever it occurs in the work (see
        :class:`~clustersearch.client.session.Session`).
        """
        nodes = self.require_nodes()
        check_nodes(nodes, self._signer, check_versions=self.check_versions)
        session = Session(
            self.app,
            nodes,
            policy=self.policy,
            progress=Progress(progress_enabled(self.progress)),
            broker=redact(self.broker_url),
            discover=lambda timeout, expect: self.nodes(timeout=timeout, expect=expect),
            signer=self._signer,
            # A node that joins mid-search passes the same checks first.
            admit=lambda node: check_nodes(
                [node], self._signer, check_versions=self.check_versions
            ),
            drop=drop,
        )
        with session:
            yield session

    @contextlib.contextmanager
    def joblib(self) -> Iterator[Session]:
        """Run joblib-parallel code on the cluster inside this block.

        Every ``joblib.Parallel`` call in the block (scikit-learn's
        ``cross_validate``, ``permutation_importance``, a plain
        ``GridSearchCV``...) sends its batches to the nodes. Calls that ask
        for threads or shared memory stay local, in threads.

        Yields
        ------
        session : Session
            Its ``fits_per_node`` counts the calls each node ran.

        Examples
        --------
        >>> from sklearn.model_selection import cross_validate
        >>> with cluster.joblib():  # doctest: +SKIP
        ...     cross_validate(model, X, y, cv=5)
        """
        from joblib import parallel_config

        with self.session() as session:
            with parallel_config(backend=ClusterBackend(session)):
                yield session

    def close(self) -> None:
        """Release the client's connections."""
        with self._app_lock:
            app, self._app = self._app, None
        if app is not None:
            app.close()


# What must match between the client and a node: the number of version
# components compared (None: all of it).
_MUST_MATCH = {
    "python": 2,  # cloudpickle sends code by value: bytecode is per minor version
    "clustersearch": None,
    "scikit-learn": None,  # estimators pickle per version; results may differ
    "numpy": 2,
    "joblib": 2,
    "cloudpickle": 2,
}


def _prefix(version: object, parts: int | None) -> tuple[str, ...]:
    return tuple(str(version).split(".")[:parts] if parts else str(version).split("."))


def check_nodes(
    nodes: Sequence[NodeInfo], signer: Signer, *, check_versions: bool = True
) -> None:
    """Refuse, before any work is sent, nodes this client cannot work with:
    another secret, or versions that could change results or break
    unpickling."""
    for node in nodes:
        # Cluster.nodes admits a signed node only with a valid proof.
        if node.signed != signer.enabled:
            if not signer.enabled:
                why = ("it requires signed work and this client has no secret: pass "
                       "Cluster(secret=...) or set CLUSTERSEARCH_SECRET")  # fmt: skip
            else:
                why = ("this client signs its work but the node has no secret: start "
                       "it with 'clustersearch worker --secret-file FILE' holding the "
                       "same secret")  # fmt: skip
            raise SecretMismatchError(f"node {node.name!r} cannot take work: {why}")
    if not check_versions:
        return
    local = local_versions()
    for node in nodes:
        for package, parts in _MUST_MATCH.items():
            theirs = node.versions.get(package)
            if theirs is None or _prefix(theirs, parts) != _prefix(local[package], parts):
                raise VersionMismatchError(
                    f"node {node.name!r} has {package} {theirs or 'unknown'}, this client "
                    f"{local[package]}: results could differ or fail to unpickle. "
                    f"Install the same version on every node (pip install "
                    f"'{package}=={local[package]}' where it is a package), or pass "
                    "Cluster(check_versions=False) to go ahead anyway"
                )


# -- cluster=None and cluster="amqp://..." -------------------------------------

_default_lock = threading.Lock()
_default_local: LocalCluster | None = None
_by_url: dict[tuple[str, str | None], Cluster] = {}


def resolve_cluster(value: Cluster | str | None) -> Cluster:
    """The Cluster a search's ``cluster`` parameter stands for.

    None means ``CLUSTERSEARCH_BROKER_URL`` (with the optional
    ``CLUSTERSEARCH_RESULT_BACKEND``) when set, else one embedded
    LocalCluster per client process, started on first use.
    """
    global _default_local
    if isinstance(value, Cluster):
        return value
    if value is None:
        value = os.environ.get("CLUSTERSEARCH_BROKER_URL")
        if not value:
            with _default_lock:
                if _default_local is None:
                    from .local import LocalCluster

                    _default_local = LocalCluster()
                    atexit.register(_default_local.close)
                return _default_local
        backend = os.environ.get("CLUSTERSEARCH_RESULT_BACKEND")
    else:
        backend = None
    with _default_lock:
        key = (value, backend)
        if key not in _by_url:
            _by_url[key] = Cluster(value, backend)
        return _by_url[key]
