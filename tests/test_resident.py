"""Forests that stay on the nodes (``keep="nodes"``, clustersearch._resident).

Real worker processes (LocalCluster, 3 nodes), real scikit-learn forests:
the trees are built on the nodes and never come to the client unless asked
(``to_local``); predictions match scikit-learn's forest with the same
random_state; a node killed mid-predict is answered for by the replicas;
every copy of a part lost is a PartLostError naming the part.
"""

import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_ran_in_pool_processes
from sklearn.datasets import make_classification, make_regression
from sklearn.ensemble import (
    ExtraTreesRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)

from clustersearch import (
    ClusterExtraTreesRegressor,
    ClusterRandomForestClassifier,
    LocalCluster,
)
from clustersearch._resident import ResidentForest
from clustersearch.client.cluster import NodeInfo
from clustersearch.client.membership import Membership
from clustersearch.client.policy import Policy
from clustersearch.exceptions import (
    ClusterSearchError,
    ConfigurationError,
    PartLostError,
    StoreFullError,
)
from clustersearch.node.store import fingerprint

X, y = make_classification(n_samples=400, n_features=8, n_informative=5, random_state=0)
Xr, yr = make_regression(n_samples=300, n_features=6, noise=5.0, random_state=0)
# Within this of scikit-learn's predict_proba: its trees' outputs are added in
# thread order, ours part by part (measured: 2.2e-16 at most so far).
PROBA_TOL = 1e-12


@pytest.fixture(scope="module")
def cluster():
    # A small store bound, so that one test can fill it.
    with LocalCluster(n_workers=3, allow_root=True, store_size="300kB") as cluster:
        yield cluster


def store_bytes(cluster):
    return {node.name: node.store_bytes for node in cluster.nodes(timeout=5)}


def test_classifier_predicts_as_scikit_learns_forest(cluster):
    params = dict(n_estimators=14, max_depth=7, max_features=3, random_state=7)
    forest = ResidentForest.fit(RandomForestClassifier(**params), X, y, cluster=cluster)
    try:
        reference = RandomForestClassifier(**params).fit(X, y)
        # Cut in 3 parts, each on 2 of the 3 nodes, each node first for one.
        assert len(forest.parts) == 3
        assert all(len(set(h)) == 2 for h in forest.holders)
        assert sorted(h[0] for h in forest.holders) == sorted(cluster.node_names)
        # The built trees ran in the nodes' pool processes, not here.
        by_node = {}
        for node, pid in forest.last_run["pids"]:
            by_node.setdefault(node, set()).add(pid)
        assert_ran_in_pool_processes(by_node, cluster)
        assert "estimators_" not in forest.state

        proba = forest.predict_proba(X)
        diff = np.abs(proba - reference.predict_proba(X)).max()
        print(f"predict_proba: max |ours - scikit-learn's| = {diff:.3g}")
        assert diff <= PROBA_TOL
        # Each part answered once, by its first holder.
        assert forest.last_run["answered"] == {p: h[0] for p, h in enumerate(forest.holders)}
        assert set(node for node, _ in forest.last_run["pids"]) == set(cluster.node_names)
        np.testing.assert_array_equal(forest.predict(X), reference.predict(X))
        np.testing.assert_allclose(
            forest.predict_log_proba(X), reference.predict_log_proba(X), rtol=0, atol=1e-9
        )
        assert forest.score(X, y) == reference.score(X, y)

        # The merged forest: every tree fetched, the same trees as scikit-learn's.
        local = forest.to_local()
        assert type(local) is RandomForestClassifier
        assert local.get_params() == reference.get_params()
        assert fingerprint(local.estimators_) == fingerprint(reference.estimators_)
        np.testing.assert_array_equal(local.predict_proba(X), reference.predict_proba(X))
        assert np.abs(proba - local.predict_proba(X)).max() <= PROBA_TOL
    finally:
        forest.delete()


def test_regressors_predict_as_scikit_learns_forest(cluster):
    for klass in (RandomForestRegressor, ExtraTreesRegressor):
        params = dict(n_estimators=9, max_depth=6, random_state=3)
        forest = ResidentForest.fit(klass(**params), Xr, yr, cluster=cluster, n_parts=4)
        try:
            reference = klass(**params).fit(Xr, yr)
            diff = np.abs(forest.predict(Xr) - reference.predict(Xr)).max()
            print(f"{klass.__name__}.predict: max |ours - scikit-learn's| = {diff:.3g}")
            assert diff <= 1e-9 * np.abs(yr).max()
            assert forest.score(Xr, yr) == pytest.approx(reference.score(Xr, yr), abs=1e-12)
            assert [b - a for a, b in forest.parts] == [3, 2, 2, 2]
            local = forest.to_local()
            assert type(local) is klass
            assert fingerprint(local.estimators_) == fingerprint(reference.estimators_)
        finally:
            forest.delete()


