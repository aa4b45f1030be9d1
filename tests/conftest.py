"""Fixtures: real worker processes, started with the ``clustersearch`` CLI, on
every transport the library supports.

Broker tests need RabbitMQ and Redis on localhost. Without them they skip
with the reason, except where ``CLUSTERSEARCH_REQUIRE_BROKERS=1`` (CI sets
it): then a missing server fails the run instead of hiding behind a skip.
"""

import contextlib
import os
import socket
from pathlib import Path

import numpy as np
import pytest

from clustersearch import LocalCluster

RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"
REDIS = "redis://127.0.0.1:6379"

# name -> (broker, backend); None, None is the embedded transport.
TRANSPORTS = {
    "embedded": (None, None),
    "rabbitmq-rpc": (RABBITMQ, "rpc://"),
    "rabbitmq-redis": (RABBITMQ, REDIS + "/1"),
    "redis": (REDIS + "/2", REDIS + "/2"),
}

ADULT_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "adult"


def _reachable(host, port):
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def skip_broker_test(message):
    """Skip a broker test for ``message``, or, in CI, fail it."""
    if os.environ.get("CLUSTERSEARCH_REQUIRE_BROKERS") == "1":
        pytest.fail(message + " (CLUSTERSEARCH_REQUIRE_BROKERS=1)")
    pytest.skip(message)


def require_servers(*urls):
    """Skip (or, in CI, fail) unless the servers behind ``urls`` answer."""
    for url in urls:
        if not url or not url.startswith(("amqp", "redis")):
            continue
        port = 5672 if url.startswith("amqp") else 6379
        if not _reachable("127.0.0.1", port):
            skip_broker_test(f"no server for {url} on 127.0.0.1:{port}")


def _start(transport, n_workers=2):
    broker, backend = TRANSPORTS[transport]
    require_servers(broker, backend)
    return LocalCluster(
        n_workers=n_workers, broker_url=broker, backend=backend, allow_root=True
    )


@pytest.fixture(scope="session")
def embedded_cluster():
    with _start("embedded") as cluster:
        yield cluster


_clusters = {}


def transport_params(names):
    """``names`` as fixture params, those on a broker marked ``broker``."""
    return [
        pytest.param(name, id=name, marks=[pytest.mark.broker] if TRANSPORTS[name][0] else [])
        for name in names
    ]


@pytest.fixture(scope="session", params=transport_params(TRANSPORTS))
def cluster(request, embedded_cluster):
    """A 2-node cluster on each transport (started once per session)."""
    if request.param == "embedded":
        yield embedded_cluster
        return
    cluster = _start(request.param)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(autouse=True)
def _no_default_celery_app(monkeypatch):
    """Trap any use of Celery's default app: clustersearch must pass its own."""
    import celery._state

    class Trap:
        def __getattr__(self, name):
            raise AssertionError(f"clustersearch used Celery's default app (.{name})")

    monkeypatch.setattr(celery._state, "default_app", Trap())


@pytest.fixture(scope="session")
def adult_dir():
    if not (ADULT_DIR / "adult.data").exists():
        pytest.skip(f"UCI Adult not found at {ADULT_DIR}")
    return ADULT_DIR


