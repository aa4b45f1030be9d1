"""The result journal (issue 12): a search that outlives its client.

Real client processes (``_journal_client.py``) are SIGKILLed mid-search and
run again against the same nodes; each fit leaves a file in a log folder
from the node's pool process that ran it, so the tests count what the nodes
really executed, not what the client says.
"""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from _journal_client import LoggedTree, data, results, search
from conftest import RABBITMQ, REDIS, require_servers
from sklearn.model_selection import GridSearchCV

from clustersearch import ClusterGridSearchCV, LocalCluster
from clustersearch.cli import main as cli_main
from clustersearch.client.journal import Journal, _checksum
from clustersearch.exceptions import JournalError

CLIENT = Path(__file__).with_name("_journal_client.py")
ROOT = Path(__file__).resolve().parents[1]
GRID = {"max_depth": [1, 2, 3, 4], "min_samples_leaf": [1, 2, 4]}  # 12 x 3 folds
X, Y = data()


def _spec(cluster, tmp_path, name="a", **kw):
    log = tmp_path / "log"
    log.mkdir(exist_ok=True)
    spec = {"broker": cluster.broker_url, "backend": cluster.backend,
            "journal": str(tmp_path / "journal.sqlite"), "log_dir": str(log),
            "delay": 0.0, "kind": "grid", "grid": GRID, "out": str(tmp_path / f"{name}.json")}  # fmt: skip
    spec.update(kw)
    return spec


def _start_client(spec, cluster, tmp_path, name):
    path = tmp_path / f"{name}.spec.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "CLUSTERSEARCH_SECRET": cluster.secret,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    return subprocess.Popen([sys.executable, str(CLIENT), str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip


