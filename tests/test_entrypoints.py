"""The documented ways to start a node and to look at the nodes.

``celery -A clustersearch.worker worker`` (README, "A node on every
machine") builds the node's app from the environment; ``clustersearch
nodes`` prints the table of live nodes. Both run as real processes here.
"""

import os
import secrets
import signal
import subprocess
import sys
import time
import uuid

import pytest
from conftest import REDIS, assert_same_results, require_servers
from sklearn.datasets import load_iris
from sklearn.model_selection import GridSearchCV
from sklearn.svm import SVC

from clustersearch import Cluster, ClusterGridSearchCV

pytestmark = pytest.mark.broker

BROKER = REDIS + "/9"


@pytest.fixture
def celery_node(tmp_path):
    """One node started with Celery's own command line."""
    require_servers(BROKER)
    name = f"celerycli-{uuid.uuid4().hex[:6]}"
    secret = secrets.token_hex(16)
    env = dict(
        os.environ,
        CLUSTERSEARCH_BROKER_URL=BROKER,
        CLUSTERSEARCH_SECRET=secret,
        CLUSTERSEARCH_CACHE_DIR=str(tmp_path / "cache"),
        CLUSTERSEARCH_THREADS_PER_PROCESS="1",
    )
    cmd = [
        sys.executable, "-m", "celery", "-A", "clustersearch.worker", "worker",
        "-Q", f"clustersearch.{name}", "-n", f"{name}@%h", "-c", "1",
        "--loglevel", "WARNING", "--without-gossip", "--without-mingle",
    ]  # fmt: skip
    log = open(tmp_path / "node.log", "wb")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    cluster = Cluster(BROKER, secret=secret)
    try:
        deadline = time.monotonic() + 60
        while not any(n.name == name for n in cluster.nodes(timeout=0.5)):
            assert proc.poll() is None, (tmp_path / "node.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the node did not answer within 60 s"
        yield name, cluster, proc, tmp_path
    finally:
        cluster.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def test_a_node_started_with_celerys_command_line_runs_a_search(celery_node):
    name, cluster, proc, tmp_path = celery_node
    X, y = load_iris(return_X_y=True)
    grid = {"C": [0.1, 1.0, 10.0]}
    ours = ClusterGridSearchCV(SVC(), grid, cv=3, cluster=cluster).fit(X, y)
    theirs = GridSearchCV(SVC(), grid, cv=3).fit(X, y)
    assert_same_results(ours, theirs)
    assert ours.fits_per_node_ == {name: 9}
    # The node's settings came from the environment: its cache is there.
    assert (tmp_path / "cache").is_dir()
    (node,) = [n for n in cluster.nodes() if n.name == name]
    assert node.pid == proc.pid and node.concurrency == 1


def test_clustersearch_nodes_lists_the_node(celery_node):
    name, cluster, proc, tmp_path = celery_node
    out = subprocess.run(
        [sys.executable, "-m", "clustersearch", "nodes", "--broker", BROKER],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    rows = [line.split() for line in out.stdout.splitlines()]
    assert rows[0][:3] == ["NODE", "QUEUE", "CONCURRENCY"]
    mine = [row for row in rows if row and row[0] == name]
    assert mine and mine[0][1] == f"clustersearch.{name}" and mine[0][2] == "1"


def test_readmes_secret_file_example_works_as_written(tmp_path):
    """README: the node reads ``--secret-file``, the client
    ``secret=open(path).read()``, trailing newline included."""
    require_servers(BROKER)
    path = tmp_path / "secret"
    path.write_text(secrets.token_hex(32) + "\n")
    path.chmod(0o600)
    name = f"secretfile-{uuid.uuid4().hex[:6]}"
    cmd = [
        sys.executable, "-m", "clustersearch", "worker", "--broker", BROKER,
        "--name", name, "--concurrency", "1", "--loglevel", "WARNING",
        "--cache-dir", str(tmp_path / "cache"), "--secret-file", str(path),
        "--allow-root",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        cluster = Cluster(BROKER, secret=open(path).read())  # as README writes it
        deadline = time.monotonic() + 60
        while not any(n.name == name for n in cluster.nodes(timeout=0.5)):
            assert proc.poll() is None and time.monotonic() < deadline
        X, y = load_iris(return_X_y=True)
        search = ClusterGridSearchCV(SVC(), {"C": [1.0]}, cv=2, cluster=cluster).fit(X, y)
        assert search.fits_per_node_ == {name: 2}
        cluster.close()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