def parent_pid(pid):
    """The parent of live process ``pid`` (``/proc/<pid>/stat``); None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2, the command in parentheses, may hold spaces: count from its end.
    return int(stat.rsplit(")", 1)[1].split()[1])


def assert_ran_in_pool_processes(processes, cluster, gone_explained=False):
    """Each pid in ``processes`` (node name -> pids) is a live pool process of
    that node of ``cluster``: a child of the node's main process, never the
    client, never the node's main process itself.

    Call it while the cluster lives (the pids are looked up in ``/proc``).
    ``gone_explained``: the search's own events show pool processes killed
    (a straggler's losing copy is stopped by killing its process; a lost
    worker): a pid no longer there is let pass, as it cannot be looked up.
    """
    assert processes, "no process that ran a fit was recorded"
    client = os.getpid()
    # A node busy under load may answer late: wait longer than discovery
    # does, and ask again (what is checked here is where fits ran, not how
    # fast nodes answer; CI once had both embedded nodes miss one 5 s ask).
    main: dict[str, int] = {}
    wanted = set(processes) | set(getattr(cluster, "processes", {}))
    for _ in range(3):
        main.update((node.name, node.pid) for node in cluster.nodes(timeout=5))
        if wanted <= set(main):
            break
    if hasattr(cluster, "processes"):
        # The nodes' own answer agrees with the processes LocalCluster started.
        assert main == {name: p.pid for name, p in cluster.processes.items()}, main
    for name, pids in processes.items():
        assert name in main, f"fits ran on {name!r}, not a node of {cluster!r}: {sorted(main)}"
        assert pids, f"no process recorded for node {name!r}"
        for pid in pids:
            assert pid != client, f"a fit ran in the client (pid {pid})"
            assert pid != main[name], f"a fit ran in node {name!r}'s main process"
            parent = parent_pid(pid)
            if parent is None and gone_explained:
                continue
            assert parent == main[name], (
                f"pid {pid} of node {name!r} is not one of its pool processes: its "
                f"parent is {parent}, the node's main process {main[name]}"
            )


def assert_ran_on_workers(search, cluster, n_fits):
    """Every fit ran in a pool process of a node of ``cluster``, none in the
    client, none counted twice."""
    assert n_fits > 0
    per_node = search.fits_per_node_
    assert sum(per_node.values()) == n_fits, per_node
    assert all(count > 0 for count in per_node.values()), per_node
    assert set(search.fit_processes_) == set(per_node), search.fit_processes_
    events = getattr(search, "fit_timeline_", {}).get("events", [])
    killed = any(e["event"] in ("straggler", "worker-lost") for e in events)
    assert_ran_in_pool_processes(search.fit_processes_, cluster, gone_explained=killed)


@pytest.fixture
def sessions(monkeypatch):
    """The dispatch sessions the searches of a test open, in order.

    For searches that end with an error, and so set no fitted attribute:
    ``session_processes(session)`` says where their fits ran.
    """
    from clustersearch import Cluster

    opened = []
    original = Cluster.session

    @contextlib.contextmanager
    def recording(self, **kwargs):
        with original(self, **kwargs) as session:
            opened.append(session)
            yield session

    monkeypatch.setattr(Cluster, "session", recording)
    return opened


def session_processes(session):
    """Node name -> sorted pids of the processes that ran a session's fits."""
    processes = {}
    for node, pid in sorted(session.pids):
        processes.setdefault(node, []).append(pid)
    return processes


TIME_KEYS = ("mean_fit_time", "std_fit_time", "mean_score_time", "std_score_time")


def assert_same_results(ours, theirs):
    """scikit-learn's parity contract: everything but timings is equal."""
    a, b = ours.cv_results_, theirs.cv_results_
    assert set(a) == set(b)
    for key in a:
        if key in TIME_KEYS:
            continue
        x, y = a[key], b[key]
        if key == "params":
            assert x == y
        elif isinstance(x, np.ma.MaskedArray) or x.dtype == object:
            assert list(x) == list(y), key
        else:
            np.testing.assert_array_equal(x, y, err_msg=key)
    for attr in ("best_index_", "best_params_", "best_score_", "n_splits_", "multimetric_"):
        if hasattr(theirs, attr):
            left, right = getattr(ours, attr), getattr(theirs, attr)
            if isinstance(right, float) and np.isnan(right):
                assert np.isnan(left)
            else:
                assert left == right, attr
        else:
            assert not hasattr(ours, attr), attr
    assert hasattr(ours, "refit_time_") == hasattr(theirs, "refit_time_")
    if hasattr(theirs, "classes_"):
        np.testing.assert_array_equal(ours.classes_, theirs.classes_)


def pytest_terminal_summary(terminalreporter):
    """The fault tests' measured detection and recovery times."""
    import sys

    netcluster = sys.modules.get("netcluster")
    if netcluster is not None and netcluster.REPORT:
        terminalreporter.section("fault tests: measured times")
        for line in netcluster.REPORT:
            terminalreporter.write_line(line)
