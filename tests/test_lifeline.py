"""A node ends with its client, and soon after SIGTERM (see _lifeline).

Real clients (Python processes killed with SIGKILL), real nodes started by
LocalCluster, real pool processes. Times are printed for the notes; they are
asserted only as generous guards against a hang.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from sklearn.datasets import load_iris
from sklearn.svm import SVC

from clustersearch import ClusterGridSearchCV, LocalCluster
from clustersearch.exceptions import NoWorkersError

X, y = load_iris(return_X_y=True)
ROOT = Path(__file__).resolve().parents[1]
# Against a hang only: the nodes end within seconds.
GUARD_S = 30.0


def _running(pid):
    """Whether ``pid`` runs (a zombie has ended: it waits to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _children(pid):
    pids = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return pids
    for task in tasks:
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return pids


def _mentioning(text):
    """Running processes whose command line mentions ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and _running(int(entry.name)):
            found.append(int(entry.name))
    return found


def _wait_until(condition, timeout):
    """Seconds until ``condition()`` held, or None after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(0.05)
    return None


def _clean_up(pids, folder):
    """Kill what a failed test left, then remove its folder."""
    for pid in pids:
        if _running(pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"clustersearch" in cmdline:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


# -- A client killed with SIGKILL ------------------------------------------------

_CLIENT = {
    "LocalCluster": """
        from clustersearch import LocalCluster

        cluster = LocalCluster(n_workers=2)
    """,
    # A process forked from the client (multiprocessing's "fork") outlives
    # it: it must not hold the nodes' lifeline.
    "LocalCluster, a forked child lives on": """
        import os, time
        from clustersearch import LocalCluster

        cluster = LocalCluster(n_workers=2)
        CHILD = os.fork()
        if CHILD == 0:
            time.sleep(600)
            os._exit(0)
    """,
    # cluster=None: the embedded cluster started on first use.
    "cluster=None": """
        from sklearn.datasets import load_iris
        from sklearn.svm import SVC

        from clustersearch import ClusterGridSearchCV
        from clustersearch.client.cluster import resolve_cluster

        X, y = load_iris(return_X_y=True)
        search = ClusterGridSearchCV(SVC(), {"C": [1, 2]}, cv=2).fit(X, y)
        assert sum(search.fits_per_node_.values()) == 4, search.fits_per_node_
        cluster = resolve_cluster(None)
    """,
}

_REPORT = """
    import json, os, time
    from pathlib import Path

    def children(pid):
        return [int(c) for t in Path(f"/proc/{pid}/task").iterdir()
                for c in (t / "children").read_text().split()]

    main = [proc.pid for proc in cluster.processes.values()]
    info = {"main": main, "pool": [c for pid in main for c in children(pid)],
            "folder": cluster.directory, "child": globals().get("CHILD")}
    Path(OUT + ".tmp").write_text(json.dumps(info))
    os.replace(OUT + ".tmp", OUT)
    time.sleep(600)
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", list(_CLIENT))
def test_a_killed_client_leaves_no_node_and_no_folder(tmp_path, how):
    out = tmp_path / "nodes.json"
    code = f"OUT = {str(out)!r}\n" + textwrap.dedent(_CLIENT[how]) + textwrap.dedent(_REPORT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("CLUSTERSEARCH_BROKER_URL", None)  # cluster=None: the embedded one
    log = open(tmp_path / "client.log", "wb")
    client = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    log.close()
    info = {"main": [], "pool": [], "folder": None}
    try:
        ready = _wait_until(lambda: out.exists() or client.poll() is not None, 120)
        assert ready is not None and out.exists(), (
            "the client did not start its nodes:\n" + (tmp_path / "client.log").read_text()
        )
        info = json.loads(out.read_text())
        nodes, folder = info["main"] + info["pool"], info["folder"]
        assert len(info["main"]) >= 2 and len(info["pool"]) >= len(info["main"]), info
        assert all(_running(pid) for pid in nodes) and Path(folder).is_dir()

        client.kill()  # SIGKILL: no atexit, no finalizer, no close()
        client.wait()

        def all_gone():
            return not any(_running(pid) for pid in nodes) and not Path(folder).exists()

        took = _wait_until(all_gone, GUARD_S)
        left = [pid for pid in nodes if _running(pid)]
        assert took is not None, (
            f"{GUARD_S} s after its client was killed, node processes {left} still ran "
            f"and the folder {'is still there' if Path(folder).exists() else 'is gone'}"
        )
        # Nothing else either: no node, pool or remover process names the folder.
        assert _wait_until(lambda: not _mentioning(folder), GUARD_S) is not None
        print(f"\n[{how}] {len(info['main'])} nodes, {len(info['pool'])} pool processes "
              f"and the folder gone {took:.2f} s after the client's SIGKILL")  # fmt: skip
        if info.get("child"):
            assert _running(info["child"]), "the forked child should still run"
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        if info.get("child") and _running(info["child"]):
            os.kill(info["child"], signal.SIGKILL)
        _clean_up(info["main"] + info["pool"], info["folder"])


def test_a_closed_lifeline_stops_a_node_started_by_hand(tmp_path):
    # The same watch, on a node not started by LocalCluster: the option is the
    # whole contract (LocalCluster passes nothing else).
    read_fd, write_fd = os.pipe()
    folder = tmp_path / "cluster"
    folder.mkdir()
    cmd = [
        sys.executable, "-m", "clustersearch", "worker",
        "--broker", f"filesystem://{folder}/transport", "--name", "by-hand",
        "--concurrency", "1", "--loglevel", "WARNING", "--cache-dir", str(folder / "cache"),
        "--allow-root", "--watch-fd", str(read_fd), "--watch-remove", str(folder),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT), CLUSTERSEARCH_SECRET="x" * 64)
    log = tmp_path / "node.log"
    with open(log, "wb") as out:
        node = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, pass_fds=(read_fd,),
            start_new_session=True,
        )  # fmt: skip
    os.close(read_fd)
    pool = []
    try:
        started = _wait_until(lambda: bool(_children(node.pid)) or node.poll() is not None, 120)
        assert started is not None and node.poll() is None, log.read_text()
        pool = _children(node.pid)
        os.close(write_fd)
        write_fd = None
        took = _wait_until(
            lambda: node.poll() is not None and not any(map(_running, pool))
            and not folder.exists(), GUARD_S,
        )  # fmt: skip
        assert took is not None, f"the node outlived its lifeline:\n{log.read_text()}"
        assert "its client is gone" in log.read_text()
        print(f"\nnode, its pool and its folder gone {took:.2f} s after the lifeline closed")
    finally:
        if write_fd is not None:
            os.close(write_fd)
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()
        _clean_up(pool, folder)


# -- SIGTERM on a node ---------------------------------------------------------


def _stop_node(proc, signum):
    """Send ``signum``; the seconds until the node ended (None: it did not)."""
    pool = _children(proc.pid)
    assert pool, "the node has no pool process"
    os.kill(proc.pid, signum)

    def ended():
        return proc.poll() is not None and not any(map(_running, pool))

    return _wait_until(ended, GUARD_S), pool


def test_sigterm_ends_an_idle_node():
    with LocalCluster(n_workers=1) as cluster:
        (proc,) = cluster.processes.values()
        took, pool = _stop_node(proc, signal.SIGTERM)
        assert took is not None, f"an idle node ignored SIGTERM for {GUARD_S} s"
        log = cluster.log(cluster.node_names[0])
        assert proc.returncode == 0, log[-2000:]
        ended_by = "its deadline" if "not over" in log else "Celery"
        print(f"\nan idle node ended {took:.2f} s after SIGTERM (ended by {ended_by})")


class _Marks(SVC):
    """A 3 s fit that leaves a file named after its process when it starts
    and when it ends."""

    def __init__(self, C=1.0, marker_dir=None, seconds=3.0):
        super().__init__(C=C)
        self.marker_dir = marker_dir
        self.seconds = seconds

    def fit(self, X, y, **kwargs):
        mark = Path(self.marker_dir, str(os.getpid()))
        mark.with_suffix(".start").touch()
        time.sleep(self.seconds)
        result = super().fit(X, y, **kwargs)
        mark.with_suffix(".done").touch()
        return result


def _node_running_a_fit(cluster, marker_dir):
    """The node (name, process) whose pool process has started a fit."""

    def started():
        return list(Path(marker_dir).glob("*.start"))

    assert _wait_until(started, 60) is not None, "no fit started"
    pid = int(started()[0].stem)
    for name, proc in cluster.processes.items():
        if pid in _children(proc.pid):
            return name, proc, pid
    raise AssertionError(f"pool process {pid} belongs to no node")


@pytest.mark.slow
def test_sigterm_lets_the_running_fit_finish_then_ends_the_node(tmp_path):
    with LocalCluster(n_workers=2, heartbeat_interval=0.5, missed_heartbeats=2) as cluster:
        search = ClusterGridSearchCV(
            _Marks(marker_dir=str(tmp_path)), {"C": [1]}, cv=2, cluster=cluster
        )
        thread = threading.Thread(target=search.fit, args=(X, y), daemon=True)
        thread.start()
        name, proc, pid = _node_running_a_fit(cluster, tmp_path)
        took, _ = _stop_node(proc, signal.SIGTERM)
        assert took is not None, f"node {name} ignored SIGTERM for {GUARD_S} s"
        # Warm: the fit ran to its end first, and the node then exited cleanly.
        assert Path(tmp_path, f"{pid}.done").exists(), "the running fit was cut short"
        assert proc.returncode == 0, cluster.log(name)[-2000:]
        thread.join(GUARD_S)
        assert not thread.is_alive(), "the search did not end"
        assert sum(search.fits_per_node_.values()) == 2
        print(f"\na node running a 3 s fit ended {took:.2f} s after SIGTERM")


def _fit_in_thread(search):
    """Start ``search.fit(X, y)``; the list its exception will be put in."""
    failed = []

    def fit():
        try:
            search.fit(X, y)
        except Exception as exc:
            failed.append(exc)

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    return thread, failed


# Its only node gone, a search fails fast.
_FAILS_FAST = dict(heartbeat_interval=0.5, missed_heartbeats=2, no_node_timeout=2.0)


@pytest.mark.slow
def test_sigquit_abandons_the_running_fit(tmp_path):
    with LocalCluster(n_workers=1, **_FAILS_FAST) as cluster:
        search = ClusterGridSearchCV(
            _Marks(marker_dir=str(tmp_path), seconds=2 * GUARD_S), {"C": [1]}, cv=2,
            cluster=cluster,
        )  # fmt: skip
        thread, failed = _fit_in_thread(search)
        name, proc, pid = _node_running_a_fit(cluster, tmp_path)
        took, _ = _stop_node(proc, signal.SIGQUIT)
        assert took is not None, f"node {name} ignored SIGQUIT for {GUARD_S} s"
        assert not Path(tmp_path, f"{pid}.done").exists()
        thread.join(GUARD_S)
        assert isinstance(failed[0], NoWorkersError), failed
        print(f"\na node running a fit ended {took:.2f} s after SIGQUIT")


@pytest.mark.slow
def test_a_search_running_when_its_cluster_closes_leaves_no_folder(tmp_path):
    # The search asks for its nodes until it gives up: a closed LocalCluster
    # answers that it has none, and does not build its transport folder again.
    cluster = LocalCluster(n_workers=1, **_FAILS_FAST)
    search = ClusterGridSearchCV(
        _Marks(marker_dir=str(tmp_path), seconds=2 * GUARD_S), {"C": [1]}, cv=2, cluster=cluster
    )
    try:
        thread, failed = _fit_in_thread(search)
        _node_running_a_fit(cluster, tmp_path)
        cluster.close()
        thread.join(GUARD_S)
        assert not thread.is_alive(), "the search did not end"
        assert isinstance(failed[0], NoWorkersError), failed
        assert not Path(cluster.directory).exists(), list(Path(cluster.directory).rglob("*"))
    finally:
        cluster.close()
        shutil.rmtree(cluster.directory, ignore_errors=True)


@pytest.mark.slow
def test_sigterm_ends_a_node_whose_pool_is_stuck():
    # A pool process that never answers (here: stopped) holds Celery's warm
    # shutdown for ever: it waits for the pool to join. The node ends anyway,
    # a few seconds after its last fit (it had none here).
    with LocalCluster(n_workers=1) as cluster:
        (name, proc), = cluster.processes.items()
        pool = _children(proc.pid)
        try:
            for pid in pool:
                os.kill(pid, signal.SIGSTOP)
            took, _ = _stop_node(proc, signal.SIGTERM)
        finally:
            for pid in pool:
                if _running(pid):
                    os.kill(pid, signal.SIGKILL)
        assert took is not None, f"node {name} with a stuck pool ignored SIGTERM for {GUARD_S} s"
        assert "shutdown not over" in cluster.log(name), cluster.log(name)[-2000:]
        print(f"\na node whose pool was stuck ended {took:.2f} s after SIGTERM")
