"""Each fit's place in time: fit_timeline_ and its Chrome trace."""

import json

import pytest
from conftest import assert_ran_on_workers
from sklearn.datasets import make_classification
from sklearn.svm import SVC

from clustersearch import ClusterGridSearchCV
from clustersearch.client.timeline import chrome_trace, clock_offsets

X, y = make_classification(n_samples=80, random_state=0)
GRID = {"C": [0.1, 1.0, 10.0], "gamma": ["scale", 0.1]}


def test_every_counted_fit_is_on_the_timeline(embedded_cluster, tmp_path):
    search = ClusterGridSearchCV(SVC(), GRID, cv=3, cluster=embedded_cluster).fit(X, y)
    assert_ran_on_workers(search, embedded_cluster, n_fits=18)
    timeline = search.fit_timeline_
    tasks = timeline["tasks"]
    assert sum(t["fits"] for t in tasks) == 18
    per_node = {}
    for t in tasks:
        per_node[t["node"]] = per_node.get(t["node"], 0) + t["fits"]
        # On the client's clock: sent, then run, then received back.
        assert 0 <= t["sent"] <= t["start"] <= t["end"] <= t["received"], t
        assert t["backup"] is False and t["tries"] == []
    assert per_node == search.fits_per_node_
    assert {(t["node"], t["pid"]) for t in tasks} == {
        (n, p) for n, pids in search.fit_processes_.items() for p in pids
    }
    assert set(timeline["clock_offsets"]) == set(per_node)

    path = tmp_path / "trace.json"
    search.export_chrome_trace(str(path))
    trace = json.loads(path.read_text())["traceEvents"]
    spans = [e for e in trace if e["ph"] == "X"]
    assert len(spans) == len(tasks)
    tracks = {e["args"]["name"] for e in trace if e["ph"] == "M"}
    assert tracks == set(per_node)
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)


def test_clock_offsets_bound_each_nodes_clock():
    # A node whose clock is 100 s behind the client's: its tasks start 0.1 s
    # after they are sent and end 0.2 s before their results arrive.
    runs = [
        {"node": "slow-clock", "sent": 10.0, "started": -89.9, "finished": -89.0, "received": 11.2},
        {"node": "slow-clock", "sent": 20.0, "started": -79.9, "finished": -79.5, "received": 20.7},
        {"node": "same", "sent": 1.0, "started": 1.5, "finished": 2.0, "received": 2.1},
    ]
    offsets = clock_offsets(runs)
    # Bounds: d >= sent - started (max 99.9), d <= received - finished (min 100.2).
    assert offsets["slow-clock"] == pytest.approx((99.9 + 100.2) / 2)
    assert offsets["same"] == pytest.approx((-0.5 + 0.1) / 2)


def test_the_trace_marks_node_events():
    timeline = {
        "tasks": [{"node": "a", "pid": 7, "task": "t", "fits": 2, "sent": 0.0, "start": 0.1,
                   "end": 0.5, "received": 0.6, "backup": True, "tries": [["b", "lost"]]}],
        "events": [{"event": "lost", "node": "b", "time": 0.05, "silent_s": 3.0}],
    }  # fmt: skip
    trace = chrome_trace(timeline)["traceEvents"]
    (span,) = [e for e in trace if e["ph"] == "X"]
    assert span["name"] == "2 fits (backup)" and span["dur"] == 400000
    (mark,) = [e for e in trace if e["ph"] == "i"]
    assert mark["name"] == "lost" and mark["args"] == {"silent_s": 3.0}
