"""Each fit's place in time: what the report's Gantt chart and a Chrome
trace draw.

The dispatcher records, for every result that counts, when the client sent
the task and received its result (client clock) and when the node started
and finished it (node clock, in the result: no extra round trip). Nodes'
clocks differ from the client's; :func:`clock_offsets` bounds each node's
offset by its tasks (a task starts after it was sent and ends before its
result arrived) and takes the middle of the bounds.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["build_timeline", "chrome_trace", "clock_offsets", "write_chrome_trace"]


def clock_offsets(runs: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Seconds to add to each node's clock to read the client's.

    For each task: ``sent <= started + d`` and ``finished + d <= received``,
    so ``d`` lies in ``[max(sent - started), min(received - finished)]``
    over the node's tasks; the middle of that interval (or of the
    inconsistent bounds, when clocks jumped) is the estimate, within half
    the interval's width.
    """
    low: dict[str, float] = {}
    high: dict[str, float] = {}
    for run in runs:
        node = run["node"]
        low[node] = max(low.get(node, -float("inf")), run["sent"] - run["started"])
        high[node] = min(high.get(node, float("inf")), run["received"] - run["finished"])
    return {node: (low[node] + high[node]) / 2 for node in low}


def build_timeline(
    runs: list[dict[str, Any]], events: list[dict[str, Any]], t0: float, mono_to_wall: float
) -> dict[str, Any]:
    """The fitted search's ``fit_timeline_``.

    ``runs``: one dict per result that counted (``node``, ``pid``, ``task``,
    ``fits``, ``backup``, ``tries``, client wall times ``sent``/``received``,
    node wall times ``started``/``finished``). ``events``: the session's
    events (monotonic ``t``). ``t0``: the search's start (client wall
    clock); every time in the result is seconds since then, on the
    client's clock.
    """
    offsets = clock_offsets(runs)
    tasks = []
    for run in sorted(runs, key=lambda r: r["sent"]):
        d = offsets[run["node"]]
        tasks.append({
            "node": run["node"],
            "pid": run["pid"],
            "task": run["task"],
            "fits": run["fits"],
            "sent": run["sent"] - t0,
            "start": run["started"] + d - t0,
            "end": run["finished"] + d - t0,
            "received": run["received"] - t0,
            "backup": run["backup"],
            "tries": [list(t) for t in run["tries"]],
        })  # fmt: skip
    marks = [
        {**{k: v for k, v in e.items() if k != "t"}, "time": e["t"] + mono_to_wall - t0}
        for e in events
    ]
    return {"tasks": tasks, "events": marks, "clock_offsets": offsets}


def chrome_trace(timeline: Mapping[str, Any]) -> dict[str, Any]:
    """``timeline`` (a ``fit_timeline_``) as Chrome's trace format: open it
    in https://ui.perfetto.dev or chrome://tracing. One track per node
    (process) and pool process (thread); node events are instants."""
    nodes = sorted({t["node"] for t in timeline["tasks"]} | {
        e["node"] for e in timeline["events"] if e.get("node")
    })  # fmt: skip
    pid = {node: i + 1 for i, node in enumerate(nodes)}
    out: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": pid[n], "args": {"name": n}} for n in nodes
    ]
    for t in timeline["tasks"]:
        out.append({
            "name": f"{t['fits']} fit{'s' if t['fits'] != 1 else ''}"
            + (" (backup)" if t["backup"] else ""),
            "cat": "fit", "ph": "X", "pid": pid[t["node"]], "tid": t["pid"],
            "ts": round(t["start"] * 1e6), "dur": round(max(t["end"] - t["start"], 0) * 1e6),
            "args": {"task": t["task"], "sent": t["sent"], "received": t["received"],
                     "tries": t["tries"]},
        })  # fmt: skip
    for e in timeline["events"]:
        args = {k: v for k, v in e.items() if k not in ("event", "node", "time")}
        out.append({
            "name": e["event"], "cat": "event", "ph": "i", "s": "p" if e.get("node") else "g",
            "pid": pid.get(e.get("node"), 0), "tid": 0, "ts": round(e["time"] * 1e6),
            "args": json.loads(json.dumps(args, default=str)),
        })  # fmt: skip
    return {"traceEvents": out, "displayTimeUnit": "ms"}


def write_chrome_trace(timeline: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Write :func:`chrome_trace` of ``timeline`` to ``path`` as JSON."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(chrome_trace(timeline), f)
