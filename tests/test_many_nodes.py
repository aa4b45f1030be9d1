"""Sixteen nodes: every fit counted once, heartbeats that end early.

Sixteen one-process nodes, each a ``clustersearch worker`` in a network
namespace of its own (``netcluster.py``), a client on the host, tiny fits
(decision trees on small synthetic data) so that this 2-core machine can
carry them. The search must give scikit-learn's ``cv_results_``, with every
(candidate, split) fitted and counted exactly once, on all sixteen nodes;
heartbeat rounds must hear all sixteen and end once they have (Celery's
broadcast would wait out its timeout). The measured round times are printed
at the end of the run (``netcluster.REPORT``).
"""

import hashlib
import os
import socket
import statistics
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    RABBITMQ,
    REDIS,
    assert_same_results,
    require_servers,
    skip_broker_test,
)
from netcluster import REPORT, NetCluster, why_unavailable
from sklearn.datasets import make_classification
from sklearn.model_selection import GridSearchCV
from sklearn.tree import DecisionTreeClassifier

from clustersearch import ClusterGridSearchCV

pytestmark = [pytest.mark.cluster, pytest.mark.broker, pytest.mark.slow]

N_NODES = 16
X, y = make_classification(n_samples=200, n_features=6, random_state=0)
GRID = {"max_depth": [1, 2, 3, 4, 5, 6, 7, None], "min_samples_leaf": [1, 3]}
CV = 3
N_FITS = 16 * CV


class _MarkedTree(DecisionTreeClassifier):
    """A tree whose fit leaves ``fits/<candidate>-<fold digest>@<host>@<id>``."""

    def fit(self, X, y, **kwargs):
        folder = os.environ.get("CLUSTERSEARCH_TEST_MARKERS")
        if folder:
            digest = hashlib.sha1(np.ascontiguousarray(X).tobytes()).hexdigest()[:12]
            fit = f"{self.max_depth}-{self.min_samples_leaf}-{digest}"
            marks = Path(folder) / "fits"
            marks.mkdir(exist_ok=True)
            (marks / f"{fit}@{socket.gethostname()}@{uuid.uuid4().hex}").touch()
        return super().fit(X, y, **kwargs)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    reason = why_unavailable()
    if reason:
        skip_broker_test(reason)
    require_servers(RABBITMQ, REDIS)
    cluster = NetCluster(
        tmp_path_factory.mktemp("many"), n_hosts=N_NODES, n_nodes=N_NODES
    ).start()
    try:
        yield cluster
    finally:
        cluster.close()


def test_sixteen_nodes_count_each_fit_once_and_heartbeats_hear_all(net):
    # No backups: a fit that ran twice would be a duplicate, not a straggler's copy.
    cluster = net.cluster(heartbeat_interval=1.0, straggler_factor=None, progress=False)
    try:
        search = ClusterGridSearchCV(_MarkedTree(random_state=0), GRID, cv=CV, cluster=cluster)
        search.fit(X, y)
        reference = GridSearchCV(DecisionTreeClassifier(random_state=0), GRID, cv=CV).fit(X, y)
    finally:
        cluster.close()
    assert_same_results(search, reference)

    # Counted once: per node, in the timeline, and run once on the nodes.
    assert sorted(search.fits_per_node_) == sorted(net.hosts), search.fits_per_node_
    assert sum(search.fits_per_node_.values()) == N_FITS
    tasks = search.fit_timeline_["tasks"]
    assert len({t["task"] for t in tasks}) == len(tasks)
    assert sum(t["fits"] for t in tasks) == N_FITS
    per_node = Counter()
    for t in tasks:
        per_node[t["node"]] += t["fits"]
    assert per_node == Counter(search.fits_per_node_)
    runs = Counter(p.name.split("@")[0] for p in (net.markers / "fits").iterdir())
    assert len(runs) == N_FITS and set(runs.values()) == {1}, runs.most_common(3)
    assert not [e for e in search.fit_timeline_["events"] if e["event"] == "lost"]

    # Each heartbeat round heard every node; rounds end once all sixteen
    # answered, not at the reply timeout (1 s here).
    rounds = search.fit_timeline_["heartbeats"]
    assert rounds, "no heartbeat round during the search"
    assert {r["answered"] for r in rounds} == {N_NODES}, rounds
    seconds = [r["round_s"] for r in rounds]
    assert min(seconds) < cluster.policy.reply_timeout, seconds

    # The same, measured outside a search (Cluster.nodes with expect=).
    with net.cluster() as probe:
        timed = []
        for _ in range(5):
            start = time.monotonic()
            found = probe.nodes(timeout=2.0, expect=net.hosts)
            timed.append(time.monotonic() - start)
            assert [n.name for n in found] == sorted(net.hosts)
    assert min(timed) < 2.0, timed
    REPORT.append(
        f"16 nodes: heartbeat round during the search median {statistics.median(seconds) * 1e3:.0f} "
        f"ms (max {max(seconds) * 1e3:.0f} ms, {len(seconds)} rounds); idle "
        f"median {statistics.median(timed) * 1e3:.0f} ms"
    )
