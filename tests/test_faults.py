"""Faults on a cluster of real hosts, each while a search runs.

Three nodes, each a ``clustersearch worker`` in a network namespace of its
own (see ``netcluster.py``), a client on the host. For each fault: the search
completes, ``cv_results_`` equals the fault-free run's (fixed random_state),
every fit is counted once (late results from a node that comes back are
ignored), and the extra wall time stays within failure detection plus rerun
time (plus, for a node that stays away, the fits it would have run, spread
over the others). The measured detection and recovery times are printed at
the end of the run (``pytest_terminal_summary`` in conftest).
"""

import contextlib
import os
import threading
import time
from pathlib import Path

import pytest
from conftest import RABBITMQ, REDIS, assert_same_results, require_servers
from kombu import Connection
from netcluster import REPORT, NetCluster, why_unavailable
from sklearn.datasets import make_classification
from sklearn.ensemble import RandomForestClassifier

from clustersearch import Cluster, ClusterGridSearchCV
from clustersearch.client.policy import Policy
from clustersearch.exceptions import CallbackNotSupportedError
from clustersearch.node.pool import POOL_CHECK_S

STALL_FLOOR_S = Policy.STALL_FLOOR_S

pytestmark = [pytest.mark.cluster, pytest.mark.broker, pytest.mark.slow]

FIT_S = 0.4  # each fit of the fault runs sleeps this long (a slow board)
BURN_S = 0.1  # each fit of the straggler run burns this much CPU time
HEARTBEAT = {"heartbeat_interval": 0.5, "missed_heartbeats": 2}
# Detection takes missed_heartbeats - 1 to missed_heartbeats intervals, plus
# the wait for replies (min(1, interval) s); 1 s more for this busy machine.
DETECTION_BOUND_S = HEARTBEAT["missed_heartbeats"] * 0.5 + 0.5 + 1.0
# This machine (2 cores) runs the client, the broker and every node.
SLACK_S = 2.0

X, y = make_classification(n_samples=300, n_features=8, random_state=0)
GRID = {"max_depth": [2, 3, 4, 5, None], "max_features": [1, 2]}
N_FITS = 30


class _SlowForest(RandomForestClassifier):
    """A forest whose fit takes FIT_S seconds; it marks the process it runs in."""

    def fit(self, X, y, **kwargs):
        markers = os.environ.get("CLUSTERSEARCH_TEST_MARKERS")
        running = Path(markers, f"{os.getpid()}.running") if markers else None
        if running is not None:
            running.touch()
        try:
            time.sleep(FIT_S)
            return super().fit(X, y, **kwargs)
        finally:
            if running is not None:
                running.unlink(missing_ok=True)


class _BurningForest(RandomForestClassifier):
    """A forest whose fit burns BURN_S seconds of CPU (a CPU quota slows it)."""

    def fit(self, X, y, **kwargs):
        end = time.process_time() + BURN_S
        while time.process_time() < end:
            pass
        return super().fit(X, y, **kwargs)


def _search(estimator_cls, cluster):
    return ClusterGridSearchCV(
        estimator_cls(n_estimators=5, random_state=0), GRID, cv=3, cluster=cluster
    )


# -- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """Three nodes in network namespaces (and a fourth, empty host)."""
    reason = why_unavailable()
    if reason:
        if os.environ.get("CLUSTERSEARCH_REQUIRE_BROKERS") == "1":
            pytest.fail(reason + " (CLUSTERSEARCH_REQUIRE_BROKERS=1)")
        pytest.skip(reason)
    require_servers(RABBITMQ, REDIS)
    cluster = NetCluster(tmp_path_factory.mktemp("netcluster")).start()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def healthy(net):
    """The three nodes healthy; restores them after the test's fault."""
    net.reset()
    yield net
    net.reset()


