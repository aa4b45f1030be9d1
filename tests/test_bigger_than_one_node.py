"""A forest kept on the nodes does what one board cannot (issue 11).

Four nodes of the multi-host test cluster (``netcluster.py``: real
``clustersearch worker`` processes, each in a network namespace of its own),
each in a memory cgroup of its own with no swap: boards with little memory.
The limit ``M`` is set from what the nodes measure, below what one node needs
to build or even hold the whole forest, above what one node needs for its
parts:

1. the forest, fitted with ``keep="nodes", replicas=2`` across the limited
   nodes, trains and predicts exactly scikit-learn's forest (same
   ``random_state``, ``predict_proba`` within 1e-12), no node's OOM killer
   fires and no node's memory peak is over ``M``, and the client holds the
   handle only;
2. the same forest built whole on one node under the same limit
   (``n_parts=1``) fails because that node ran out of memory: its cgroup's
   OOM kill count rose, and the client's error says so.

The measured figures go to the end of the run's summary (``REPORT``) and to
docs/ensembles.md ("Bigger than one board: measured").
"""

import contextlib
import os
import pickle
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import RABBITMQ, REDIS, require_servers, skip_broker_test
from netcluster import REPORT, MemoryCgroup, NetCluster, why_unavailable
from sklearn.ensemble import RandomForestClassifier

from clustersearch import ClusterRandomForestClassifier
from clustersearch._resident import ResidentForest
from clustersearch.datasets import load_adult
from clustersearch.exceptions import PartLostError

pytestmark = [pytest.mark.cluster, pytest.mark.broker, pytest.mark.slow]

MB = 1 << 20
N_NODES = 4
N_TREES = 300  # fully grown trees on Adult: about 0.9 MB each, pickled
# M = baseline + MARGIN * S. A node building one of its parts (S / 4) needs
# about twice the part (its trees, then their pickle on the way to the
# store): baseline + S / 2. Holding the whole forest's trees needs baseline
# + S, building it whole more than that.
MARGIN = 0.75


