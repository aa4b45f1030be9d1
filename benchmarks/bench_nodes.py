"""Many nodes: the client's CPU time per fit and the heartbeat round, by node count.

For each node count (2, 4, 8, 16 by default), a LocalCluster of that many
one-process nodes on RabbitMQ (loopback, a virtual host of this run's own,
so that no other node answers), seen through a plain ``Cluster`` handle as a
client on another machine would see it:

1. the client's CPU time per fit (``time.process_time()`` of the client
   process, all its threads, over the fits): a grid of tiny fits
   (DecisionTree on 300 x 8 synthetic rows), heartbeat every 0.5 s;
2. a heartbeat round (``Cluster.nodes(expect=...)``, what the session's
   heartbeat thread runs), the nodes idle, median of ``--rounds``;
3. for comparison, Celery's broadcast as the heartbeat used it before
   (``control.broadcast(reply=True)`` with no ``limit``: it waits out its
   timeout after the last reply).

Ratios are against the 2-node figures of the same run. Goals: CPU per fit
flat in the number of nodes; a heartbeat round under 100 ms at 16 nodes.

    python benchmarks/bench_nodes.py [--nodes 2 4 8 16] [--rounds 20] \
        [--json benchmarks/results/nodes.json] [--markdown docs/benchmarks.md]
"""

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search import machine, write_markdown  # noqa: E402

GRID = {"max_depth": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, None], "min_samples_leaf": [1, 2, 4, 8]}
CV = 4  # 48 candidates x 4 folds = 192 fits
REPLY_TIMEOUT = 1.0


def rabbitmqctl(*args):
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


def measure(n, vhost, X, y, rounds):
    from sklearn.tree import DecisionTreeClassifier

    from clustersearch import Cluster, ClusterGridSearchCV, LocalCluster
    from clustersearch.wire.protocol import INFO_COMMAND

    url = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    began = time.perf_counter()
    with LocalCluster(n_workers=n, broker_url=url, backend="rpc://", allow_root=True) as local:
        startup = time.perf_counter() - began
        names = list(local.node_names)
        with Cluster(url, "rpc://", secret=local.secret, progress=False,
                     heartbeat_interval=0.5) as cluster:  # fmt: skip
            assert sorted(n.name for n in cluster.nodes(timeout=5)) == sorted(names)
            search = ClusterGridSearchCV(
                DecisionTreeClassifier(random_state=0), GRID, cv=CV, cluster=cluster, refit=False
            )
            search.fit(X, y)  # warm: the data reaches every node
            cpu0, wall0 = time.process_time(), time.perf_counter()
            search.fit(X, y)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            fits = sum(search.fits_per_node_.values())
            tasks = len(search.fit_timeline_["tasks"])
            beats = [r["round_s"] for r in search.fit_timeline_["heartbeats"]]
            # Idle heartbeat rounds, as the session's heartbeat thread runs them.
            idle = []
            for _ in range(rounds):
                start = time.perf_counter()
                found = cluster.nodes(timeout=REPLY_TIMEOUT, expect=names)
                idle.append(time.perf_counter() - start)
                assert len(found) == n, [f.name for f in found]
            # Before: Celery's broadcast with no limit.
            before = []
            for _ in range(3):
                start = time.perf_counter()
                replies = cluster.app.control.broadcast(
                    INFO_COMMAND, arguments={"nonce": secrets.token_hex(16)}, reply=True,
                    timeout=REPLY_TIMEOUT,
                )  # fmt: skip
                before.append(time.perf_counter() - start)
                assert len(replies) == n
    return {
        "nodes": n, "startup_s": startup, "fits": fits, "client_cpu_s": cpu, "wall_s": wall,
        "cpu_per_fit_ms": cpu / fits * 1e3, "wall_per_fit_ms": wall / fits * 1e3,
        "tasks": tasks, "cpu_per_task_ms": cpu / tasks * 1e3,
        "beat_during_search_ms": [b * 1e3 for b in beats],
        "beat_idle_ms": [b * 1e3 for b in idle],
        "beat_idle_median_ms": statistics.median(idle) * 1e3,
        "beat_before_median_ms": statistics.median(before) * 1e3,
        "per_node": dict(search.fits_per_node_),
    }  # fmt: skip