class Run:
    """One search on the test cluster, timed, with its session's events."""

    def __init__(self, net, estimator_cls=_SlowForest, **cluster_kwargs):
        self.cluster = net.cluster(**{**HEARTBEAT, **cluster_kwargs})
        self.search = _search(estimator_cls, self.cluster)
        self.session = None
        self.fault_at = self.fault_at_rel = None
        self.events = []
        opened = self.cluster.session

        @contextlib.contextmanager
        def session(**kwargs):
            # Keep the search's session, for its events.
            with opened(**kwargs) as self.session:
                yield self.session

        self.cluster.session = session

    def fit(self, fault=None):
        """Run the search; ``fault(run)`` runs in a thread meanwhile."""
        errors = []

        def inject():
            try:
                fault(self)
            except BaseException as exc:  # reported in the test's thread
                errors.append(exc)

        thread = threading.Thread(target=inject) if fault else None
        self.start = time.monotonic()
        if thread:
            thread.start()
        try:
            self.search.fit(X, y)
        finally:
            self.wall = time.monotonic() - self.start
            if thread:
                thread.join()
            self.cluster.close()
        if errors:
            raise errors[0]
        self.events = list(self.session.events)
        return self

    def at(self, seconds):
        """Sleep until ``seconds`` after the search started; note the time."""
        time.sleep(max(0.0, self.start + seconds - time.monotonic()))
        self.fault_at = time.monotonic()
        self.fault_at_rel = seconds

    def first(self, event, node=None):
        for e in self.events:
            if e["event"] == event and (node is None or e["node"] == node):
                return e
        raise AssertionError(f"no {event!r} event for {node!r} in {self.events}")

    def check(self, reference):
        """Complete, equal to the fault-free run, every fit counted once."""
        assert_same_results(self.search, reference.search)
        assert sum(self.search.fits_per_node_.values()) == N_FITS, self.search.fits_per_node_


@pytest.fixture(scope="module")
def fault_free(net):
    """The fault-free run: the reference results and wall time."""
    net.reset()
    return Run(net).fit()


def _report(fault, run, reference, **times):
    extra = run.wall - reference.wall
    line = f"{fault:<22} wall {run.wall:5.1f} s (fault-free {reference.wall:4.1f} s, extra {extra:+4.1f} s)"
    line += "".join(
        f", {k.replace('_', ' ')} {v:.2f} s" if isinstance(v, float) else f", {k} {v}"
        for k, v in times.items()
    )
    REPORT.append(line)
    return extra


# -- the six faults -----------------------------------------------------------------


def test_sigkill_of_a_pool_process(healthy, fault_free):
    net = healthy
    victim = {}

    def fault(run):
        run.at(1.0)
        # Kill host1's pool process while it runs a fit (its marker says so).
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for pid in net.pool_pids("host1"):
                if Path(net.markers, f"{pid}.running").exists():
                    victim["pid"] = pid
                    run.fault_at = time.monotonic()
                    net.kill_pool_process("host1", pid)
                    return
            time.sleep(0.01)
        raise AssertionError("host1 ran no fit")

    run = Run(net).fit(fault)
    run.check(fault_free)
    lost = run.first("worker-lost", "host1")
    assert "SIGKILL" in lost["what"], lost
    assert not [e for e in run.events if e["event"] == "lost"], run.events
    detection = lost["t"] - run.fault_at
    extra = _report("pool process SIGKILL", run, fault_free, detection=detection)
    # The node's pool finds the dead process at once, or at its next check
    # (worker.POOL_CHECK_S) when it looked a moment before the process could be
    # reaped (Celery's own check, every 5 s, made this 4-5 s in 1 run in 3).
    assert detection < POOL_CHECK_S + 1.0
    assert extra < detection + 2 * FIT_S + SLACK_S


def test_sigkill_of_a_whole_node(healthy, fault_free):
    net = healthy

    def fault(run):
        run.at(1.5)
        net.kill_node("host1")

    run = Run(net).fit(fault)
    run.check(fault_free)
    lost = run.first("lost", "host1")
    detection = lost["t"] - run.fault_at
    # The fits host1 would have run after the fault, now on two nodes not three.
    left = N_FITS * FIT_S * max(0.0, 1 - run.fault_at_rel / fault_free.wall)
    capacity = left / 2 - left / 3
    extra = _report("node SIGKILL", run, fault_free, detection=detection)
    assert detection < DETECTION_BOUND_S
    assert extra < detection + 2 * FIT_S + capacity + SLACK_S
    assert "host1" not in run.search.fits_per_node_ or run.search.fits_per_node_["host1"] < 10
    # What host1 held was reclaimed from its queue, not stranded there.
    with Connection(net.broker_url()) as conn:
        _, waiting, _ = conn.default_channel.queue_declare("clustersearch.host1", passive=True)
    assert waiting == 0


