"""``clustersearch top``: the live table of the nodes, in a real terminal."""

import os
import re
import shutil
import subprocess
import sys
import time
import uuid

import pytest
from conftest import assert_ran_on_workers
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression

from clustersearch import ClusterGridSearchCV, NodeInfo
from clustersearch.cli import main

X, y = make_classification(n_samples=120, n_features=5, random_state=0)
GRID = {"C": [0.1, 1.0, 10.0], "fit_intercept": [True, False]}
EXITED = "clustersearch-top-exited-"


def _tmux():
    found = shutil.which("tmux")
    if found is None:
        if os.environ.get("CLUSTERSEARCH_REQUIRE_BROKERS") == "1" or os.environ.get("CI"):
            pytest.fail("CI must have tmux (.ci/run installs it)")
        pytest.skip("no tmux here: apt-get install tmux")
    return found


class Pane:
    """A tmux pane on a server of its own (``-L``): the user's tmux is left alone."""

    def __init__(self, tmux, command, env):
        self.base = [tmux, "-L", f"cstop-{uuid.uuid4().hex[:8]}"]
        subprocess.run(
            [*self.base, "-f", "/dev/null", "new-session", "-d", "-s", "top",
             "-x", "230", "-y", "40", command],
            check=True, env=env, timeout=30,
        )  # fmt: skip

    def text(self):
        return subprocess.run(
            [*self.base, "capture-pane", "-p", "-t", "top"],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout  # fmt: skip

    def send(self, *keys):
        subprocess.run([*self.base, "send-keys", "-t", "top", *keys], check=True, timeout=30)

    def wait_for(self, test, what, timeout=90):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.text()
            if test(text):
                return text
            time.sleep(0.5)
        raise AssertionError(f"the pane never showed {what}:\n{text}")

    def kill(self):
        subprocess.run([*self.base, "kill-server"], capture_output=True, timeout=30)


def _rows(text, names):
    """node name -> its row's cells, for the nodes in ``names``."""
    rows = {}
    for line in text.splitlines():
        cells = line.split()
        if cells and cells[0] in names:
            rows[cells[0]] = cells
    return rows


def _fits_done(text, names):
    rows = _rows(text, names)
    if set(rows) != set(names):
        return None
    # NODE HOST PROCS RUNNING QUEUED FITS-DONE ...
    return {name: int(cells[5]) for name, cells in rows.items()}


def test_top_shows_the_nodes_live_and_quits_on_ctrl_c(embedded_cluster):
    tmux = _tmux()
    cluster = embedded_cluster
    names = set(cluster.node_names)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        os.environ.get("PYTHONPATH"),
    ]))}  # fmt: skip
    command = (
        f"{sys.executable} -m clustersearch top --broker '{cluster.broker_url}'; "
        f"echo {EXITED}$?; sleep 600"
    )
    pane = Pane(tmux, command, env)
    try:
        before = _fits_done(
            pane.wait_for(lambda t: _fits_done(t, names) is not None, "a row per node"),
            names,
        )
        text = pane.text()
        assert "clustersearch top" in text and "HEARTBEAT" in text, text
        for cells in _rows(text, names).values():
            # versions and a heartbeat a moment old
            assert cells[-3] != "?" and re.fullmatch(r"\d+s", cells[-2]), cells

        search = ClusterGridSearchCV(LogisticRegression(), GRID, cv=3, cluster=cluster)
        search.fit(X, y)
        assert_ran_on_workers(search, cluster, n_fits=18)
        expected = {n: before[n] + search.fits_per_node_.get(n, 0) for n in names}
        text = pane.wait_for(lambda t: _fits_done(t, names) == expected,
                             f"fits done {expected}")  # fmt: skip
        assert sum(expected.values()) > 0
        # The table was redrawn in place: one header, not a scroll of them.
        assert text.count("HEARTBEAT") == 1, text

        pane.send("C-c")
        text = pane.wait_for(lambda t: EXITED in t, "top's exit", timeout=30)
        assert f"{EXITED}0" in text, text
        assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    finally:
        pane.kill()


def test_top_on_a_dumb_terminal_prints_a_table_per_refresh(embedded_cluster, capsys,
                                                           monkeypatch):  # fmt: skip
    monkeypatch.setenv("TERM", "dumb")
    code = main(["top", "--broker", embedded_cluster.broker_url, "--interval", "0.1",
                 "--timeout", "2", "--count", "2"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "\x1b" not in out
    assert out.count("HEARTBEAT") == 2, out
    for name in embedded_cluster.node_names:
        assert out.count(f"\n{name} ") == 2, out


def test_the_new_fields_of_an_info_reply_are_checked():
    good = {"node": "n1", "concurrency": 2, "running": 1, "queued": 3, "fits_done": 40,
            "mean_fit_s": 0.25, "cache_bytes": 10**6, "cache_limit": 2 * 10**9}  # fmt: skip
    info = NodeInfo.from_reply(good)
    assert (info.running, info.queued, info.fits_done, info.mean_fit_s) == (1, 3, 40, 0.25)
    assert (info.cache_bytes, info.cache_limit) == (10**6, 2 * 10**9)
    old = NodeInfo.from_reply({"node": "n1", "concurrency": 2})  # a node before top
    assert (old.running, old.fits_done, old.mean_fit_s, old.cache_bytes) == (0, 0, 0.0, 0)
    for key, value in [("running", -1), ("queued", "3"), ("fits_done", True),
                       ("fits_done", 1.0), ("mean_fit_s", -0.5), ("mean_fit_s", float("nan")),
                       ("mean_fit_s", 10**400), ("mean_fit_s", "fast"),
                       ("cache_bytes", [1]), ("cache_limit", -5)]:  # fmt: skip
        with pytest.raises(ValueError, match=key):
            NodeInfo.from_reply({**good, key: value})
