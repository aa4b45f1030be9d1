"""The cluster handle, the joblib backend, the CLI and bad input."""

import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    REDIS,
    assert_ran_in_pool_processes,
    assert_ran_on_workers,
    assert_same_results,
    require_servers,
    session_processes,
)
from joblib import Parallel, delayed
from sklearn.base import clone
from sklearn.datasets import load_iris, make_classification
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, cross_validate
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from clustersearch import Cluster, ClusterGridSearchCV, LocalCluster
from clustersearch.exceptions import (
    BrokerUnreachableError,
    ClusterSearchError,
    NotPicklableError,
    NoWorkersError,
)

X, y = load_iris(return_X_y=True)
GRID = {"C": [0.1, 1, 10], "kernel": ["linear", "rbf"]}


def _pid():
    return os.getpid()


class _RecordsPid(SVC):
    """An SVC that records which process fitted it."""

    def fit(self, X, y, **kwargs):
        self.fit_pid_ = os.getpid()
        return super().fit(X, y, **kwargs)


# -- where the work runs --------------------------------------------------------


def test_fits_run_in_worker_processes_not_in_client(cluster):
    search = ClusterGridSearchCV(SVC(), GRID, cv=3, cluster=cluster).fit(X, y)
    assert_ran_on_workers(search, cluster, n_fits=18)
    # Both nodes got work (18 fits, 2 nodes with room for 2 batches each).
    assert len(search.fits_per_node_) == 2


def test_joblib_backend_runs_plain_joblib_and_sklearn_code(embedded_cluster):
    client_pid = os.getpid()
    with embedded_cluster.joblib() as session:
        pids = Parallel(n_jobs=2)(delayed(_pid)() for _ in range(6))
        scores = cross_validate(LogisticRegression(max_iter=500), X, y, cv=4)
        plain = GridSearchCV(SVC(), GRID, cv=3, n_jobs=-1).fit(X, y)
    assert len(pids) == 6 and client_pid not in pids
    processes = session_processes(session)
    # The calls say where they ran, and so does the session: pool processes.
    assert set(pids) <= {pid for node_pids in processes.values() for pid in node_pids}
    assert_ran_in_pool_processes(processes, embedded_cluster)
    assert sum(session.fits_per_node.values()) == 6 + 4 + 18
    local = cross_validate(LogisticRegression(max_iter=500), X, y, cv=4)
    np.testing.assert_array_equal(scores["test_score"], local["test_score"])
    assert plain.best_params_ == GridSearchCV(SVC(), GRID, cv=3).fit(X, y).best_params_


def test_n_jobs_1_still_runs_on_the_cluster(embedded_cluster):
    search = ClusterGridSearchCV(SVC(), GRID, cv=3, n_jobs=1, cluster=embedded_cluster)
    search.fit(X, y)
    assert_ran_on_workers(search, embedded_cluster, n_fits=18)


def test_estimator_with_inner_n_jobs_works_on_a_node(embedded_cluster):
    Xc, yc = make_classification(n_samples=200, random_state=0)
    forest = RandomForestClassifier(n_estimators=8, n_jobs=-1, random_state=0)
    grid = {"max_depth": [2, 4]}
    ours = ClusterGridSearchCV(forest, grid, cv=3, cluster=embedded_cluster).fit(Xc, yc)
    theirs = GridSearchCV(forest, grid, cv=3).fit(Xc, yc)
    np.testing.assert_array_equal(
        ours.cv_results_["mean_test_score"], theirs.cv_results_["mean_test_score"]
    )
    assert_ran_on_workers(ours, embedded_cluster, n_fits=6)


def _blas_threads():
    from threadpoolctl import threadpool_info

    return {info["internal_api"]: info["num_threads"] for info in threadpool_info()}