def test_link_cut_longer_than_detection_then_restored(healthy, fault_free):
    net = healthy
    cut_s = DETECTION_BOUND_S + 1.0

    def fault(run):
        run.at(1.0)
        net.cut_link("host1")
        time.sleep(cut_s)
        net.restore_link("host1")
        run.restored_at = time.monotonic()

    run = Run(net).fit(fault)
    run.check(fault_free)
    lost = run.first("lost", "host1")
    back = run.first("joined", "host1")
    assert back["again"] and back["t"] > lost["t"]
    detection = lost["t"] - run.fault_at
    rejoin = back["t"] - run.restored_at
    # What host1 finished while cut off came back late, and was ignored.
    assert run.session.late_results >= 1
    left = N_FITS * FIT_S * max(0.0, 1 - run.fault_at_rel / fault_free.wall)
    away = min(1.0, (cut_s + rejoin) / max(run.wall - run.fault_at_rel, 1e-9))
    capacity = away * (left / 2 - left / 3)
    extra = _report(
        f"link cut {cut_s:.1f} s", run, fault_free, detection=detection, rejoined_after=rejoin
    )
    assert detection < DETECTION_BOUND_S
    assert extra < detection + 2 * FIT_S + capacity + SLACK_S


def _restart_broker(net):
    """The fault: 1.5 s into the search, stop the broker and start it again."""

    def fault(run):
        run.at(1.5)
        net.stop_broker()
        run.stopped_at = time.monotonic()
        net.start_broker()
        run.started_at = time.monotonic()

    return fault


def test_broker_restart(healthy, fault_free):
    net = healthy
    # A handle that sits idle through the restart: its next search must
    # not trip on a pooled connection that died with the broker. (Through
    # the forwarder, so that its connection pool is its own.)
    idle = Cluster(
        net.broker_url(host_side=False), net.backend_url(host_side=False), secret=net.secret
    )
    assert len(idle.nodes()) == 3

    run = Run(net, reconnect_grace=15.0).fit(_restart_broker(net))
    run.check(fault_free)
    down = run.first("broker-down")
    up = run.first("broker-up")
    # No node was given up for the outage: they reconnected within the grace.
    assert not [e for e in run.events if e["event"] == "lost"], run.events
    outage = run.started_at - run.fault_at
    resumed = up["t"] - run.started_at
    extra = _report(
        "broker restart", run, fault_free,
        detection=down["t"] - run.fault_at, outage=outage, client_back_after=resumed,
    )  # fmt: skip
    # Celery's nodes retry the broker after 2, 4, 6... s: up to 6 s of
    # reconnection after an outage of a few seconds, then the rerun.
    assert extra < outage + 6.0 + 2 * FIT_S + SLACK_S
    with idle:
        assert len(idle.nodes()) == 3


def test_a_node_joins_mid_search(healthy, fault_free):
    net = healthy
    net.reset(hosts=["host1", "host2"])

    def fault(run):
        run.at(0.5)
        net.start_node("host4", wait=False)

    run = Run(net).fit(fault)
    run.check(fault_free)
    joined = run.first("joined", "host4")
    assert run.search.fits_per_node_.get("host4", 0) > 0, run.search.fits_per_node_
    # Two nodes would take 3/2 of the three nodes' time; host4 makes it less.
    two_nodes = fault_free.wall * 3 / 2
    _report("node joins", run, fault_free, joined_after=joined["t"] - run.fault_at)
    assert run.wall < two_nodes + SLACK_S


