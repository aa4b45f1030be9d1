"""Handles on a cluster: connect to the broker, find the nodes, open sessions.

:class:`Cluster` connects to a running cluster; :class:`LocalCluster` starts
real worker processes on this machine, over an embedded transport (kombu's
filesystem transport, in a private folder) unless given a broker.
"""

import atexit
import contextlib
import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from kombu import Connection

from ._lifeline import Lifeline
from ._progress import Progress, progress_enabled
from .exceptions import BrokerUnreachableError, NodeStartupError, NoWorkersError
from .worker import INFO_COMMAND, create_app, default_backend

__all__ = ["Cluster", "LocalCluster", "NodeInfo", "resolve_cluster"]


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
    secret : str or None
        A fingerprint of the node's secret (None: it accepts unsigned work).
    stalled_s : float
        For how long the node's pool has started no task while one waited and
        a process was free (0 for a healthy node).
    """

    name: str
    queue: str
    concurrency: int
    hostname: str
    host: str
    cpu_count: int
    pid: int
    versions: dict = field(default_factory=dict, compare=False)
    secret: str | None = field(default=None, compare=False)
    stalled_s: float = field(default=0.0, compare=False)

    @classmethod
    def from_reply(cls, info: dict) -> "NodeInfo":
        queues = [q for q in info.get("queues", []) if q.startswith("clustersearch.")]
        return cls(
            name=info["node"],
            queue=queues[0] if queues else "clustersearch." + info["node"],
            concurrency=int(info["concurrency"]),
            hostname=info.get("hostname") or info["node"],
            host=info.get("host", ""),
            cpu_count=int(info.get("cpu_count") or 0),
            pid=int(info.get("pid") or 0),
            versions=dict(info.get("versions", {})),
            secret=info.get("secret"),
            stalled_s=float(info.get("stalled_s") or 0.0),
        )


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
    discovery_timeout : float, default=1.0
        Seconds to wait for nodes to answer when looking for them.
    connect_timeout : float, default=5.0
        Seconds to wait for the broker before giving up with
        :class:`~clustersearch.exceptions.BrokerUnreachableError`.
    queued_per_node : int, default=1
        Batches a node may hold beyond its concurrency, so that it never
        idles while its next fit travels.
    progress : bool, default=None
        Show a progress bar during fits; None shows it on a terminal or in a
        notebook.
    heartbeat_interval : float, default=5.0
        During a search the client asks every node for its info this often
        (seconds). The same broadcast finds nodes that join mid-search: they
        get work at once.
    missed_heartbeats : int, default=3
        Consecutive unanswered heartbeats after which a node counts as lost:
        its unfinished work is sent to the other nodes, its stale copies are
        revoked and taken out of its queue, and its late results are ignored.
        A lost node that answers again rejoins. Detection takes
        ``missed_heartbeats - 1`` to ``missed_heartbeats`` intervals, plus
        the wait for replies (the interval, at most one second).
    max_retries : int, default=2
        A batch of fits whose worker process or node died is sent again (call
        by call, preferably to other nodes) at most this many times. A fit
        lost ``max_retries + 1`` times (one that runs out of memory on every
        node) ends as scikit-learn's ``error_score`` entry, its reason a
        :class:`~clustersearch.exceptions.NodeFailureError` naming each node
        and what happened there (``error_score="raise"`` raises it).
    no_node_timeout : float, default=30.0
        With every node lost, or the broker unreachable, for this long
        (seconds) the search fails with NoWorkersError (or
        BrokerUnreachableError) instead of waiting.
    straggler_factor : float or None, default=3.0
        When no batch waits to be sent and a node is idle, a batch in flight
        for more than ``straggler_factor`` times the median batch time (and
        at least a second) is sent to the idle node as well; the first result
        wins and the other copy is revoked. None turns this off.
    reconnect_grace : float, default=10.0
        After the broker comes back, nodes get this long (seconds) to
        reconnect before their silence counts as missed heartbeats.
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
        broker_url,
        backend=None,
        *,
        discovery_timeout=1.0,
        connect_timeout=5.0,
        queued_per_node=1,
        progress=None,
        heartbeat_interval=5.0,
        missed_heartbeats=3,
        max_retries=2,
        no_node_timeout=30.0,
        straggler_factor=3.0,
        reconnect_grace=10.0,
        secret=None,
        check_versions=True,
    ):
        from ._signing import Signer, load_secret

        self.broker_url = broker_url
        self.backend = backend
        self.discovery_timeout = discovery_timeout
        self.connect_timeout = connect_timeout
        self.queued_per_node = queued_per_node
        self.progress = progress
        self.heartbeat_interval = heartbeat_interval
        self.missed_heartbeats = missed_heartbeats
        self.max_retries = max_retries
        self.no_node_timeout = no_node_timeout
        self.straggler_factor = straggler_factor
        self.reconnect_grace = reconnect_grace
        self.check_versions = check_versions
        # Never pickled (see __reduce__): a search sends this handle with
        # every task.
        self._signer = Signer(load_secret(secret))
        self._app = None
        self._app_lock = threading.Lock()
        self._checked = False

    # A search pickles itself into every task and clone() deep-copies its
    # parameters: both must share this handle, not copy its connections.
    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self

    def __reduce__(self):
        return (Cluster, (self.broker_url, self.backend), self._public_state())

    def _public_state(self):
        return {
            "discovery_timeout": self.discovery_timeout,
            "connect_timeout": self.connect_timeout,
            "queued_per_node": self.queued_per_node,
            "progress": self.progress,
            "heartbeat_interval": self.heartbeat_interval,
            "missed_heartbeats": self.missed_heartbeats,
            "max_retries": self.max_retries,
            "no_node_timeout": self.no_node_timeout,
            "straggler_factor": self.straggler_factor,
            "reconnect_grace": self.reconnect_grace,
            "check_versions": self.check_versions,
        }

    def __setstate__(self, state):
        from ._signing import Signer

        self.__dict__.update(state)
        # A handle unpickled on a node holds no secret.
        self.__dict__.setdefault("_signer", Signer(None))
        self.__dict__.setdefault("_app", None)
        self.__dict__.setdefault("_app_lock", threading.Lock())
        self.__dict__.setdefault("_checked", False)

    def __repr__(self):
        return f"{type(self).__name__}({redact(self.broker_url)!r})"

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    @property
    def app(self):
        """The client's Celery app (created on first use, never the default app)."""
        with self._app_lock:
            if self._app is None:
                self._app = create_app(self.broker_url, self.backend)
            return self._app

    @property
    def backend_url(self) -> str:
        return self.backend or default_backend(self.broker_url)

    def check_connection(self) -> None:
        """Raise BrokerUnreachableError unless the broker and backend answer."""
        conn = None
        try:
            conn = self.app.connection_for_write()
            conn.ensure_connection(max_retries=1, timeout=self.connect_timeout)
        except Exception as exc:
            raise BrokerUnreachableError(
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
                Connection(self.backend_url, connect_timeout=self.connect_timeout).ensure_connection(
                    max_retries=1, timeout=self.connect_timeout
                )
            except Exception as exc:
                raise BrokerUnreachableError(
                    f"cannot reach the result backend at {redact(self.backend_url)!r}: "
                    f"{exc}. Check that Redis runs and that this machine can reach it"
                ) from exc

    def nodes(self, timeout=None):
        """The live nodes, sorted by name.

        Parameters
        ----------
        timeout : float, default=None
            Seconds to wait for answers; None uses ``discovery_timeout``.

        Returns
        -------
        list of NodeInfo
        """
        if not self._checked:
            self.check_connection()
            self._checked = True
        ask = functools.partial(
            self.app.control.broadcast,
            INFO_COMMAND,
            reply=True,
            timeout=self.discovery_timeout if timeout is None else timeout,
            **self._broadcast_scope(),
        )
        try:
            replies = ask()
        except Exception as exc:
            from ._recovery import is_connection_error

            if not is_connection_error(exc):
                raise
            # A pooled connection that died with the broker (a restart since
            # the last search) fails once; the pool reconnects on next use.
            replies = ask()
        found = {}
        for reply in replies or ():
            for info in reply.values():
                if isinstance(info, dict) and "node" in info:
                    node = NodeInfo.from_reply(info)
                    found[node.name] = node
        return [found[name] for name in sorted(found)]

    def _broadcast_scope(self) -> dict:
        return {}

    def require_nodes(self):
        """The live nodes; NoWorkersError naming the broker when there is none."""
        nodes = self.nodes()
        if not nodes:
            raise NoWorkersError(
                f"no clustersearch node answered on {redact(self.broker_url)!r} "
                f"within {self.discovery_timeout} s. Start one on each machine "
                f"with 'clustersearch worker --broker {redact(self.broker_url)}', "
                "or raise discovery_timeout for a slow network"
            )
        return nodes

    @contextlib.contextmanager
    def session(self, *, verbose=0):
        """Open a dispatch session on the live nodes (used by the estimators)."""
        from ._scheduler import Session

        nodes = self.require_nodes()
        check_nodes(nodes, self._signer, check_versions=self.check_versions)
        progress = Progress(progress_enabled(self.progress))
        session = Session(
            self.app,
            nodes,
            queued_per_node=self.queued_per_node,
            progress=progress,
            heartbeat_interval=self.heartbeat_interval,
            missed_heartbeats=self.missed_heartbeats,
            broker=redact(self.broker_url),
            discover=lambda timeout: self.nodes(timeout=timeout),
            max_retries=self.max_retries,
            no_node_timeout=self.no_node_timeout,
            straggler_factor=self.straggler_factor,
            reconnect_grace=self.reconnect_grace,
            signer=self._signer,
            # A node that joins mid-search passes the same checks first.
            admit=lambda node: check_nodes(
                [node], self._signer, check_versions=self.check_versions
            ),
        )
        try:
            yield session
        finally:
            session.close()

    @contextlib.contextmanager
    def joblib(self):
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

        from ._backend import ClusterBackend

        with self.session() as session:
            with parallel_config(backend=ClusterBackend(session)):
                yield session

    def close(self):
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


def _prefix(version, parts):
    return tuple(str(version).split(".")[:parts] if parts else str(version).split("."))


def check_nodes(nodes, signer, *, check_versions=True):
    """Refuse, before any work is sent, nodes this client cannot work with:
    another secret, or versions that could change results or break
    unpickling."""
    from .exceptions import SecretMismatchError, VersionMismatchError
    from .worker import local_versions

    mine = signer.fingerprint()
    for node in nodes:
        if node.secret != mine:
            if mine is None:
                why = ("it requires signed work and this client has no secret: pass "
                       "Cluster(secret=...) or set CLUSTERSEARCH_SECRET")  # fmt: skip
            elif node.secret is None:
                why = ("this client signs its work but the node has no secret: start "
                       "it with 'clustersearch worker --secret-file FILE' holding the "
                       "same secret")  # fmt: skip
            else:
                why = "it holds a different secret than this client"
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


class LocalCluster(Cluster):
    """Start clustersearch nodes on this machine.

    Each node is a real ``clustersearch worker`` process, started the way a
    user starts one. Without ``broker_url`` they talk over an embedded
    transport (kombu's filesystem transport, in a private temporary folder)
    that needs no server.

    Parameters
    ----------
    n_workers : int, default=None
        Nodes to start; None starts one per CPU core.
    concurrency : int, default=1
        Worker processes per node.
    broker_url : str, default=None
        A broker to start the nodes on instead of the embedded transport.
    backend : str, default=None
        Result backend, as for :class:`Cluster`.
    startup_timeout : float, default=60.0
        Seconds to wait for every node to answer.
    allow_root : bool, default=None
        Let the nodes run as root. None allows it for the embedded transport
        only, whose folder no other user can write to.
    loglevel : str, default="WARNING"
    cache_size : int or str, default=None
        Bound of the nodes' data cache (``"2GB"``, ``"512MiB"``, bytes);
        None is the worker's default, 2 GiB. The nodes of one LocalCluster
        share one cache folder, as the nodes of one machine do by default.
    **kwargs
        Passed to :class:`Cluster`.

    Attributes
    ----------
    node_names : list of str
    directory : str
        The private folder (embedded transport, node logs, data cache).
    cache_dir : str
        The nodes' data cache.

    Examples
    --------
    >>> from clustersearch import LocalCluster, ClusterGridSearchCV
    >>> with LocalCluster(n_workers=2) as cluster:  # doctest: +SKIP
    ...     ClusterGridSearchCV(estimator, grid, cluster=cluster).fit(X, y)
    """

    def __init__(
        self,
        n_workers=None,
        *,
        concurrency=1,
        broker_url=None,
        backend=None,
        startup_timeout=60.0,
        allow_root=None,
        loglevel="WARNING",
        cache_size=None,
        **kwargs,
    ):
        from ._signing import load_secret

        self.n_workers = n_workers if n_workers is not None else (os.cpu_count() or 1)
        self.cache_size = cache_size
        if kwargs.get("secret") is None and load_secret() is None:
            # Signed by default: only this client can give these nodes work.
            kwargs["secret"] = secrets.token_hex(32)
        self.concurrency = concurrency
        self.startup_timeout = startup_timeout
        self.loglevel = loglevel
        self.directory = tempfile.mkdtemp(prefix="clustersearch-")
        self.cache_dir = str(Path(self.directory, "cache"))
        embedded = broker_url is None
        if embedded:
            broker_url = "filesystem://" + str(Path(self.directory, "transport"))
        self.allow_root = embedded if allow_root is None else allow_root
        super().__init__(broker_url, backend, **kwargs)
        token = os.path.basename(self.directory).rsplit("-", 1)[-1][:6].lower()
        self.node_names = [f"local{i}-{token}" for i in range(self.n_workers)]
        self._procs = []
        # The nodes end when it closes, also when this process dies unawares.
        self._lifeline = Lifeline()
        self._finalizer = weakref.finalize(
            self, _stop, self._procs, self.directory, self._lifeline
        )
        try:
            self._start()
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    @property
    def secret(self) -> str:
        """The secret these nodes hold: give it to other clients of theirs
        (``Cluster(broker_url, secret=...)``)."""
        return os.fsdecode(self._signer.secret)

    def __reduce__(self):
        # On a node (a search pickles itself) this is only a reference.
        return (Cluster, (self.broker_url, self.backend), self._public_state())

    def __repr__(self):
        return f"LocalCluster(n_workers={self.n_workers}, broker={redact(self.broker_url)!r})"

    def nodes(self, timeout=None):
        if not self._finalizer.alive:
            # Closed: its nodes are stopped, and asking would build its
            # removed folder again (a search still running asks).
            return []
        return super().nodes(timeout)

    def _broadcast_scope(self):
        host = _hostname()
        return {
            "destination": [f"{name}@{host}" for name in self.node_names],
            "limit": len(self.node_names),
        }

    def _start(self):
        logs = Path(self.directory, "logs")
        logs.mkdir(exist_ok=True)
        # The nodes share this machine's cores: cap each fit's BLAS/OpenMP
        # threads to its share, or n nodes would each use every core.
        env = dict(os.environ)
        processes = max(1, self.n_workers * self.concurrency)
        env["CLUSTERSEARCH_THREADS_PER_PROCESS"] = str(max(1, (os.cpu_count() or 1) // processes))
        # The secret travels in the environment, never on a command line.
        env.pop("CLUSTERSEARCH_SECRET_FILE", None)
        env["CLUSTERSEARCH_SECRET"] = os.fsdecode(self._signer.secret)
        for name in self.node_names:
            cmd = [
                sys.executable, "-m", "clustersearch", "worker",
                "--broker", self.broker_url,
                "--name", name,
                "--concurrency", str(self.concurrency),
                "--loglevel", self.loglevel,
                "--cache-dir", self.cache_dir,
            ]  # fmt: skip
            if self.cache_size is not None:
                cmd += ["--cache-size", str(self.cache_size)]
            if self.backend:
                cmd += ["--backend", self.backend]
            if self.allow_root:
                cmd.append("--allow-root")
            cmd += self._lifeline.node_args(self.directory)
            log = open(logs / f"{name}.log", "ab")
            try:
                # A session of its own: Ctrl-C in the client does not stop it.
                proc = subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                    pass_fds=self._lifeline.pass_fds,
                )
            finally:
                log.close()
            self._procs.append(proc)
        self._lifeline.started()

    def _wait_ready(self):
        deadline = time.monotonic() + self.startup_timeout
        while True:
            for name, proc in zip(self.node_names, self._procs):
                if proc.poll() is not None:
                    raise NodeStartupError(
                        f"node {name!r} exited with code {proc.returncode} while "
                        f"starting; its log says:\n{self.log(name)[-3000:]}"
                    )
            found = {node.name for node in self.nodes(timeout=0.5)}
            if found >= set(self.node_names):
                return
            if time.monotonic() > deadline:
                missing = sorted(set(self.node_names) - found)
                raise NodeStartupError(
                    f"nodes {missing} did not answer within {self.startup_timeout} s; "
                    f"the first one's log says:\n{self.log(missing[0])[-3000:]}"
                )

    def log(self, name) -> str:
        """The log of node ``name`` so far."""
        path = Path(self.directory, "logs", f"{name}.log")
        return path.read_text(errors="replace") if path.exists() else ""

    @property
    def processes(self):
        """The nodes' main processes (``subprocess.Popen``), by node name."""
        return dict(zip(self.node_names, self._procs))

    def close(self):
        """Stop the nodes and remove the private folder."""
        super().close()
        self._finalizer()


def _hostname():
    import socket

    return socket.gethostname()


def _stop(procs, directory, lifeline):
    # The nodes stop on their own when the lifeline closes; the signals below
    # are for a node that does not.
    lifeline.close()
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                # Cold shutdown: running fits are abandoned, not waited for.
                os.killpg(proc.pid, signal.SIGQUIT)
    deadline = time.monotonic() + 10
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    shutil.rmtree(directory, ignore_errors=True)


# -- cluster=None and cluster="amqp://..." -------------------------------------

_default_lock = threading.Lock()
_default_local = None
_by_url = {}


def resolve_cluster(value):
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