def test_delete_frees_the_stores(cluster):
    forest = ResidentForest.fit(
        RandomForestClassifier(n_estimators=6, random_state=0), X, y, cluster=cluster
    )
    held = store_bytes(cluster)
    assert all(held[node] > 0 for node in cluster.node_names), held
    assert sum(held.values()) == sum(forest.nbytes.values())
    freed = forest.delete()
    assert freed == sum(held.values())
    assert store_bytes(cluster) == {node: 0 for node in cluster.node_names}
    with pytest.raises(Exception, match="was deleted from the nodes"):
        forest.predict(X)


def test_a_pickled_handle_predicts_from_another_process(cluster, tmp_path):
    params = dict(n_estimators=8, max_depth=5, random_state=11)
    forest = ResidentForest.fit(RandomForestClassifier(**params), X, y, cluster=cluster)
    try:
        data = pickle.dumps(forest)
        print(f"pickled handle: {len(data)} bytes")
        assert len(data) < 16_000
        (tmp_path / "forest.pkl").write_bytes(data)
        np.save(tmp_path / "X.npy", X)
        script = (
            "import pickle, sys, numpy as np\n"
            "forest = pickle.load(open(sys.argv[1] + '/forest.pkl', 'rb'))\n"
            "X = np.load(sys.argv[1] + '/X.npy')\n"
            "np.save(sys.argv[1] + '/proba.npy', forest.predict_proba(X))\n"
        )
        env = dict(os.environ, CLUSTERSEARCH_SECRET=cluster.secret)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]
        )
        subprocess.run(
            [sys.executable, "-c", script, str(tmp_path)], env=env, check=True, timeout=120
        )
        proba = np.load(tmp_path / "proba.npy")
        reference = RandomForestClassifier(**params).fit(X, y)
        assert np.abs(proba - reference.predict_proba(X)).max() <= PROBA_TOL
        # Without the secret the other process gets no node to ask.
        env.pop("CLUSTERSEARCH_SECRET")
        failed = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path)], env=env, timeout=120,
            capture_output=True, text=True,
        )  # fmt: skip
        assert failed.returncode != 0
        assert "Secret" in failed.stderr or "secret" in failed.stderr
    finally:
        forest.delete()


def test_a_part_over_a_nodes_store_limit_is_refused(cluster):
    # Fully grown trees on noisy labels: far over the 300 kB bound per node.
    Xn, yn = make_classification(n_samples=1500, n_features=10, flip_y=0.4, random_state=1)
    big = RandomForestClassifier(n_estimators=60, random_state=0)
    with pytest.raises(StoreFullError, match=r"node 'local\d-.*' cannot keep part .*limit is 300000 bytes"):
        ResidentForest.fit(big, Xn, yn, cluster=cluster, replicas=1)
    # What was built before the refusal was dropped again.
    assert store_bytes(cluster) == {node: 0 for node in cluster.node_names}


def test_bad_settings_are_refused_before_any_work():
    with pytest.raises(ConfigurationError, match="replicas must be an int >= 1, got 0"):
        ResidentForest.fit(RandomForestClassifier(), X, y, cluster="filesystem:///nowhere", replicas=0)
    with pytest.raises(ConfigurationError, match="oob_score=True"):
        ResidentForest.fit(RandomForestClassifier(oob_score=True), X, y, cluster="filesystem:///nowhere")


