"""Makespan of an Adult grid whose fit times vary, against its lower bound.

A search can end no sooner than its longest fit, nor sooner than its total
fit time over the processes: ``bound = max(total / slots, longest)``. The
grid below has fits from 0.1 s to a few seconds, the longest
(``max_depth=None``, ``min_samples_leaf=1``, 100 trees) last in the grid's
order, where a search that sends its fits in order starts them last. Each
run fits the same ``ClusterGridSearchCV`` with ``Policy(longest_first=False)``
(the baseline: the search's order) and ``longest_first=True``, alternating
on the same cluster, and prints makespan / bound for each (makespan: first
fit start to last fit end, from ``fit_timeline_``; the bound from the same
run's own fit times).

``--nodes equal``: a LocalCluster of N one-process nodes (default 2).
``--nodes mixed``: the multi-host test cluster (tests/netcluster.py, needs
root, RabbitMQ and Redis): three one-process nodes, two of them slowed to
1/2 and 1/4 of a CPU by cgroup quotas; each node's speed is measured first
(the same fit, repeated) and the bound counts each node's work at its speed:
``max(total work / sum of speeds, longest fit on the fastest node)``.

    python benchmarks/bench_makespan.py --json benchmarks/results/makespan.json \\
        --markdown docs/benchmarks.md
    python benchmarks/bench_makespan.py --nodes mixed --json ... --markdown ...
"""

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_search import load_data, machine, write_markdown  # noqa: E402

# The longest last: ParameterGrid varies the last key (alphabetically) fastest.
GRID = {
    "max_depth": [4, 12, None],
    "min_samples_leaf": [50, 1],
    "n_estimators": [5, 100],
}
CV = 3


def _estimator():
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(random_state=0)


def makespan(search, speed=None):
    """makespan, bound, and their parts, from a fitted search's timeline.

    ``speed``: node -> how many times longer than the fastest node it takes
    (None: all equal). Work is counted in the fastest node's seconds."""
    tasks = search.fit_timeline_["tasks"]
    slots = search.n_slots_
    speed = speed or {}
    span = max(t["end"] for t in tasks) - min(t["start"] for t in tasks)
    work = [(t["end"] - t["start"]) / speed.get(t["node"], 1.0) for t in tasks]
    rate = sum(c / speed.get(n, 1.0) for n, c in slots.items())
    # The longest fit: the longest task of one fit (a task of several fits
    # counts as its mean fit: a lenient bound for batched runs).
    longest = max(w / t["fits"] for w, t in zip(work, tasks))
    bound = max(sum(work) / rate, longest)
    return {
        "makespan_s": span,
        "bound_s": bound,
        "ratio": span / bound,
        "total_work_s": sum(work),
        "longest_fit_s": longest,
        "tasks": len(tasks),
        "fits_per_node": dict(search.fits_per_node_),
        # Each task: node, fits, sent, start, end (seconds since fit began).
        "timeline": [
            [t["node"], t["fits"], round(t["sent"], 3), round(t["start"], 3), round(t["end"], 3)]
            for t in sorted(tasks, key=lambda t: t["sent"])
        ],
    }


def fit_once(cluster, X, y, longest_first):
    from clustersearch import ClusterGridSearchCV

    cluster.policy = cluster.policy.replace(longest_first=longest_first)
    search = ClusterGridSearchCV(_estimator(), GRID, cv=CV, cluster=cluster)
    start = time.perf_counter()
    search.fit(X, y)
    wall = time.perf_counter() - start
    return search, wall


def node_slots(cluster):
    return {n.name: n.concurrency for n in cluster.nodes()}


def measure_speed(cluster, X, y):
    """node -> its time for one fixed fit over the fastest node's, from a
    search of that fit repeated (every node busy at once, as in the runs)."""
    from sklearn.model_selection import ShuffleSplit

    from clustersearch import ClusterGridSearchCV

    cluster.policy = cluster.policy.replace(longest_first=False)
    n = 4 * sum(node_slots(cluster).values())
    search = ClusterGridSearchCV(
        _estimator(), {"n_estimators": [20]}, cv=ShuffleSplit(n, test_size=0.33, random_state=0),
        cluster=cluster,
    ).fit(X, y)
    per_node = {}
    for t in search.fit_timeline_["tasks"]:
        per_node.setdefault(t["node"], []).append((t["end"] - t["start"]) / t["fits"])
    medians = {node: statistics.median(d) for node, d in per_node.items()}
    fastest = min(medians.values())
    return {node: m / fastest for node, m in medians.items()}


@contextlib.contextmanager
def equal_nodes(args):
    from clustersearch import LocalCluster

    with LocalCluster(n_workers=args.workers, allow_root=True) as cluster:
        yield cluster


