"""A cluster on this machine: real worker processes, started as a user would.

Without a broker the nodes talk over an embedded transport (kombu's
filesystem transport, in a private folder) that needs no server.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Collection
from pathlib import Path
from typing import Any

from ..exceptions import NodeStartupError
from ..wire.signing import load_secret
from .cluster import Cluster, NodeInfo, redact
from .lifeline import Lifeline

__all__ = ["LocalCluster"]


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
    store_size : int or str, default=None
        Bound of each node's store of forest parts (``keep="nodes"``); None
        is the worker's default, 2 GiB.
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
        n_workers: int | None = None,
        *,
        concurrency: int = 1,
        broker_url: str | None = None,
        backend: str | None = None,
        startup_timeout: float = 60.0,
        allow_root: bool | None = None,
        loglevel: str = "WARNING",
        cache_size: int | str | None = None,
        store_size: int | str | None = None,
        **kwargs: Any,
    ) -> None:
        self.store_size = store_size
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
        assert broker_url is not None
        self.allow_root = embedded if allow_root is None else allow_root
        super().__init__(broker_url, backend, **kwargs)
        token = os.path.basename(self.directory).rsplit("-", 1)[-1][:6].lower()
        self.node_names = [f"local{i}-{token}" for i in range(self.n_workers)]
        self._procs: list[subprocess.Popen[bytes]] = []
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
        # A LocalCluster always has one (see __init__).
        assert self._signer.secret is not None
        return os.fsdecode(self._signer.secret)

    def __reduce__(self) -> tuple[Any, ...]:
        # On a node (a search pickles itself) this is only a reference.
        return (Cluster, (self.broker_url, self.backend), self._public_state())

    def __repr__(self) -> str:
        return f"LocalCluster(n_workers={self.n_workers}, broker={redact(self.broker_url)!r})"

    def nodes(
        self,
        timeout: float | None = None,
        *,
        expect: Collection[str] | None = None,
        memory: bool = False,
    ) -> list[NodeInfo]:
        if not self._finalizer.alive:
            # Closed: its nodes are stopped, and asking would build its
            # removed folder again (a search still running asks).
            return []
        return super().nodes(timeout, expect=expect, memory=memory)

    def _destination(self) -> list[str] | None:
        host = socket.gethostname()
        return [f"{name}@{host}" for name in self.node_names]

    def _start(self) -> None:
        logs = Path(self.directory, "logs")
        logs.mkdir(exist_ok=True)
        # The nodes share this machine's cores: cap each fit's BLAS/OpenMP
        # threads to its share, or n nodes would each use every core.
        env = dict(os.environ)
        processes = max(1, self.n_workers * self.concurrency)
        threads = max(1, (os.cpu_count() or 1) // processes)
        # The secret travels in the environment, never on a command line.
        env.pop("CLUSTERSEARCH_SECRET_FILE", None)
        assert self._signer.secret is not None  # a LocalCluster always has one
        env["CLUSTERSEARCH_SECRET"] = os.fsdecode(self._signer.secret)
        for name in self.node_names:
            cmd = [
                sys.executable, "-m", "clustersearch", "worker",
                "--broker", self.broker_url,
                "--name", name,
                "--concurrency", str(self.concurrency),
                "--loglevel", self.loglevel,
                "--cache-dir", self.cache_dir,
                "--threads-per-process", str(threads),
            ]  # fmt: skip
            if self.cache_size is not None:
                cmd += ["--cache-size", str(self.cache_size)]
            if self.store_size is not None:
                cmd += ["--store-size", str(self.store_size)]
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

    def _wait_ready(self) -> None:
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

    def log(self, name: str) -> str:
        """The log of node ``name`` so far."""
        path = Path(self.directory, "logs", f"{name}.log")
        return path.read_text(errors="replace") if path.exists() else ""

    @property
    def processes(self) -> dict[str, subprocess.Popen[bytes]]:
        """The nodes' main processes (``subprocess.Popen``), by node name."""
        return dict(zip(self.node_names, self._procs))

    def close(self) -> None:
        """Stop the nodes and remove the private folder."""
        super().close()
        self._finalizer()


def _stop(procs: list[subprocess.Popen], directory: str, lifeline: Lifeline) -> None:
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