def _pool_children(pid):
    """The pool processes of the node whose main process is ``pid`` (its
    children in its own process group)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    pool = []
    for child in map(int, children):
        fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
        if int(fields[2]) == pid:  # pgrp
            pool.append(child)
    return pool


def test_a_node_killed_mid_predict_is_answered_for_by_the_replicas():
    params = dict(n_estimators=12, max_depth=6, random_state=5)
    reference = RandomForestClassifier(**params).fit(X, y)
    with LocalCluster(
        n_workers=3, allow_root=True, heartbeat_interval=0.5, missed_heartbeats=2
    ) as cluster:
        forest = ResidentForest.fit(RandomForestClassifier(**params), X, y, cluster=cluster)
        holders = forest.holders
        victim = holders[0][0]
        proc = cluster.processes[victim]
        # The victim takes the request but its pool runs nothing (stopped),
        # then the whole node is killed while the client waits for it.
        for child in _pool_children(proc.pid):
            os.kill(child, signal.SIGSTOP)
        out = {}
        predict = threading.Thread(target=lambda: out.update(proba=forest.predict_proba(X)))
        start = time.monotonic()
        predict.start()
        time.sleep(2.0)
        os.killpg(proc.pid, signal.SIGKILL)
        predict.join(timeout=120)
        assert not predict.is_alive()
        assert proc.wait(timeout=10) is not None
        print(f"predict with a node killed mid-predict: {time.monotonic() - start:.1f} s")
        assert np.abs(out["proba"] - reference.predict_proba(X)).max() <= PROBA_TOL
        run = forest.last_run
        # The victim was asked for the parts it held first, lost, and the
        # next copies answered.
        lost_parts = [p for p, h in enumerate(holders) if h[0] == victim]
        assert lost_parts
        for part in lost_parts:
            (node, why), = run["failed"][part]
            assert node == victim and "was lost" in why, why
            assert run["answered"][part] == holders[part][1]
        assert any(e["event"] == "pinned-lost" and e["node"] == victim for e in run["events"])
        assert victim not in run["answered"].values()

        # Now the other holder of a part the victim held goes too: every
        # copy of that part is lost, and the forest refuses to answer.
        part = next(p for p, h in enumerate(holders) if victim in h and h[0] != victim)
        second = next(n for n in holders[part] if n != victim)
        os.killpg(cluster.processes[second].pid, signal.SIGKILL)
        cluster.processes[second].wait(timeout=10)
        message = rf"part {part} of forest {forest.forest_id} \(trees \d+ to \d+\).*every copy"
        with pytest.raises(PartLostError, match=message) as caught:
            forest.predict(X)
        assert repr(victim) in str(caught.value) and repr(second) in str(caught.value)


def test_an_estimator_with_keep_nodes_holds_a_handle_not_trees(cluster, monkeypatch):
    params = dict(n_estimators=10, max_depth=6, random_state=2)
    reference = RandomForestClassifier(**params).fit(X, y)
    model = ClusterRandomForestClassifier(**params, cluster=cluster, keep="nodes", replicas=3)
    model.fit(X, y)
    try:
        assert model.estimators_ == [] and model.resident_ is not None
        assert all(len(h) == 3 for h in model.resident_.holders)
        # Every node built every tree once (3 replicas on 3 nodes), in its pool.
        assert model.fits_per_node_ == {n: 10 for n in cluster.node_names}
        assert_ran_in_pool_processes(model.fit_processes_, cluster)
        np.testing.assert_array_equal(model.classes_, reference.classes_)
        assert np.abs(model.predict_proba(X) - reference.predict_proba(X)).max() <= PROBA_TOL
        np.testing.assert_array_equal(model.predict(X), reference.predict(X))
        assert model.score(X, y) == reference.score(X, y)
        data = pickle.dumps(model)
        assert len(data) < 16_000
        # The handle's cluster pickles without its secret: the process that
        # loads it needs the secret of its own.
        monkeypatch.setenv("CLUSTERSEARCH_SECRET", cluster.secret)
        again = pickle.loads(data)
        np.testing.assert_array_equal(again.predict(X), reference.predict(X))
        with pytest.raises(ClusterSearchError, match="call to_local"):
            model.feature_importances_  # noqa: B018
        # An AttributeError too: scikit-learn's hasattr checks see no importances.
        assert not hasattr(model, "feature_importances_")
        with pytest.raises(ClusterSearchError, match="call to_local"):
            model.apply(X)
        np.testing.assert_array_equal(
            model.to_local().feature_importances_, reference.feature_importances_
        )
    finally:
        model.delete()
    with pytest.raises(ValueError, match="'keep' parameter"):
        ClusterRandomForestClassifier(keep="everywhere", cluster=cluster).fit(X, y)


def test_extra_trees_regressor_kept_on_the_nodes(cluster):
    params = dict(n_estimators=6, max_depth=5, random_state=4)
    reference = ExtraTreesRegressor(**params).fit(Xr, yr)
    model = ClusterExtraTreesRegressor(**params, cluster=cluster, keep="nodes").fit(Xr, yr)
    try:
        assert model.estimators_ == []
        assert sum(model.fits_per_node_.values()) == 6 * 2  # two copies of each part
        np.testing.assert_allclose(model.predict(Xr), reference.predict(Xr), rtol=0, atol=1e-10)
        assert model.score(Xr, yr) == pytest.approx(reference.score(Xr, yr), abs=1e-12)
    finally:
        model.delete()


# -- pinned work, without I/O ----------------------------------------------------


def _node(name, concurrency=1):
    return NodeInfo(name=name, queue="clustersearch." + name, concurrency=concurrency,
                    hostname=name, host="h", cpu_count=1, pid=1)  # fmt: skip


def test_pinned_work_goes_to_its_node_or_nowhere():
    members = Membership([_node("a"), _node("b")], Policy(queued_per_node=0), now=0.0)
    assert members.pick(only="b") == "b"
    members.took("b")
    # Full: it waits, even though "a" is free.
    assert members.pick(only="b") is None
    assert members.pick() == "a"
    members.remove("a", now=1.0)
    assert members.pick(only="a") is None
    assert members.pick(only="nobody") is None


def test_node_info_reports_its_store():
    reply = {"node": "n1", "concurrency": 2, "store_bytes": 1234, "store_limit": 10**6}
    info = NodeInfo.from_reply(reply)
    assert (info.store_bytes, info.store_limit) == (1234, 10**6)
    assert NodeInfo.from_reply({"node": "n1", "concurrency": 2}).store_bytes == 0
    with pytest.raises(ValueError, match="store_bytes"):
        NodeInfo.from_reply({**reply, "store_bytes": "lots"})