def _finish(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out.decode(errors="replace")[-3000:]


def _read_journal(path):
    """(keys recorded, keys of batches noted in flight), read-only."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        fits = {r[0] for r in db.execute("SELECT key FROM fits")}
        flying = {r[0] for r in db.execute("SELECT key FROM inflight")} - fits
    finally:
        db.close()
    return fits, flying


def _executions(log_dir):
    """fit -> how many times it ran; and the (pid, parent pid) that ran them."""
    runs, pids = Counter(), set()
    for f in Path(log_dir).iterdir():
        depth, leaf, rows, pid, ppid = f.read_text().split()
        if rows.startswith(f"{len(X)}:"):  # the refit, in the client
            continue
        runs[(depth, leaf, rows)] += 1
        pids.add((int(pid), int(ppid)))
    return runs, pids


def _assert_pool_processes(pids, cluster):
    """Each fit ran in a child of a node's main process (a pool process,
    which may have been replaced since)."""
    main = {n.pid for n in cluster.nodes(timeout=5)}
    for pid, ppid in pids:
        assert ppid in main and pid not in main, f"pid {pid} is not a pool process of a node"


def _kill_and_rerun(cluster, tmp_path, kill_at, after_kill=None, **kw):
    """Run a client, SIGKILL it once ``kill_at`` fits are recorded, run it
    again; return (fits run twice, fits in flight at the death, the rerun's
    report), after checking the results against scikit-learn's.
    ``after_kill(spec, recorded)``, if given, runs between the death and the
    rerun."""
    spec = _spec(cluster, tmp_path, **kw)
    journal = spec["journal"]
    first = _start_client(spec, cluster, tmp_path, "first")
    deadline = time.monotonic() + 180
    while True:
        assert first.poll() is None, first.communicate()[0].decode(errors="replace")[-3000:]
        assert time.monotonic() < deadline, "the first client recorded too few fits"
        if os.path.exists(journal):
            try:
                if len(_read_journal(journal)[0]) >= kill_at:
                    break
            except sqlite3.OperationalError:  # created, schema not yet there
                pass
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    recorded, flying = _read_journal(journal)
    ref = search(spec).fit(X, Y)
    total = len(ref.cv_results_["params"]) * ref.n_splits_
    assert kill_at <= len(recorded) < total, (len(recorded), total)
    if after_kill is not None:
        after_kill(spec, recorded)

    second = _start_client(spec, cluster, tmp_path, "second")
    _finish(second)
    report = json.loads(Path(spec["out"]).read_text())
    assert report["results"] == results(ref)
    # Every fit ran on the nodes, in their pool processes.
    runs, pids = _executions(spec["log_dir"])
    assert len(runs) == total, (len(runs), total)
    _assert_pool_processes(pids, cluster)
    twice = sum(n - 1 for n in runs.values())
    ran_by_rerun = sum(report["fits_per_node"].values())
    assert ran_by_rerun + report["from_journal"] == total
    # The rerun ran at most what the journal lacked.
    assert ran_by_rerun <= total - len(recorded)
    return twice, flying, report


@pytest.mark.slow
def test_a_killed_client_resumes_embedded(embedded_cluster, tmp_path):
    twice, flying, report = _kill_and_rerun(embedded_cluster, tmp_path, kill_at=14, delay=0.25)
    # At most the fits in flight at the death run again (file:// keeps the
    # dead client's results: the rerun collects them).
    assert twice <= len(flying), (twice, len(flying))
    print(f"embedded: in flight at the death {len(flying)}, run twice {twice}, "
          f"answered by the journal {report['from_journal']}")


@pytest.fixture(scope="module")
def redis_results_cluster():
    require_servers(RABBITMQ, REDIS)
    with LocalCluster(n_workers=2, broker_url=RABBITMQ, backend=REDIS + "/5",
                      allow_root=True) as cluster:  # fmt: skip
        yield cluster


@pytest.mark.slow
@pytest.mark.broker
def test_a_killed_client_resumes_redis_results(redis_results_cluster, tmp_path):
    twice, flying, report = _kill_and_rerun(redis_results_cluster, tmp_path, kill_at=14, delay=0.4)
    # The nodes finished what was in flight, Redis kept it: nothing twice.
    assert flying, "nothing was in flight at the death: the test proves nothing"
    assert twice == 0, (twice, len(flying))


@pytest.mark.slow
def test_a_halving_search_killed_mid_round_resumes_from_that_round(embedded_cluster, tmp_path):
    grid = {"max_depth": [1, 2, 3], "min_samples_leaf": [1, 2, 4]}
    # 27 fits in the first round, 9 in the second, 3 in the last.
    twice, flying, report = _kill_and_rerun(
        embedded_cluster, tmp_path, kill_at=30, delay=0.2, kind="halving", grid=grid
    )
    assert twice <= len(flying)
    assert report["from_journal"] >= 30


def _fit(cluster, tmp_path, grid=GRID, kind="grid", **kw):
    spec = _spec(cluster, tmp_path, kind=kind, grid=grid, **kw)
    return search(spec, cluster).fit(X, Y), search(spec).fit(X, Y)


def _ran(s):
    return sum(s.fits_per_node_.values())


def test_an_extended_grid_runs_only_the_new_candidates(embedded_cluster, tmp_path):
    small = {"max_depth": [1, 2], "min_samples_leaf": [1, 2]}
    first, _ = _fit(embedded_cluster, tmp_path, small)
    assert _ran(first) == 12 and first.fits_from_journal_ == 0
    grid = {"max_depth": [1, 2, 3], "min_samples_leaf": [1, 2, 4]}
    extended, ref = _fit(embedded_cluster, tmp_path, grid)
    assert extended.fits_from_journal_ == 12
    assert _ran(extended) == 27 - 12
    assert results(extended) == results(ref)
    runs, _ = _executions(tmp_path / "log")
    assert len(runs) == 27 and set(runs.values()) == {1}


def test_a_randomized_search_reuses_a_grids_fits(embedded_cluster, tmp_path):
    grid, _ = _fit(embedded_cluster, tmp_path)
    random, ref = _fit(embedded_cluster, tmp_path, kind="random", n_iter=5)
    assert _ran(random) == 0 and random.fits_from_journal_ == 15
    assert results(random) == results(ref)
    # Timings come from the journal: those of the grid's fits.
    def key(params):
        return tuple(sorted(params.items()))

    grid_times = dict(zip(map(key, grid.cv_results_["params"]), grid.cv_results_["mean_fit_time"]))
    for params, t in zip(random.cv_results_["params"], random.cv_results_["mean_fit_time"]):
        assert t == grid_times[key(params)]


def test_unseeded_fits_are_reused_only_when_asked(embedded_cluster, tmp_path):
    grid = {"max_depth": [2, 3]}
    first, _ = _fit(embedded_cluster, tmp_path, grid, seed=None)
    again, _ = _fit(embedded_cluster, tmp_path, grid, seed=None)
    assert _ran(again) == 6 and again.fits_from_journal_ == 0
    asked, _ = _fit(embedded_cluster, tmp_path, grid, seed=None, reuse="always")
    assert _ran(asked) == 0 and asked.fits_from_journal_ == 6
    # A candidate that sets random_state=None is unseeded too.
    none, _ = _fit(embedded_cluster, tmp_path, {"max_depth": [2], "random_state": [None]})
    assert _ran(none) == 3


def test_other_library_versions_are_not_reused_unless_asked(embedded_cluster, tmp_path):
    grid = {"max_depth": [2, 3]}
    _fit(embedded_cluster, tmp_path, grid)
    db = sqlite3.connect(tmp_path / "journal.sqlite")
    with db:  # as if recorded under another scikit-learn (checksums redone)
        for key, env, output in db.execute("SELECT key, env, output FROM fits").fetchall():
            new = env.replace("scikit-learn ", "scikit-learn 0.")
            db.execute("UPDATE fits SET env = ?, checksum = ? WHERE key = ? AND env = ?",
                       (new, _checksum(key, new, output), key, env))  # fmt: skip
    db.close()
    other, ref = _fit(embedded_cluster, tmp_path, grid)
    assert _ran(other) == 6 and other.fits_from_journal_ == 0
    db = sqlite3.connect(tmp_path / "journal.sqlite")
    with db:  # only the other versions' records left
        db.execute("DELETE FROM fits WHERE env NOT LIKE '%scikit-learn 0.%'")
    db.close()
    asked, _ = _fit(embedded_cluster, tmp_path, grid, reuse="any-version")
    assert _ran(asked) == 0 and asked.fits_from_journal_ == 6
    assert results(asked) == results(ref)


def test_a_damaged_record_runs_again_never_a_wrong_score(embedded_cluster, tmp_path):
    grid = {"max_depth": [2, 3]}
    _fit(embedded_cluster, tmp_path, grid)
    db = sqlite3.connect(tmp_path / "journal.sqlite")
    with db:
        # A plausible but wrong record: its checksum no longer matches.
        row = db.execute("SELECT key, output FROM fits LIMIT 1").fetchone()
        import pickle

        out = pickle.loads(row[1])
        out["test_scores"] = 0.0
        db.execute("UPDATE fits SET output = ? WHERE key = ?", (pickle.dumps(out), row[0]))
    db.close()
    again, ref = _fit(embedded_cluster, tmp_path, grid)
    assert _ran(again) == 1 and again.fits_from_journal_ == 5
    assert results(again) == results(ref)


def test_foreign_truncated_and_other_format_files_get_a_clear_error(embedded_cluster, tmp_path):
    foreign = tmp_path / "notes.txt"
    foreign.write_text("not a journal\n" * 100)
    with pytest.raises(JournalError, match="not a clustersearch journal"):
        ClusterGridSearchCV(LoggedTree(), {"max_depth": [1]}, cluster=embedded_cluster,
                            journal=foreign).fit(X, Y)  # fmt: skip
    assert foreign.read_text() == "not a journal\n" * 100
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(JournalError, match="not a clustersearch journal"):
        Journal(other)
    # A real journal, cut in half.
    _fit(embedded_cluster, tmp_path, {"max_depth": [1, 2, 3, 4, 5, 6]})
    path = tmp_path / "journal.sqlite"
    Journal(path).close()  # checkpointed into the file
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(JournalError, match="damaged|not a clustersearch journal"):
        _fit(embedded_cluster, tmp_path, {"max_depth": [1]})
    # Another format version.
    fresh = tmp_path / "v.sqlite"
    Journal(fresh).close()
    db = sqlite3.connect(fresh)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(JournalError, match="format 99"):
        Journal(fresh)
    with pytest.raises(JournalError, match="journal_reuse"):
        ClusterGridSearchCV(LoggedTree(), {"max_depth": [1]}, cluster=embedded_cluster,
                            journal=tmp_path / "j2.sqlite", journal_reuse="sometimes").fit(X, Y)  # fmt: skip


@pytest.mark.slow
def test_two_clients_write_one_journal_at_once(embedded_cluster, tmp_path):
    grids = [{"max_depth": [1, 2, 3], "min_samples_leaf": [1, 2]},
             {"max_depth": [2, 3, 4], "min_samples_leaf": [1, 2]}]  # fmt: skip
    specs = [_spec(embedded_cluster, tmp_path, name=f"c{i}", grid=g, delay=0.05)
             for i, g in enumerate(grids)]  # fmt: skip
    procs = [_start_client(s, embedded_cluster, tmp_path, f"c{i}") for i, s in enumerate(specs)]
    for p in procs:
        _finish(p)
    for spec in specs:
        report = json.loads(Path(spec["out"]).read_text())
        assert report["results"] == results(search(spec).fit(X, Y))
    fits, flying = _read_journal(tmp_path / "journal.sqlite")
    assert len(fits) == 3 * 4 * 2 and not flying  # the union of both grids
    db = sqlite3.connect(tmp_path / "journal.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    db.close()
    # Both recorded sound results: a third search over the union reuses all.
    union, ref = _fit(embedded_cluster, tmp_path, {"max_depth": [1, 2, 3, 4], "min_samples_leaf": [1, 2]},
                      delay=0.05)  # fmt: skip
    assert _ran(union) == 0 and results(union) == results(ref)


def test_the_journal_command_lists_and_prunes(embedded_cluster, tmp_path, capsys):
    a, _ = _fit(embedded_cluster, tmp_path, {"max_depth": [1, 2]})
    b, _ = _fit(embedded_cluster, tmp_path, {"max_depth": [5, 6]})
    path = str(tmp_path / "journal.sqlite")
    assert cli_main(["journal", path]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "LoggedTree" in line]
    assert len(lines) == 2 and all("6/6" in line for line in lines), out
    first_id = lines[0].split()[0]
    assert cli_main(["journal", path, "--prune", first_id]) == 0
    out = capsys.readouterr().out
    assert "pruned 1" in out and first_id not in out.split("pruned 1")[1]
    assert len(_read_journal(path)[0]) == 6
    assert cli_main(["journal", path, "--prune-older-than", "0"]) == 0
    assert len(_read_journal(path)[0]) == 0
    with pytest.raises(SystemExit, match="not a clustersearch journal"):
        cli_main(["journal", str(CLIENT)])


def test_the_environment_variable_turns_the_journal_on(embedded_cluster, tmp_path, monkeypatch):
    path = tmp_path / "env.sqlite"
    monkeypatch.setenv("CLUSTERSEARCH_JOURNAL", str(path))
    grid = {"max_depth": [1, 2]}
    s = ClusterGridSearchCV(LoggedTree(random_state=0), grid, cv=3, cluster=embedded_cluster)
    s.fit(X, Y)
    again = ClusterGridSearchCV(LoggedTree(random_state=0), grid, cv=3, cluster=embedded_cluster)
    again.fit(X, Y)
    assert path.exists() and again.fits_from_journal_ == 6
    ref = GridSearchCV(LoggedTree(random_state=0), grid, cv=3).fit(X, Y)
    np.testing.assert_array_equal(again.cv_results_["mean_test_score"], ref.cv_results_["mean_test_score"])
    off = ClusterGridSearchCV(LoggedTree(random_state=0), grid, cv=3, cluster=embedded_cluster,
                              journal=False).fit(X, Y)  # fmt: skip
    assert off.fits_from_journal_ == 0


def test_journal_true_is_the_user_cache_folder(embedded_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("CLUSTERSEARCH_JOURNAL", "1")  # the same as journal=True
    grid = {"max_depth": [1, 2]}
    s = ClusterGridSearchCV(LoggedTree(random_state=0), grid, cv=3, cluster=embedded_cluster)
    s.fit(X, Y)
    path = tmp_path / "cache" / "clustersearch" / "journal.sqlite"
    assert len(_read_journal(path)[0]) == 6
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    monkeypatch.delenv("CLUSTERSEARCH_JOURNAL")
    again = ClusterGridSearchCV(LoggedTree(random_state=0), grid, cv=3, cluster=embedded_cluster,
                                journal=True).fit(X, Y)  # fmt: skip
    assert again.fits_from_journal_ == 6 and _ran(again) == 0