@contextlib.contextmanager
def mixed_nodes(args):
    sys.path.insert(0, str(HERE.parent / "tests"))
    import netcluster

    # Other engineers' test clusters share this machine: reap nothing.
    netcluster.reap_leftovers = lambda: None
    why = netcluster.why_unavailable()
    if why:
        raise SystemExit(f"--nodes mixed: {why}")
    net = netcluster.NetCluster(tempfile.mkdtemp(prefix="bench-makespan-"), n_hosts=3, n_nodes=3)
    net.start()
    try:
        net.slow_down("host2", 0.5)
        net.slow_down("host3", 0.25)
        with net.cluster() as cluster:
            yield cluster
    finally:
        net.close()


def run(args, X, y):
    runs = []
    with (mixed_nodes if args.nodes == "mixed" else equal_nodes)(args) as cluster:
        slots = node_slots(cluster)
        # Ships the data to every node (not timed).
        measure_speed(cluster, X, y)
        speed = measure_speed(cluster, X, y) if args.nodes == "mixed" else None
        for repeat in range(args.repeats):
            for longest_first in (False, True):
                search, wall = fit_once(cluster, X, y, longest_first)
                search.n_slots_ = slots
                row = makespan(search, speed)
                row.update(repeat=repeat + 1, longest_first=longest_first, wall_s=wall)
                runs.append(row)
                print(
                    f"run {repeat + 1} longest_first={longest_first!s:5}: makespan "
                    f"{row['makespan_s']:6.2f} s, bound {row['bound_s']:6.2f} s, "
                    f"ratio {row['ratio']:.3f} (fit {wall:.2f} s)",
                    flush=True,
                )
                results = search.cv_results_["mean_test_score"]
                if runs and "scores" in runs[0]:
                    assert np.array_equal(results, np.asarray(runs[0]["scores"]))
                row["scores"] = list(map(float, results))
    return {"slots": slots, "speed": speed, "runs": runs}


def markdown(result, args):
    m = result["machine"]
    v = m["versions"]
    runs = result["runs"]
    lines = [
        f"Measured {m['date']} on `{m['host']}`: {m['cpu']}, {m['cores']} cores, "
        f"Python {m['python']}; clustersearch {v.get('clustersearch')}, sklearn "
        f"{v.get('sklearn')}, joblib {v.get('joblib')}; load average at start "
        f"{result['load_at_start']}.",
        "",
    ]
    if args.nodes == "mixed":
        speeds = ", ".join(f"{n} {s:.2f}x" for n, s in sorted(result["speed"].items()))
        lines.append(
            "Three one-process nodes of the multi-host test cluster (network namespaces), "
            f"two slowed by CPU quotas to 1/2 and 1/4 of a CPU; measured time per fit "
            f"against the fastest node: {speeds}. The bound counts each node's work at "
            "its speed."
        )
    else:
        lines.append(f"A LocalCluster of {args.workers} one-process nodes (embedded transport).")
    lines += [
        "",
        f"`ClusterGridSearchCV(RandomForestClassifier(random_state=0), {GRID}, cv={CV})` "
        f"on UCI Adult ({result['shape'][0]} x {result['shape'][1]}), "
        f"{len(runs[0]['scores'])} candidates, the longest last in the grid's order; "
        "each run fits it with `longest_first=False` (the search's order) and `True`, "
        "alternating. Makespan: first fit start to last fit end (`fit_timeline_`); "
        "bound: max(total fit time / slots, longest fit), from the same run.",
        "",
        "| run | longest_first | makespan s | bound s | makespan / bound | tasks | fit() s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['repeat']} | {r['longest_first']} | {r['makespan_s']:.2f} | "
            f"{r['bound_s']:.2f} | {r['ratio']:.3f} | {r['tasks']} | {r['wall_s']:.2f} |"
        )
    off = [r["ratio"] for r in runs if not r["longest_first"]]
    on = [r["ratio"] for r in runs if r["longest_first"]]
    lines += [
        "",
        f"Median makespan / bound: in order {statistics.median(off):.3f}, longest first "
        f"{statistics.median(on):.3f} (goal: within 1.10). Scores equal in every run.",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", choices=["equal", "mixed"], default="equal")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--marker", default=None)
    args = parser.parse_args(argv)
    X, y = load_data(args.data)
    result = {
        "machine": machine(),
        "shape": list(np.shape(X)),
        "args": vars(args),
        "load_at_start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }
    result.update(run(args, X, y))
    table = markdown(result, args)
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.markdown:
        marker = args.marker or ("makespan" if args.nodes == "equal" else "makespan-mixed")
        write_markdown(args.markdown, table, marker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