def test_fits_run_with_capped_blas_threads(embedded_cluster):
    # 2 nodes x 1 process on this machine: each fit gets cores // 2 threads.
    expected = max(1, os.cpu_count() // 2)
    with embedded_cluster.joblib():
        seen = Parallel()(delayed(_blas_threads)() for _ in range(4))
    assert all(seen), "no BLAS/OpenMP library loaded on the nodes"
    for threads in seen:
        assert set(threads.values()) == {expected}, threads


def test_refit_runs_in_the_client(embedded_cluster):
    search = ClusterGridSearchCV(_RecordsPid(), GRID, cv=3, cluster=embedded_cluster).fit(X, y)
    assert search.refit_time_ > 0
    assert search.best_estimator_.fit_pid_ == os.getpid(), "the refit ran elsewhere"
    assert_ran_on_workers(search, embedded_cluster, n_fits=18)
    np.testing.assert_array_equal(
        search.predict(X),
        GridSearchCV(SVC(), GRID, cv=3).fit(X, y).predict(X),
    )


def test_progress_bar_counts_fits(embedded_cluster, capsys):
    cluster = Cluster(
        embedded_cluster.broker_url,
        embedded_cluster.backend,
        progress=True,
        secret=embedded_cluster.secret,
    )
    cluster.nodes = embedded_cluster.nodes  # same nodes, progress on
    ClusterGridSearchCV(SVC(), GRID, cv=3, cluster=cluster).fit(X, y)
    err = capsys.readouterr().err
    assert "18/18 fits 100%" in err


# -- the estimator contract -------------------------------------------------------


def test_clone_shares_the_cluster_handle(embedded_cluster):
    search = ClusterGridSearchCV(SVC(), GRID, cluster=embedded_cluster)
    assert clone(search).cluster is embedded_cluster
    assert clone(search).get_params()["cluster"] is embedded_cluster


def test_fitted_search_pickles(embedded_cluster):
    search = ClusterGridSearchCV(SVC(), GRID, cv=3, cluster=embedded_cluster).fit(X, y)
    restored = pickle.loads(pickle.dumps(search))
    np.testing.assert_array_equal(restored.predict(X), search.predict(X))
    assert restored.cluster.broker_url == embedded_cluster.broker_url
    assert restored.fits_per_node_ == search.fits_per_node_


def test_repr_hides_the_password():
    cluster = Cluster("amqp://remote:hunter2@pine0:5672//")
    assert "hunter2" not in repr(cluster)
    assert "hunter2" not in repr(ClusterGridSearchCV(SVC(), GRID, cluster=cluster))


def test_search_inside_a_pipeline_step(embedded_cluster):
    inner = ClusterGridSearchCV(SVC(), GRID, cv=3, cluster=embedded_cluster)
    pipe = make_pipeline(StandardScaler(), inner).fit(X, y)
    reference = make_pipeline(StandardScaler(), GridSearchCV(SVC(), GRID, cv=3)).fit(X, y)
    np.testing.assert_array_equal(pipe.predict(X), reference.predict(X))
    assert_ran_on_workers(pipe[-1], embedded_cluster, n_fits=18)


# -- bad input: a clear error before anything is sent, never a hang ---------------


def test_invalid_parameter_uses_sklearns_validation():
    # No cluster is contacted: the URL would not even resolve.
    search = ClusterGridSearchCV(SVC(), GRID, cv="five", cluster="amqp://nowhere.invalid//")
    with pytest.raises(ValueError, match="'cv' parameter"):
        search.fit(X, y)


def test_invalid_cluster_type():
    search = ClusterGridSearchCV(SVC(), GRID, cluster=42)
    with pytest.raises(ValueError, match="'cluster' parameter"):
        search.fit(X, y)


def test_broker_unreachable_names_url_without_password():
    cluster = Cluster("amqp://remote:hunter2@127.0.0.1:1//", connect_timeout=2)
    start = time.monotonic()
    with pytest.raises(BrokerUnreachableError) as info:
        ClusterGridSearchCV(SVC(), GRID, cluster=cluster).fit(X, y)
    assert time.monotonic() - start < 30  # a guard against hangs
    message = str(info.value)
    assert "127.0.0.1:1" in message and "hunter2" not in message
    assert isinstance(info.value, ConnectionError)


@pytest.mark.broker
def test_no_live_node_on_a_broker_is_a_clear_error():
    require_servers(REDIS)
    cluster = Cluster(REDIS + "/5", discovery_timeout=0.5)
    start = time.monotonic()
    with pytest.raises(NoWorkersError, match="clustersearch worker --broker"):
        ClusterGridSearchCV(SVC(), GRID, cluster=cluster).fit(X, y)
    assert time.monotonic() - start < 30  # a guard against hangs


def test_no_live_node_on_the_embedded_transport(tmp_path):
    cluster = Cluster(f"filesystem://{tmp_path}", discovery_timeout=0.3)
    with pytest.raises(NoWorkersError):
        ClusterGridSearchCV(SVC(), GRID, cluster=cluster).fit(X, y)


class _HoldsALock(SVC):
    def __init__(self, C=1.0, lock=None):
        super().__init__(C=C)
        self.lock = lock


def test_unpicklable_estimator_is_named_before_dispatch(embedded_cluster):
    estimator = make_pipeline(StandardScaler(), _HoldsALock(lock=threading.Lock()))
    search = ClusterGridSearchCV(estimator, {"_holdsalock__C": [1, 2]}, cluster=embedded_cluster)
    with pytest.raises(NotPicklableError, match=r"estimator\.steps\[1\]\[1\]\.lock"):
        search.fit(X, y)
    assert not hasattr(search, "fits_per_node_")


def test_unpicklable_scorer_is_named(embedded_cluster):
    lock = threading.Lock()

    def scorer(estimator, X, y, _lock=lock):
        return 0.0

    search = ClusterGridSearchCV(SVC(), GRID, scoring=scorer, cluster=embedded_cluster)
    with pytest.raises(NotPicklableError, match="scoring="):
        search.fit(X, y)


def test_lambda_scorer_travels_by_value(embedded_cluster):
    # cloudpickle sends functions defined here by value: this works.
    search = ClusterGridSearchCV(
        SVC(), GRID, cv=3, scoring=lambda est, X, y: est.score(X, y), cluster=embedded_cluster
    ).fit(X, y)
    assert_ran_on_workers(search, embedded_cluster, n_fits=18)


def test_errors_are_picklable():
    for error in (BrokerUnreachableError("x"), NoWorkersError("y"), NotPicklableError("z")):
        restored = pickle.loads(pickle.dumps(error))
        assert type(restored) is type(error) and str(restored) == str(error)
        assert isinstance(restored, ClusterSearchError)


# -- the command line ----------------------------------------------------------------


def test_cli_nodes_lists_the_nodes(embedded_cluster):
    out = subprocess.run(
        [sys.executable, "-m", "clustersearch", "nodes", "--broker", embedded_cluster.broker_url],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    for name in embedded_cluster.node_names:
        assert name in out
    assert "2 nodes, 2 worker processes" in out


def test_cli_worker_refuses_root_without_allow_root(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("only meaningful as root")
    env = {k: v for k, v in os.environ.items() if k != "C_FORCE_ROOT"}
    proc = subprocess.run(
        [sys.executable, "-m", "clustersearch", "worker", "--broker", f"filesystem://{tmp_path}"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "--allow-root" in proc.stderr


def test_default_cluster_from_environment(embedded_cluster, monkeypatch):
    monkeypatch.setenv("CLUSTERSEARCH_BROKER_URL", embedded_cluster.broker_url)
    monkeypatch.setenv("CLUSTERSEARCH_SECRET", embedded_cluster.secret)
    search = ClusterGridSearchCV(SVC(), GRID, cv=3).fit(X, y)
    assert_ran_on_workers(search, embedded_cluster, n_fits=18)


def test_default_cluster_is_an_embedded_local_cluster_in_a_fresh_process(tmp_path):
    # cluster=None without CLUSTERSEARCH_BROKER_URL: the search starts an
    # embedded LocalCluster of its own (one node per core) on first use.
    script = tmp_path / "default.py"
    script.write_text(
        "import json, os\n"
        "from pathlib import Path\n"
        "from sklearn.datasets import load_iris\n"
        "from sklearn.svm import SVC\n"
        "from clustersearch import ClusterGridSearchCV\n"
        "from clustersearch.client.cluster import resolve_cluster\n"
        "X, y = load_iris(return_X_y=True)\n"
        "s = ClusterGridSearchCV(SVC(), {'C': [0.1, 1, 10]}, cv=3).fit(X, y)\n"
        "def parent(pid):\n"
        "    return int(Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[1])\n"
        "print(json.dumps({\n"
        "    'client': os.getpid(),\n"
        "    'fits': s.fits_per_node_,\n"
        "    'parents': {n: [parent(p) for p in ps] for n, ps in s.fit_processes_.items()},\n"
        "    'nodes': {n.name: n.pid for n in resolve_cluster(None).nodes()},\n"
        "}))\n"
    )
    env = {k: v for k, v in os.environ.items()
           if k not in ("CLUSTERSEARCH_BROKER_URL", "CLUSTERSEARCH_RESULT_BACKEND",
                        "CLUSTERSEARCH_SECRET", "CLUSTERSEARCH_SECRET_FILE")}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300,
        env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sum(seen["fits"].values()) == 9, seen
    assert len(seen["nodes"]) == (os.cpu_count() or 1), seen
    assert all(name.startswith("local") for name in seen["nodes"]), seen
    assert set(seen["fits"]) <= set(seen["nodes"]) and seen["fits"], seen
    for name, parents in seen["parents"].items():
        # Each fit ran in a pool process of its node, not in the client.
        assert parents and set(parents) == {seen["nodes"][name]}, seen
    assert seen["client"] not in seen["nodes"].values()


@pytest.mark.broker
def test_a_broker_url_as_cluster(monkeypatch):
    # cluster="redis://...": a handle on whatever nodes serve that broker.
    # These were started with a random secret: the client takes it from the
    # environment, as a user's would.
    from clustersearch.client.cluster import resolve_cluster

    url = REDIS + "/9"
    require_servers(url)
    with LocalCluster(n_workers=2, broker_url=url, allow_root=True) as nodes:
        monkeypatch.setenv("CLUSTERSEARCH_SECRET", nodes.secret)
        monkeypatch.delenv("CLUSTERSEARCH_BROKER_URL", raising=False)
        try:
            search = ClusterGridSearchCV(SVC(), GRID, cv=3, cluster=url).fit(X, y)
            assert search.cluster == url
            assert_ran_on_workers(search, nodes, n_fits=18)
            assert_same_results(search, GridSearchCV(SVC(), GRID, cv=3).fit(X, y))
        finally:
            resolve_cluster(url).close()


@pytest.mark.parametrize("kwargs", [{"prefer": "threads"}, {"require": "sharedmem"}])
def test_thread_parallel_stays_local_inside_the_joblib_block(embedded_cluster, kwargs):
    # Calls that ask for threads or shared memory hold work on shared
    # objects: they run in the client, in threads; the others go to the nodes.
    with embedded_cluster.joblib() as session:
        local = Parallel(n_jobs=2, **kwargs)(delayed(_pid)() for _ in range(4))
        remote = Parallel(n_jobs=2)(delayed(_pid)() for _ in range(4))
    assert local == [os.getpid()] * 4
    assert len(remote) == 4 and os.getpid() not in remote
    assert sum(session.fits_per_node.values()) == 4  # the remote calls only
    processes = session_processes(session)
    assert set(remote) <= {pid for node_pids in processes.values() for pid in node_pids}
    assert_ran_in_pool_processes(processes, embedded_cluster)


def test_local_cluster_reports_a_node_that_cannot_start():
    with pytest.raises(ClusterSearchError, match="(?s)exited with code 1.*--concurrency must be >= 1"):
        LocalCluster(n_workers=1, concurrency=0)


def test_unknown_transport_is_a_clear_error():
    with pytest.raises(BrokerUnreachableError, match="No such transport"):
        Cluster("nosuchtransport://x").nodes()


# -- a node that dies mid-search --------------------------------------------------


class _SlowSVC(SVC):
    def fit(self, X, y, **kwargs):
        time.sleep(0.3)
        return super().fit(X, y, **kwargs)


def test_search_survives_a_node_killed_mid_search():
    import signal

    grid = {"C": [0.1, 1, 10, 100], "kernel": ["linear", "rbf"]}
    with LocalCluster(n_workers=2, heartbeat_interval=0.5, missed_heartbeats=2) as cluster:
        search = ClusterGridSearchCV(_SlowSVC(), grid, cv=3, cluster=cluster)
        victim = cluster.processes[cluster.node_names[0]]
        killer = threading.Timer(1.5, os.killpg, (victim.pid, signal.SIGKILL))
        killer.start()
        try:
            search.fit(X, y)
        finally:
            killer.cancel()
            killer.join(timeout=10)
        assert victim.poll() is not None, "the node was not killed during the search"
    reference = GridSearchCV(SVC(), grid, cv=3).fit(X, y)
    np.testing.assert_array_equal(
        search.cv_results_["mean_test_score"], reference.cv_results_["mean_test_score"]
    )
    # Every fit counted once, whichever node ran it.
    assert sum(search.fits_per_node_.values()) == 24
    assert search.fits_per_node_[cluster.node_names[1]] > 12


class _MarkedSlowSVC(_SlowSVC):
    """Touches $CLUSTERSEARCH_TEST_FIT_MARKER (inherited by the nodes) as a
    fit starts: the test kills the node once the search is running, not at
    a fixed time that a slow discovery can outlast."""

    def fit(self, X, y, **kwargs):
        marker = os.environ.get("CLUSTERSEARCH_TEST_FIT_MARKER")
        if marker:
            with open(marker, "a"):
                pass
        return super().fit(X, y, **kwargs)


def test_every_node_gone_is_an_error_not_a_hang(tmp_path, monkeypatch):
    import signal

    marker = tmp_path / "a-fit-started"
    monkeypatch.setenv("CLUSTERSEARCH_TEST_FIT_MARKER", str(marker))
    with LocalCluster(
        n_workers=1, heartbeat_interval=0.5, missed_heartbeats=2, no_node_timeout=2.0
    ) as cluster:
        search = ClusterGridSearchCV(_MarkedSlowSVC(), GRID, cv=3, cluster=cluster)
        (victim,) = cluster.processes.values()
        stop = threading.Event()

        def kill_once_a_fit_runs():
            while not stop.wait(0.05):
                if marker.exists():
                    os.killpg(victim.pid, signal.SIGKILL)
                    return

        killer = threading.Thread(target=kill_once_a_fit_runs, daemon=True)
        killer.start()
        start = time.monotonic()
        try:
            with pytest.raises(NoWorkersError, match="stopped answering.*no_node_timeout=2.0"):
                search.fit(X, y)
        finally:
            stop.set()
            killer.join(timeout=10)
        assert victim.poll() is not None, "the node was not killed during the search"
        # The kill as the first fit runs, detection (2 to 3 heartbeats, up to
        # 0.5 s of reply wait each), then no_node_timeout: about 5 s. A guard
        # against hangs:
        assert time.monotonic() - start < 30


class _DiesOnC100(SVC):
    """Its fit kills its own worker process, as the kernel's OOM killer would."""

    def fit(self, X, y, **kwargs):
        if self.C == 100:
            os.kill(os.getpid(), 9)
        return super().fit(X, y, **kwargs)


@pytest.mark.slow
def test_a_fit_that_kills_its_worker_every_time_ends_as_error_score(embedded_cluster):
    from sklearn.exceptions import FitFailedWarning

    grid = {"C": [1, 100, 10]}
    search = ClusterGridSearchCV(_DiesOnC100(), grid, cv=3, cluster=embedded_cluster)
    start = time.monotonic()
    with pytest.warns(FitFailedWarning) as warned:
        search.fit(X, y)
    elapsed = time.monotonic() - start
    message = "\n".join(str(w.message) for w in warned)
    # The reason names the nodes and what happened there; max_retries=2.
    assert "NodeFailureError: a batch of 1 fit(s) was lost 3 times" in message
    assert "its worker process died" in message and "SIGKILL" in message
    for name in embedded_cluster.node_names:
        assert f"on node {name!r}" in message
    scores = search.cv_results_["mean_test_score"]
    reference = GridSearchCV(SVC(), grid, cv=3).fit(X, y).cv_results_["mean_test_score"]
    assert np.isnan(scores[1])
    np.testing.assert_array_equal(scores[[0, 2]], reference[[0, 2]])
    # The other fits ran once each; the lost ones are counted nowhere.
    assert sum(search.fits_per_node_.values()) == 6
    assert elapsed < 60


def test_a_fit_lost_every_time_with_error_score_raise(embedded_cluster):
    from clustersearch.exceptions import NodeFailureError

    search = ClusterGridSearchCV(
        _DiesOnC100(), {"C": [100]}, cv=2, error_score="raise", cluster=embedded_cluster
    )
    with pytest.raises(NodeFailureError, match="lost 3 times.*on node 'local"):
        search.fit(X, y)


class _Marks(SVC):
    """A fit far longer than the test (C=2: one that fails at once).

    A long fit leaves ``<pid>-<id>.start`` in ``marker_dir`` when it starts,
    and ``<pid>-<id>.done`` if it ever ends.
    """

    def __init__(self, C=1.0, marker_dir=None):
        super().__init__(C=C)
        self.marker_dir = marker_dir

    def fit(self, X, y, **kwargs):
        import uuid

        if self.C == 2:
            raise ValueError("C=2 fails at once")
        mark = Path(self.marker_dir, f"{os.getpid()}-{uuid.uuid4().hex}")
        mark.with_suffix(".start").touch()
        time.sleep(60.0)
        mark.with_suffix(".done").touch()
        return super().fit(X, y, **kwargs)


def _alive(pid):
    """Whether process ``pid`` runs (a zombie, killed and not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _started_fit_processes(folder):
    return {int(p.name.split("-")[0]) for p in folder.glob("*.start")}


def _wait_until_gone(pids, seconds):
    """The pids still running after up to ``seconds`` (a guard against hangs)."""
    deadline = time.monotonic() + seconds
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return {pid for pid in pids if _alive(pid)}


@pytest.mark.parametrize("how", ["ctrl-c", "exception"])
def test_interrupting_the_client_stops_the_nodes(embedded_cluster, tmp_path, how):
    # The long fits take 60 s: one still running, or its process alive,
    # after the search ended was not stopped. The waits below are guards
    # against hangs, far longer than stopping takes.
    import _thread

    # "exception": the first candidate's fits raise at once (error_score
    # "raise"), while the nodes may hold the next candidates' long fits.
    grid = {"C": [1, 3, 4, 5]} if how == "ctrl-c" else {"C": [2, 1, 3]}
    search = ClusterGridSearchCV(
        _Marks(marker_dir=str(tmp_path)), grid, cv=3, error_score="raise",
        cluster=embedded_cluster,
    )  # fmt: skip

    def interrupt_once_a_fit_runs():
        deadline = time.monotonic() + 60
        while not any(tmp_path.glob("*.start")) and time.monotonic() < deadline:
            time.sleep(0.05)
        _thread.interrupt_main()

    interrupter = threading.Thread(target=interrupt_once_a_fit_runs, daemon=True)
    expected = KeyboardInterrupt if how == "ctrl-c" else ValueError
    if how == "ctrl-c":
        interrupter.start()
    with pytest.raises(expected):
        search.fit(X, y)
    if how == "ctrl-c":
        interrupter.join(timeout=60)
        assert not interrupter.is_alive()
        # Fits were running at the interrupt: they must be stopped.
        assert _started_fit_processes(tmp_path), "no fit ran at the interrupt"
    # Every long fit that started was stopped: its process killed (the
    # node's pool replaces it), its end never reached.
    running = _wait_until_gone(_started_fit_processes(tmp_path), 30)
    logs = "\n".join(embedded_cluster.log(name)[-1500:] for name in embedded_cluster.node_names)
    assert not running, f"processes {running} kept computing a dead search; logs:\n{logs}"
    # The nodes are still there for the next search; by its end, whatever
    # the nodes held of the dead search has been dropped or stopped too.
    search = ClusterGridSearchCV(SVC(), GRID, cv=3, cluster=embedded_cluster).fit(X, y)
    assert_ran_on_workers(search, embedded_cluster, n_fits=18)
    started = _started_fit_processes(tmp_path)
    assert not {pid for pid in started if _alive(pid)}, "a node ran a fit of a dead search"
    assert not list(tmp_path.glob("*.done")), "a fit of a dead search ran to its end"


class _SlowToLoad(_Marks):
    """A long fit (see _Marks) whose task takes 3 s to unpickle on the node:
    ``<pid>.loading`` when it begins, ``<pid>.loaded`` when it ends."""

    def __setstate__(self, state):
        folder = Path(state["marker_dir"])
        (folder / f"{os.getpid()}.loading").touch()
        time.sleep(3.0)
        super().__setstate__(state)
        (folder / f"{os.getpid()}.loaded").touch()


def test_a_task_stopped_before_its_fit_begins_never_fits(embedded_cluster, tmp_path):
    # A pool process that has taken a task but not begun its fit (verifying
    # it, fetching data, unpickling) drops the stop signal: outside a fit it
    # cannot tell a stop for this task from a late one for the task before.
    # Such a fit then ran to its end (60 s here), and on the embedded
    # transport the node's main process, blocked handing the next message to
    # its busy pool, answered nothing meanwhile: the next search lost the
    # node. The revoke's mark on the node stops the fit as it begins.
    import _thread

    search = ClusterGridSearchCV(
        _SlowToLoad(marker_dir=str(tmp_path)), {"C": [1, 3]}, cv=3, cluster=embedded_cluster
    )

    def interrupt_while_loading():
        deadline = time.monotonic() + 60
        while not any(tmp_path.glob("*.loading")) and time.monotonic() < deadline:
            time.sleep(0.05)
        _thread.interrupt_main()

    interrupter = threading.Thread(target=interrupt_while_loading, daemon=True)
    interrupter.start()
    with pytest.raises(KeyboardInterrupt):
        search.fit(X, y)
    interrupter.join(timeout=60)
    assert any(tmp_path.glob("*.loading")), "no task was loading at the interrupt"
    # Guards against hangs: every load that began ends (or its process is
    # killed), and a fit would begin right after it.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(
        _alive(int(p.stem)) and not (tmp_path / f"{p.stem}.loaded").exists()
        for p in tmp_path.glob("*.loading")
    ):
        time.sleep(0.1)
    time.sleep(1.0)
    assert not _started_fit_processes(tmp_path), "a fit stopped before it began ran"
    # Both nodes still answer, and run the next search.
    search = ClusterGridSearchCV(SVC(), GRID, cv=3, cluster=embedded_cluster).fit(X, y)
    assert_ran_on_workers(search, embedded_cluster, n_fits=18)


def _pool_processes(cluster):
    from netcluster import child_pids

    return {name: child_pids(proc.pid) for name, proc in cluster.processes.items()}


def _fits_within(search, seconds):
    """Whether ``search.fit(X, y)`` returns within ``seconds`` (a hang: False)."""
    done = []
    thread = threading.Thread(target=lambda: done.append(search.fit(X, y)), daemon=True)
    thread.start()
    thread.join(timeout=seconds)
    return bool(done)


@pytest.mark.parametrize(
    "transport", ["embedded", pytest.param("redis", marks=pytest.mark.broker)]
)
def test_a_stop_signal_outside_a_fit_leaves_the_node_working(transport):
    # A revoke reaches a pool process at any moment, also after its fit has
    # finished: while it reports the result or waits for its next task. On
    # the embedded transport its pool's processes share locks on the pool's
    # pipes, and a process killed there died holding one: the node then
    # answered heartbeats but ran nothing again (a search hung for ever).
    # Here the signal reaches idle pool processes: they must drop it (a
    # SIGTERM killed them and the pool replaced them), and the node keep
    # working. test_searches_stopped_while_fits_finish_... hits the lock.
    import signal

    from clustersearch.wire.protocol import STOP_SIGNAL

    kwargs = {} if transport == "embedded" else {"broker_url": REDIS + "/7", "allow_root": True}
    if transport == "redis":
        require_servers(REDIS)
    with LocalCluster(n_workers=1, concurrency=2, **kwargs) as cluster:
        ClusterGridSearchCV(SVC(), GRID, cv=3, cluster=cluster).fit(X, y)
        (before,) = _pool_processes(cluster).values()
        assert len(before) == 2
        for pid in before:
            os.kill(pid, getattr(signal, STOP_SIGNAL))
        time.sleep(0.5)
        assert _pool_processes(cluster) == {cluster.node_names[0]: before}

        search = ClusterGridSearchCV(SVC(), GRID, cv=3, cluster=cluster)
        assert _fits_within(search, 60), "the node took the search's work but ran none of it"
        assert_ran_on_workers(search, cluster, n_fits=18)


def test_scikit_learn_callbacks_report_back_from_nodes_on_this_machine():
    # Callbacks (scikit-learn >= 1.9) send what they see from the worker
    # processes to the client over a local socket: nodes on this machine
    # reach it. (Nodes on other machines cannot: refused, test_faults.)
    from sklearn.callback import ScoringMonitor

    grid = {"C": [0.1, 1, 10]}
    local, remote = ScoringMonitor(scoring="accuracy"), ScoringMonitor(scoring="accuracy")
    expected = GridSearchCV(LogisticRegression(max_iter=1000).set_callbacks(local), grid, cv=3).fit(X, y)
    with LocalCluster(n_workers=2) as cluster:
        search = ClusterGridSearchCV(
            LogisticRegression(max_iter=1000).set_callbacks(remote), grid, cv=3, cluster=cluster
        ).fit(X, y)
        assert_ran_on_workers(search, cluster, 9)
    assert_same_results(search, expected)
    rows = sorted(
        (r["task_id_path"], r["accuracy"]) for r in remote.get_logs().data
    )  # fmt: skip
    assert rows == sorted((r["task_id_path"], r["accuracy"]) for r in local.get_logs().data)
    assert len(rows) > 9


@pytest.mark.slow
@pytest.mark.timeout(120)  # without stall detection the search never ends
def test_a_node_whose_pool_is_stuck_loses_its_work():
    # The embedded transport's blocking pool, where a pool deadlock hung a
    # search before (see above): a node whose only pool process is frozen
    # still answers heartbeats; it takes work and starts none of it. The
    # client takes that work away once the node reports 10 s of stall
    # (STALL_FLOOR_S); with straggler backups off nothing else rescues it.
    import signal

    kwargs = dict(heartbeat_interval=0.5, missed_heartbeats=2, straggler_factor=1e6)
    with LocalCluster(n_workers=2, concurrency=1, **kwargs) as cluster:
        frozen = cluster.node_names[0]
        (pid,) = _pool_processes(cluster)[frozen]
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            search = ClusterGridSearchCV(_SleepsAWhile(), GRID, cv=3, cluster=cluster)
            search.fit(X, y)
            took = time.monotonic() - started
        finally:
            os.kill(pid, signal.SIGCONT)
        assert search.fits_per_node_ == {cluster.node_names[1]: 18}, search.fits_per_node_
        assert took >= 10.0, took  # the frozen node did hold work for 10 s
        expected = GridSearchCV(_SleepsAWhile(), GRID, cv=3).fit(X, y)
        assert_same_results(search, expected)


class _FailsOnC2(SVC):
    """Short fits; those with C=2 raise, which ends an error_score="raise" search."""

    def fit(self, X, y, **kwargs):
        time.sleep(0.05 if self.C == 2 else 0.02)
        if self.C == 2:
            raise ValueError("C=2 fails")
        return super().fit(X, y, **kwargs)


@pytest.mark.slow
def test_searches_stopped_while_fits_finish_leave_the_node_working():
    # Each search below ends with an error while the node's two processes
    # finish and report short fits, so its stop signals land on processes
    # in every state. Before the stop signal was guarded (_FitGuard), this
    # left the embedded node unable to run anything within 3 rounds.
    grid = {"C": [1, 3, 4, 2, 5, 6, 7, 8]}
    with LocalCluster(n_workers=1, concurrency=2) as cluster:
        for round_ in range(8):
            with pytest.raises(ValueError, match="C=2 fails"):
                ClusterGridSearchCV(
                    _FailsOnC2(), grid, cv=5, error_score="raise", cluster=cluster
                ).fit(X, y)
            search = ClusterGridSearchCV(SVC(), {"C": [1, 2]}, cv=3, cluster=cluster)
            assert _fits_within(search, 60), (
                f"the node ran nothing after {round_ + 1} stopped searches"
            )


class _Sleeps(SVC):
    """A long fit (3 s), standing for one of hours."""

    seconds = 3.0

    def fit(self, X, y, **kwargs):
        time.sleep(self.seconds)
        return super().fit(X, y, **kwargs)


class _SleepsAWhile(_Sleeps):
    seconds = 0.2


def _unacknowledged(transport, cluster):
    """Messages a node holds without having acknowledged them."""
    if transport == "redis":
        import redis

        # kombu's Redis transport keeps delivered, unacknowledged messages in
        # the "unacked" hash until they are acknowledged, or restores them to
        # their queue after visibility_timeout.
        return redis.Redis.from_url(cluster.broker_url).hlen("unacked")
    queues = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "name", "messages_unacknowledged"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    node_queues = {f"clustersearch.{name}" for name in cluster.node_names}
    return sum(
        int(count) for name, count in (line.split() for line in queues.splitlines() if line.strip())
        if name in node_queues
    )  # fmt: skip


class _StartsThenSleeps(SVC):
    """A fit that leaves a file in ``marker_dir`` as it starts, then takes 5 s."""

    def __init__(self, C=1.0, marker_dir=None):
        super().__init__(C=C)
        self.marker_dir = marker_dir

    def fit(self, X, y, **kwargs):
        import uuid

        Path(self.marker_dir, f"{uuid.uuid4().hex}.start").touch()
        time.sleep(5.0)
        return super().fit(X, y, **kwargs)


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.parametrize("queued_per_node", [0, 1])
@pytest.mark.parametrize("transport", ["rabbitmq", "redis"])
def test_a_running_fit_holds_no_unacknowledged_message(transport, queued_per_node, tmp_path):
    # A fit is acknowledged when it starts: RabbitMQ's consumer_timeout and
    # Redis's visibility_timeout only apply to unacknowledged messages, so
    # neither can redeliver a fit however long it runs. queued_per_node=0:
    # nothing waits at the node either (README, long fits). The control,
    # queued_per_node=1 (the default): the node holds the next fit's
    # message, unacknowledged, while the first runs; the count sees it.
    from conftest import RABBITMQ, skip_broker_test

    if transport == "rabbitmq":
        require_servers(RABBITMQ)
        if os.geteuid() != 0:
            skip_broker_test("rabbitmqctl needs root")
        broker, backend = RABBITMQ, REDIS + "/1"
    else:
        require_servers(REDIS)
        broker = backend = REDIS + "/6"
    with LocalCluster(
        n_workers=1, broker_url=broker, backend=backend, allow_root=True,
        queued_per_node=queued_per_node,
    ) as cluster:  # fmt: skip
        search = ClusterGridSearchCV(
            _StartsThenSleeps(marker_dir=str(tmp_path)), {"C": [1]}, cv=2, cluster=cluster
        )
        thread = threading.Thread(target=search.fit, args=(X, y), daemon=True)
        thread.start()
        try:
            # Wait (a guard against hangs) for the first fit to run.
            deadline = time.monotonic() + 60
            while not any(tmp_path.glob("*.start")) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(list(tmp_path.glob("*.start"))) == 1, "the first fit did not start"
            counts = [_unacknowledged(transport, cluster)]
            # While it runs (5 s), the held message, if any, shows up.
            while counts[-1] < queued_per_node and len(list(tmp_path.glob("*.start"))) == 1:
                time.sleep(0.1)
                counts.append(_unacknowledged(transport, cluster))
            assert max(counts) == queued_per_node, counts
        finally:
            thread.join(timeout=60)
        assert not thread.is_alive(), "the search did not end"
    assert sum(search.fits_per_node_.values()) == 2


def test_consecutive_searches_share_one_cluster(cluster):
    # Regression: an rpc:// result consumer left open by one search took
    # half of the next search's results, and the second search hung.
    for _ in range(3):
        search = ClusterGridSearchCV(SVC(), GRID, cv=3, cluster=cluster).fit(X, y)
        assert_ran_on_workers(search, cluster, n_fits=18)