def _peak_rss_kb(pid):
    """The most resident memory process ``pid`` has used (VmHWM), in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for process {pid}")


@contextlib.contextmanager
def _sampled(cgroups, every_s=0.01):
    """Within the block, the most unreclaimable memory (anonymous and
    shared: the page cache is dropped under the limit, so the cgroup's own
    peak reaches the limit anyway) each cgroup used, sampled every
    ``every_s``: a dict filled in when the block ends."""
    peaks = dict.fromkeys(cgroups, 0)
    done = threading.Event()

    def sample():
        while not done.is_set():
            for name, cgroup in cgroups.items():
                with contextlib.suppress(OSError, KeyError, ValueError):
                    peaks[name] = max(peaks[name], cgroup.unreclaimable())
            done.wait(every_s)

    thread = threading.Thread(target=sample, name="memory-sampler", daemon=True)
    thread.start()
    try:
        yield peaks
    finally:
        done.set()
        thread.join()


@pytest.fixture(scope="module")
def boards(tmp_path_factory):
    """Four nodes, each in a memory cgroup of its own (no limit yet)."""
    reason = why_unavailable()
    if reason is None:
        try:
            MemoryCgroup.remove(MemoryCgroup(f"clustersearch-probe{os.getpid()}").path)
        except (OSError, RuntimeError) as exc:
            reason = f"cannot create a memory cgroup: {exc}"
    if reason:
        skip_broker_test(reason)
    require_servers(RABBITMQ, REDIS)
    net = NetCluster(
        tmp_path_factory.mktemp("boards"), n_hosts=N_NODES, n_nodes=N_NODES, memory_cgroups=True
    ).start()
    try:
        yield net
    finally:
        net.close()


def test_a_forest_bigger_than_one_board(boards):
    net = boards
    hosts = net.hosts[:N_NODES]
    X, y = load_adult()[:2]

    # scikit-learn's forest, in this unconstrained process: the reference,
    # and S, the size of its trees.
    start = time.monotonic()
    reference = RandomForestClassifier(n_estimators=N_TREES, random_state=0).fit(X, y)
    expected = reference.predict_proba(X)
    sklearn_s = time.monotonic() - start
    S = len(pickle.dumps(reference.estimators_, protocol=pickle.HIGHEST_PROTOCOL))
    del reference

    with net.cluster() as cluster:
        # Baseline: each node after a small forest on the same data (its
        # processes started, scikit-learn imported, the data received).
        warm = ClusterRandomForestClassifier(
            n_estimators=N_NODES, random_state=1, cluster=cluster, keep="nodes", replicas=2
        ).fit(X, y)
        warm.predict_proba(X[:100])
        warm.delete()
        baseline = max(net.memory[h].peak() for h in hosts)
        M = int(baseline + MARGIN * S) // 4096 * 4096  # the kernel counts pages
        assert M < baseline + S  # under what holding the whole forest takes
        for host in hosts:
            net.limit_memory(host, M)
            assert net.memory[host].max_bytes == M
        ooms = {h: net.memory[h].oom_kills() for h in hosts}
        nodes_pids = {h: net.procs[h].pid for h in hosts}

        # 1. The forest across the limited nodes, kept there.
        with _sampled({h: net.memory[h] for h in hosts}) as used:
            start = time.monotonic()
            forest = ClusterRandomForestClassifier(
                n_estimators=N_TREES, random_state=0, cluster=cluster, keep="nodes", replicas=2
            ).fit(X, y)
            fit_s = time.monotonic() - start
            start = time.monotonic()
            proba = forest.predict_proba(X)
            predict_s = time.monotonic() - start
        handle = forest.resident_
        assert sorted({n for holders in handle.holders for n in holders}) == hosts
        assert all(len(holders) == 2 for holders in handle.holders), handle.holders
        np.testing.assert_allclose(proba, expected, rtol=0, atol=1e-12)
        # Each part answered by a pool process of a node, none by the client.
        pool = {(h, pid) for h in hosts for pid in net.pool_pids(h)}
        assert handle.last_run["pids"] and handle.last_run["pids"] <= pool, (
            handle.last_run["pids"], pool)  # fmt: skip
        assert set(handle.last_run["answered"].values()) == set(hosts)
        # The client holds the handle only.
        assert forest.estimators_ == []
        pickled = len(pickle.dumps(forest))
        assert pickled < S / 1000, pickled
        store = {n.name: n.store_bytes for n in cluster.nodes()}
        assert sum(store.values()) == sum(handle.nbytes.values())
        assert all(0 < store[h] < S for h in hosts), (store, S)

        peaks = {h: net.memory[h].peak() for h in hosts}
        pool_peaks = {h: max(_peak_rss_kb(pid) for pid in net.pool_pids(h)) for h in hosts}
        for host in hosts:
            assert net.memory[host].oom_kills() == ooms[host], f"{host} hit an OOM kill"
            assert peaks[host] <= M, (host, peaks[host], M)
            assert 0 < used[host] < M, (host, used[host], M)
            assert net.procs[host].pid == nodes_pids[host] and net.procs[host].poll() is None
        assert not [e for e in handle.last_run["events"] if e["event"] in ("lost", "worker-lost")]
        freed = forest.delete()
        assert freed == sum(store.values())

    # 2. The whole forest on one node under the same limit: the node runs
    # out of memory (one try: a fit that kills its worker does so each time).
    with net.cluster(max_retries=0) as cluster:
        start = time.monotonic()
        with pytest.raises(PartLostError, match="runs out of memory") as lost:
            ResidentForest.fit(
                RandomForestClassifier(n_estimators=N_TREES, random_state=0), X, y,
                cluster=cluster, replicas=1, n_parts=1,
            )  # fmt: skip
        one_node_s = time.monotonic() - start
    killed = {h: net.memory[h].oom_kills() - ooms[h] for h in hosts}
    board = hosts[0]  # the single part goes to the first node
    assert f"node {board!r}" in str(lost.value), lost.value
    assert killed[board] >= 1 and not any(killed[h] for h in hosts[1:]), killed
    assert net.memory[board].peak() <= M
    assert net.procs[board].poll() is None  # the pool process died, not the node

    figures = (
        f"{N_TREES} trees on Adult, S {S / MB:.0f} MB pickled (sklearn fit {sklearn_s:.1f} s); "
        f"{N_NODES} nodes, baseline {baseline / MB:.0f} MB, M {M / MB:.0f} MB; "
        f"keep='nodes' replicas=2: fit {fit_s:.1f} s, predict_proba {predict_s:.1f} s, "
        f"store MB {[round(store[h] / MB) for h in hosts]}, "
        f"cgroup peak MB {[round(peaks[h] / MB) for h in hosts]} (page cache included), "
        f"unreclaimable peak MB {[round(used[h] / MB) for h in hosts]}, "
        f"pool peak RSS MB {[round(pool_peaks[h] / 1024) for h in hosts]}, client pickle "
        f"{pickled / 1024:.1f} kB; whole forest on {board}: OOM-killed ({killed[board]}) "
        f"after {one_node_s:.1f} s"
    )
    REPORT.append(figures)
    print(figures)


def test_reaping_removes_a_dead_runs_memory_cgroups():
    """A killed run's state file lists its nodes' memory cgroups; the next
    run kills what still runs in them and removes them."""
    import json
    import secrets
    import subprocess
    import sys

    from netcluster import STATE_DIR, _identity, reap_leftovers

    if os.geteuid() != 0:
        pytest.skip("the test cluster's state files and cgroups need root")
    try:
        cgroup = MemoryCgroup(f"clustersearch-reaptest{secrets.token_hex(2)}-mem")
    except (OSError, RuntimeError) as exc:
        pytest.skip(f"cannot create a memory cgroup: {exc}")
    owner = subprocess.Popen([sys.executable, "-c", "pass"])
    owner.wait()  # the run that died
    node = subprocess.Popen(cgroup.wrap(["sleep", "120"]), start_new_session=True)
    path = STATE_DIR / f"test{secrets.token_hex(4)}.json"
    try:
        deadline = time.monotonic() + 30
        while node.pid not in cgroup.pids():
            assert time.monotonic() < deadline, "the process did not enter its cgroup"
            time.sleep(0.01)
        state = {"run": [owner.pid, 0], "nodes": [_identity(node.pid)], "proxy": None,
                 "cgroups": [str(cgroup.path)]}  # fmt: skip
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(state))
        reap_leftovers()
        assert node.wait(timeout=30) == -9
        assert not cgroup.path.exists()
        assert not path.exists()
    finally:
        path.unlink(missing_ok=True)
        node.kill()
        node.wait()
        MemoryCgroup.remove(cgroup.path)