def test_a_straggler(healthy):
    net = healthy
    reference = Run(net, _BurningForest).fit()  # also warms the nodes up
    net.slow_down("host1", 0.1)

    run = Run(net, _BurningForest).fit()
    run.check(reference)
    assert not [e for e in run.events if e["event"] == "lost"], run.events
    backups = [e for e in run.events if e["event"] == "straggler"]
    # A backup goes out after straggler_factor x the median batch time (at
    # least 1 s); then a healthy node runs the batch again.
    late = max([e["late_s"] for e in backups], default=1.0)
    extra = _report("straggler (10% CPU)", run, reference, backup_after=late, backups=len(backups))
    assert extra < late + 4 * BURN_S + SLACK_S


def test_callbacks_are_refused_when_nodes_are_other_machines(healthy):
    # Each node has a host name of its own here. A scikit-learn callback's
    # copies on the nodes would report to a local socket of this machine
    # that they cannot reach: every fit would fail inside the callback.
    from sklearn.callback import ScoringMonitor
    from sklearn.linear_model import LogisticRegression

    cluster = healthy.cluster()
    try:
        assert {n.host for n in cluster.nodes()} == {"host1", "host2", "host3"}
        estimator = LogisticRegression().set_callbacks(ScoringMonitor(scoring="accuracy"))
        search = ClusterGridSearchCV(estimator, {"C": [0.1, 1]}, cv=3, cluster=cluster)
        with pytest.raises(CallbackNotSupportedError, match=r"ScoringMonitor .* local socket, which node 'host\d' on host 'host\d'"):
            search.fit(X, y)
        assert not hasattr(search, "fits_per_node_")
    finally:
        cluster.close()


@pytest.mark.timeout(120)  # without stall detection the search never ends
def test_a_node_whose_pool_is_stuck(healthy, fault_free):
    """A node that answers heartbeats but whose pool starts nothing.

    host1's only pool process is frozen (SIGSTOP) before the search: the
    node takes its share of the work and never starts it. It loses that work
    after STALL_FLOOR_S (10 s; a silent node's limit is 1 s here).
    """
    net = healthy
    (pid,) = net.pool_pids("host1")
    net.freeze_pool_process("host1", pid)

    # No straggler backups: they would rescue its batches once 4 have
    # finished elsewhere, which a search of few batches never sees.
    run = Run(net, straggler_factor=1e6).fit()
    run.check(fault_free)
    assert not [e for e in run.events if e["event"] == "straggler"], run.events
    lost = run.first("lost", "host1")
    assert lost["rerouted"] >= 1, lost
    assert not [e for e in run.events if e["event"] == "lost" and e["node"] != "host1"]
    assert not run.search.fits_per_node_.get("host1"), run.search.fits_per_node_
    # Lost at the first heartbeat that saw it stalled for STALL_FLOOR_S (the
    # stall is timed from the first heartbeat that saw it).
    stalled = lost["stalled_s"]
    assert STALL_FLOOR_S <= stalled < STALL_FLOOR_S + 2 * HEARTBEAT["heartbeat_interval"]
    detection = lost["t"] - run.start
    _report("pool frozen (SIGSTOP)", run, fault_free, stalled_when_lost=stalled, detection=detection)
    # Its batches run after detection, on the other two nodes.
    assert run.wall < detection + 2 * FIT_S + SLACK_S


def test_broker_restart_with_rpc_results(net, fault_free, tmp_path):
    """README's default backend, rpc://: results travel through the broker.

    Results published while the broker is away are lost with its reply
    queue, so the client sends every batch in flight again once the broker
    is back (the first result of each still wins).
    """
    rpc = NetCluster(tmp_path, n_hosts=3, n_nodes=3, backend="rpc").start()
    try:
        run = Run(rpc, reconnect_grace=15.0).fit(_restart_broker(rpc))
    finally:
        rpc.close()
    run.check(fault_free)
    assert not [e for e in run.events if e["event"] == "lost"], run.events
    down = run.first("broker-down")
    outage = run.started_at - run.fault_at
    extra = _report(
        "broker restart, rpc://", run, fault_free,
        detection=down["t"] - run.fault_at, outage=outage,
    )  # fmt: skip
    assert extra < outage + 6.0 + 2 * FIT_S + SLACK_S
