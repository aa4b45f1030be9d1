"""Heartbeat rounds that end when every live node answered; a node's memory.

On the embedded transport (a LocalCluster), seen through a plain
``Cluster`` handle as a client on another machine sees it (a LocalCluster
asks only its own nodes, by name).
"""

import gc
import threading
import time

import pytest
from joblib import Parallel, delayed
from sklearn.datasets import make_classification
from sklearn.tree import DecisionTreeClassifier

from clustersearch import Cluster, ClusterGridSearchCV
from clustersearch.cli import main
from clustersearch.client.policy import Policy
from clustersearch.client.recovery import Watcher
from clustersearch.node.memory import IDLE_S, PRELOAD, idle_cleanups


@pytest.fixture
def plain(embedded_cluster):
    cluster = Cluster(
        embedded_cluster.broker_url, embedded_cluster.backend_url, secret=embedded_cluster.secret
    )
    try:
        yield cluster
    finally:
        cluster.close()


def test_a_round_that_expects_the_live_nodes_ends_when_they_answered(plain, embedded_cluster):
    names = sorted(embedded_cluster.node_names)
    assert [n.name for n in plain.nodes(timeout=10)] == names  # warm
    start = time.monotonic()
    found = plain.nodes(timeout=10, expect=names)
    took = time.monotonic() - start
    assert [n.name for n in found] == names
    # Not the 10 s timeout: the round ended once both had answered.
    assert took < 5, took
    # Without expectations a round waits out its timeout (it looks for every node).
    start = time.monotonic()
    assert [n.name for n in plain.nodes(timeout=0.5)] == names
    assert time.monotonic() - start >= 0.5
    # Expecting a node that does not answer: the whole timeout, the others found.
    start = time.monotonic()
    found = plain.nodes(timeout=0.5, expect=[*names, "gone"])
    assert time.monotonic() - start >= 0.5
    assert [n.name for n in found] == names


def test_every_few_heartbeat_rounds_wait_for_joining_nodes():
    calls = []
    done = threading.Event()

    def discover(timeout, expect):
        calls.append(expect)
        if len(calls) == 2 * Watcher.DISCOVERY_EVERY:
            done.set()
        return []

    rounds = []
    watcher = Watcher(
        discover, Policy(heartbeat_interval=0.01), lambda *a: None,
        expect=lambda: ["a", "b"], record=lambda t, s, n: rounds.append((s, n)),
    )  # fmt: skip
    watcher.start()
    try:
        assert done.wait(10)
    finally:
        watcher.stop()
    every = Watcher.DISCOVERY_EVERY
    first = calls[: 2 * every]
    assert [i for i, e in enumerate(first) if e is None] == [every - 1, 2 * every - 1]
    assert all(e == ["a", "b"] for e in first if e is not None)
    assert len(rounds) >= 2 * every and all(s >= 0 and n == 0 for s, n in rounds)


class _SlowTree(DecisionTreeClassifier):
    """A tree that takes 0.1 s, so that a search sees a few heartbeats."""

    def fit(self, X, y, **kwargs):
        time.sleep(0.1)
        return super().fit(X, y, **kwargs)


def test_a_search_records_its_heartbeat_rounds(embedded_cluster):
    X, y = make_classification(n_samples=100, random_state=0)
    cluster = Cluster(
        embedded_cluster.broker_url, embedded_cluster.backend_url,
        secret=embedded_cluster.secret, heartbeat_interval=0.05,
    )  # fmt: skip
    try:
        search = ClusterGridSearchCV(
            _SlowTree(), {"max_depth": [1, 2, 3, 4]}, cv=2, cluster=cluster
        ).fit(X, y)
    finally:
        cluster.close()
    rounds = search.fit_timeline_["heartbeats"]
    assert rounds and all(r["round_s"] >= 0 and r["time"] >= 0 for r in rounds)
    assert {r["answered"] for r in rounds} == {len(embedded_cluster.node_names)}


def _gc_state():
    import sys

    return gc.get_freeze_count(), all(m in sys.modules for m in PRELOAD)


def test_pool_processes_share_what_was_imported_before_the_fork(embedded_cluster):
    with embedded_cluster.joblib() as session:
        states = Parallel(n_jobs=2)(delayed(_gc_state)() for _ in range(4))
    assert sum(session.fits_per_node.values()) == 4
    for frozen, preloaded in states:
        # The main process froze its objects before forking: the pool
        # process's collector never scans (and so never copies) them.
        assert frozen > 10_000, frozen
        assert preloaded


def _cleanups(hold=0.0):
    import os

    before = idle_cleanups()
    time.sleep(hold)
    return os.getpid(), before, idle_cleanups()


def test_a_pool_process_cleans_up_once_idle_not_while_a_task_runs(embedded_cluster):
    # gc.collect() and malloc_trim(0) after every task made each next fit
    # fault its memory back in (10% of the nodes' CPU on the benchmark
    # grid); a pool process now does it once it has been idle IDLE_S.
    with embedded_cluster.joblib() as session:
        first = Parallel(n_jobs=2)(delayed(_cleanups)() for _ in range(4))
        # Right after: tasks longer than IDLE_S, no clean-up while they run
        # (their processes have just finished a task of the first round).
        held = Parallel(n_jobs=2)(delayed(_cleanups)(IDLE_S + 0.7) for _ in range(2))
        time.sleep(IDLE_S + 2.0)
        last = Parallel(n_jobs=2)(delayed(_cleanups)() for _ in range(4))
    assert sum(session.fits_per_node.values()) == 10
    for _, before, after in held:
        assert after == before, held
    ran = {pid: after for pid, _, after in first + held}
    cleaned = [(pid, before) for pid, before, _ in last if pid in ran]
    assert cleaned, (first, held, last)
    for pid, before in cleaned:
        assert before > ran[pid], (first, held, last)  # cleaned once idle


def test_nodes_report_their_memory(plain, embedded_cluster, capsys):
    names = list(embedded_cluster.node_names)
    nodes = plain.nodes(timeout=10, expect=names, memory=True)
    assert len(nodes) == len(names)
    for node in nodes:
        # All its processes: a Python with scikit-learn imported, and more.
        assert node.memory_pss > 50 * 2**20, node
        assert 0 <= node.memory_data <= node.memory_pss
    # Not asked: not measured (it takes the node tens of milliseconds).
    assert all(n.memory_pss == 0 for n in plain.nodes(timeout=10, expect=names))
    main(["nodes", "--broker", embedded_cluster.broker_url, "--backend",
          embedded_cluster.backend_url, "--timeout", "2"])  # fmt: skip
    out = capsys.readouterr().out
    assert "MEMORY" in out.splitlines()[0]
    assert out.count(" data") >= len(nodes), out