def markdown(result):
    m = result["machine"]
    base = result["runs"][0]
    lines = [
        f"Measured {m['date']} on `{m['host']}`: {m['cpu']}, {m['cores']} cores, Python "
        f"{m['python']}; load average at start {result['load']}.",
        "",
        "A LocalCluster of N one-process nodes on RabbitMQ (loopback, a virtual host of "
        "its own) and the RPC result backend, seen through a plain `Cluster`. Client CPU: "
        f"`time.process_time()` of the client over a {base['fits']}-fit DecisionTree grid "
        "(300 x 8 rows; second run, the data cached), heartbeat every 0.5 s. Heartbeat: "
        f"`Cluster.nodes(expect=...)` on idle nodes, median of {result['rounds']}; before: "
        f"Celery's `broadcast(reply=True, timeout={REPLY_TIMEOUT})` without `limit`, median of 3. "
        f"Ratios against N={base['nodes']}.",
        "",
        "| nodes | client CPU ms/fit | x | tasks | client CPU ms/task | x | wall ms/fit | "
        "heartbeat ms (idle) | x | heartbeat ms (in search, median) | before ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        during = statistics.median(r["beat_during_search_ms"]) if r["beat_during_search_ms"] else 0
        lines.append(
            f"| {r['nodes']} | {r['cpu_per_fit_ms']:.2f} | "
            f"{r['cpu_per_fit_ms'] / base['cpu_per_fit_ms']:.2f} | {r['tasks']} | "
            f"{r['cpu_per_task_ms']:.2f} | {r['cpu_per_task_ms'] / base['cpu_per_task_ms']:.2f} | "
            f"{r['wall_per_fit_ms']:.1f} | "
            f"{r['beat_idle_median_ms']:.1f} | "
            f"{r['beat_idle_median_ms'] / base['beat_idle_median_ms']:.2f} | {during:.0f} | "
            f"{r['beat_before_median_ms']:.0f} |"
        )
    last = result["runs"][-1]
    lines += [
        "",
        f"Client CPU per fit at N={last['nodes']}: "
        f"{last['cpu_per_fit_ms'] / base['cpu_per_fit_ms']:.2f}x N={base['nodes']}'s; per task "
        f"(a batch of fits, one message each way): "
        f"{last['cpu_per_task_ms'] / base['cpu_per_task_ms']:.2f}x. Heartbeat round at "
        f"N={last['nodes']}: {last['beat_idle_median_ms']:.0f} ms idle, against "
        f"{last['beat_before_median_ms']:.0f} ms before.",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--marker", default="nodes")
    args = parser.parse_args(argv)

    from sklearn.datasets import make_classification

    X, y = make_classification(n_samples=300, n_features=8, random_state=0)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    vhost = f"bench-nodes-{os.getpid()}"
    rabbitmqctl("add_vhost", vhost)
    runs = []
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        for n in args.nodes:
            runs.append(measure(n, vhost, X, y, args.rounds))
            r = runs[-1]
            print(f"{n} nodes: client CPU {r['cpu_per_fit_ms']:.2f} ms/fit, heartbeat "
                  f"{r['beat_idle_median_ms']:.1f} ms idle, before "
                  f"{r['beat_before_median_ms']:.0f} ms", flush=True)  # fmt: skip
    finally:
        rabbitmqctl("delete_vhost", vhost)
    result = {"machine": machine(), "load": load, "rounds": args.rounds, "runs": runs}
    table = markdown(result)
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.markdown:
        write_markdown(Path(args.markdown), table, args.marker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
