"""A 10,080-fit grid of near-instant fits: per-fit overhead at the scale of
the original Pine64 grid (3,360 candidates x 3 folds).

Times one ``GridSearchCV`` serially (n_jobs=1), the baseline, and
``ClusterGridSearchCV`` on a 2-node ``LocalCluster`` (RabbitMQ by default;
``--transport redis`` or ``embedded``), alternating, ``--repeats`` times each,
and checks that the scores agree. The cluster starts once (its start-up is
timed apart, and added to the best search in the "with start-up" ratio).
loky (``--only serial loky cluster``) takes 5 to 9 minutes on this grid
(docs/benchmarks.md): not run by default.

    python benchmarks/bench_big_grid.py [--json out.json] [--markdown docs/benchmarks.md]
"""

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.datasets import make_classification
from sklearn.model_selection import GridSearchCV
from sklearn.tree import DecisionTreeClassifier

from clustersearch import ClusterGridSearchCV, LocalCluster

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search import machine, write_markdown  # noqa: E402

GRID = {
    "max_features": [2, 4, 6, 8, 10],
    "min_samples_split": list(range(2, 30)),
    "min_samples_leaf": list(range(1, 7)),
    "max_depth": [2, 4, 8, None],
}  # 3,360 candidates

BROKERS = {
    "rabbitmq": ("amqp://guest:guest@127.0.0.1:5672//", "rpc://"),
    "redis": ("redis://127.0.0.1:6379/3", "redis://127.0.0.1:6379/3"),
    "embedded": (None, None),
}


def _cpu_s(pid):
    """CPU seconds of process ``pid`` and its children (Linux; 0 elsewhere)."""
    total = 0
    with contextlib.suppress(OSError):
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for p in [pid, *map(int, kids)]:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _own_cpu_s():
    t = os.times()
    return t.user + t.system


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=sorted(BROKERS), default="rabbitmq")
    parser.add_argument("--only", nargs="+", default=["serial", "cluster"],
                        choices=["serial", "loky", "cluster"])  # fmt: skip
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--marker", default="biggrid")
    args = parser.parse_args(argv)
    X, y = make_classification(500, 10, random_state=0)
    tree = DecisionTreeClassifier(random_state=0)
    n_fits = 3 * int(np.prod([len(v) for v in GRID.values()]))
    broker, backend = BROKERS[args.transport]
    load = os.getloadavg()
    print(f"{n_fits} fits, runners {args.only}, cluster over {args.transport}; "
          f"load average at start {load[0]:.2f}", flush=True)  # fmt: skip
    record = {name: {"times_s": []} for name in args.only}
    scores = {}
    with contextlib.ExitStack() as stack:
        cluster = None
        if "cluster" in args.only:
            started = time.perf_counter()
            cluster = stack.enter_context(
                # The nodes wait while serial runs; on a loaded machine their
                # answer to the search's discovery can take over 1 s.
                LocalCluster(n_workers=2, broker_url=broker, backend=backend, allow_root=True,
                             discovery_timeout=10.0)  # fmt: skip
            )
            record["cluster"]["startup_s"] = round(time.perf_counter() - started, 2)
        for _ in range(args.repeats):
            for name in args.only:
                own, nodes = _own_cpu_s(), 0.0
                if name == "cluster":
                    pids = [p.pid for p in cluster.processes.values()]
                    nodes = sum(_cpu_s(p) for p in pids)
                    search = ClusterGridSearchCV(tree, GRID, cv=3, cluster=cluster)
                else:
                    search = GridSearchCV(tree, GRID, cv=3, n_jobs=1 if name == "serial" else 2)
                start = time.perf_counter()
                search.fit(X, y)
                took = time.perf_counter() - start
                r = record[name]
                r["times_s"].append(round(took, 2))
                if name == "cluster":
                    nodes = sum(_cpu_s(p) for p in pids) - nodes
                    r.setdefault("node_cpu_s", []).append(round(nodes, 2))
                    r["tasks"] = len(search.fit_timeline_["tasks"])
                    r["task_kb"] = round(sum(search.message_bytes_per_node_.values()) / 1e3, 1)
                r.setdefault("client_cpu_s", []).append(round(_own_cpu_s() - own, 2))
                scores[name] = search.cv_results_["mean_test_score"]
                base = record[args.only[0]]["times_s"]
                print(f"{name:8s} {took:7.2f} s  ({took / min(base):.2f}x {args.only[0]}'s best "
                      "so far)", flush=True)  # fmt: skip
    first = next(iter(scores.values()))
    agree = all(np.allclose(s, first) for s in scores.values())
    result = {"machine": machine(), "load_average": load, "n_fits": n_fits,
              "transport": args.transport, "repeats": args.repeats, "runners": record,
              "scores_agree": agree}  # fmt: skip
    table = markdown(result, args.only[0])
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.markdown:
        write_markdown(args.markdown, table, args.marker)
    return 0 if agree else 1


def markdown(result, baseline):
    m = result["machine"]
    runners = result["runners"]
    best_base = min(runners[baseline]["times_s"])
    lines = [
        f"Measured {m['date']} on `{m['host']}`: {m['cpu']}, {m['cores']} cores, "
        f"Python {m['python']}; " + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + f". Load average at start {result['load_average'][0]:.2f}.",
        "",
        f"{result['n_fits']} fits, runs alternating, {result['repeats']} each; the cluster "
        f"(2 one-process nodes over {result['transport']}) started once. Scores agree: "
        f"{result['scores_agree']}.",
        "",
        f"| runner | runs s | best s | x {baseline} (best) | with start-up | client CPU s "
        "| nodes CPU s | tasks |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in runners.items():
        best = min(r["times_s"])
        startup = r.get("startup_s")
        with_startup = f"{(best + startup) / best_base:.2f} (+{startup} s)" if startup else ""
        lines.append(
            f"| {name} | " + " / ".join(f"{t:.2f}" for t in r["times_s"])
            + f" | {best:.2f} | {best / best_base:.2f} | {with_startup} | "
            + " / ".join(f"{t:.1f}" for t in r["client_cpu_s"]) + " | "
            + " / ".join(f"{t:.1f}" for t in r.get("node_cpu_s", [])) + " | "
            + (f"{r['tasks']} ({r['task_kb']:.0f} kB)" if "tasks" in r else "") + " |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
