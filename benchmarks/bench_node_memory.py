"""A node's memory: proportional set size (PSS) of all its processes.

Starts one ``clustersearch worker --concurrency 4`` on RabbitMQ (loopback, a
virtual host of this run's own),
measures the PSS of its main process and pool processes idle (after the
pool came up) and after a small Adult search (RandomForest, 12 fits), with
the memory-mapped data (the node's blob cache) counted apart. Each variant
is a fresh node with its own environment; the baseline is a node started
with ``CLUSTERSEARCH_LEAN_MEMORY=0`` (what nodes did before: no
``gc.freeze()`` before the pool forks, no ``malloc_trim`` after a task, glibc's
default arenas), measured in the same run, alternating.

    python benchmarks/bench_node_memory.py [--rounds 2] \
        [--json benchmarks/results/node_memory.json] [--markdown docs/benchmarks.md]
"""

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search import machine, write_markdown  # noqa: E402

RABBITMQ = "amqp://guest:guest@127.0.0.1:5672/{vhost}"  # a virtual host of this run's own
SECRET = secrets.token_hex(32)
CONCURRENCY = 4
GRID = {"max_depth": [8, None], "max_features": [5, 15]}  # 4 x 3 folds = 12 fits
VARIANTS = {
    "before": {"CLUSTERSEARCH_LEAN_MEMORY": "0"},
    "now": {},
}


def children(pid):
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids = [int(c) for c in f.read().split()]
        except FileNotFoundError:
            continue
        for kid in kids:
            found += [kid, *children(kid)]
    return found


def process_pss(pid, data_dir):
    """``(pss, pss_anon, pss_data)`` in bytes; data: mappings of files under ``data_dir``."""
    pss = anon = data = 0
    in_data = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if not head:
                continue
            if not head[0].endswith(":"):  # a mapping's first line
                in_data = len(head) >= 6 and head[5].startswith(str(data_dir))
                continue
            if head[0] == "Pss:":
                kb = int(head[1]) * 1024
                pss += kb
                data += kb if in_data else 0
            elif head[0] == "Pss_Anon:":
                anon += int(head[1]) * 1024
    return pss, anon, data


def node_memory(pid, data_dir):
    procs = [pid, *children(pid)]
    rows = [process_pss(p, data_dir) for p in procs]
    return {
        "processes": len(procs),
        "pss": sum(r[0] for r in rows),
        "pss_anon": sum(r[1] for r in rows),
        "data": sum(r[2] for r in rows),
        "main": rows[0][0],
        "pool": [r[0] - r[2] for r in rows[1:]],
    }


def rabbitmqctl(*args):
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


def start_node(name, cache_dir, env_changes, broker):
    env = dict(os.environ, CLUSTERSEARCH_SECRET=SECRET, **env_changes)
    cmd = [sys.executable, "-m", "clustersearch", "worker", "--broker", broker,
           "--backend", "rpc://", "--name", name, "--concurrency", str(CONCURRENCY),
           "--cache-dir", str(cache_dir), "--loglevel", "WARNING", "--allow-root"]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_pool(proc, timeout=60):
    deadline = time.monotonic() + timeout
    while len(children(proc.pid)) < CONCURRENCY:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the node did not start (exit {proc.returncode})")
        time.sleep(0.2)


def measure(variant, X, y, round_, broker):
    from sklearn.ensemble import RandomForestClassifier

    from clustersearch import Cluster, ClusterGridSearchCV
    from clustersearch.node.memory import IDLE_S

    name = f"mem{os.getpid()}{variant}{round_}"
    with tempfile.TemporaryDirectory() as cache_dir:
        proc = start_node(name, cache_dir, VARIANTS[variant], broker)
        try:
            wait_pool(proc)
            with Cluster(broker, "rpc://", progress=False, secret=SECRET) as cluster:
                deadline = time.monotonic() + 60
                while name not in {n.name for n in cluster.nodes(timeout=0.5)}:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the node did not answer")
                time.sleep(2)  # settle
                idle = node_memory(proc.pid, cache_dir)
                reported_idle = {n.name: n for n in cluster.nodes(memory=True)}[name]
                search = ClusterGridSearchCV(
                    RandomForestClassifier(n_estimators=10, random_state=0), GRID, cv=3,
                    cluster=cluster, refit=False,
                )
                start = time.perf_counter()
                search.fit(X, y)
                fit_s = time.perf_counter() - start
                # The pool processes clean up once idle (node/memory.py).
                time.sleep(IDLE_S + 1.0)
                after = node_memory(proc.pid, cache_dir)
                reported = {n.name: n for n in cluster.nodes(memory=True)}[name]
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return {
        "variant": variant, "round": round_, "idle": idle, "after": after, "fit_s": fit_s,
        "fits": sum(search.fits_per_node_.values()),
        "reported_idle_pss": reported_idle.memory_pss, "reported_pss": reported.memory_pss,
        "reported_data": reported.memory_data,
    }  # fmt: skip


def mb(nbytes):
    return nbytes / 2**20


def report(r):
    print(f"{r['variant']} {r['round']}: idle {mb(r['idle']['pss']):.0f} MiB, after "
          f"{mb(r['after']['pss']):.0f} MiB (data {mb(r['after']['data']):.0f}), "
          f"pool {[round(mb(p)) for p in r['after']['pool']]}", flush=True)  # fmt: skip


def markdown(result):
    runs = result["runs"]
    lines = [
        f"Measured {result['machine']['date']} on `{result['machine']['host']}`: "
        f"{result['machine']['cpu']}, {result['machine']['cores']} cores, Python "
        f"{result['machine']['python']}; load average at start {result['load']}.",
        "",
        f"One `clustersearch worker --concurrency {CONCURRENCY}` on RabbitMQ (loopback, a virtual host of its own), all "
        "its processes, PSS in MiB (`/proc/<pid>/smaps`); *data* is the memory-mapped blob "
        "cache (Adult, shared by the processes), *own* is the rest. After: a "
        f"RandomForest(n_estimators=10) grid on Adult, {runs[0]['fits']} fits. "
        "`before` is a node with `CLUSTERSEARCH_LEAN_MEMORY=0` (as nodes were), fresh node "
        "per run, alternating.",
        "",
        "| variant | run | idle PSS | after PSS | after data | after own | own per pool "
        "process | own, as `clustersearch nodes` reports it |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        a = r["after"]
        own = a["pss"] - a["data"]
        lines.append(
            f"| {r['variant']} | {r['round']} | {mb(r['idle']['pss']):.0f} | {mb(a['pss']):.0f} "
            f"| {mb(a['data']):.0f} | {mb(own):.0f} | "
            f"{', '.join(f'{mb(p):.0f}' for p in a['pool'])} | "
            f"{mb(r['reported_pss'] - r['reported_data']):.0f} |"
        )
    s = result["summary"]
    lines += [
        "",
        f"Median own PSS after the search: before {s['before_own_mb']:.0f} MiB, now "
        f"{s['now_own_mb']:.0f} MiB ({s['own_ratio']:.2f}x); idle {s['before_idle_mb']:.0f} "
        f"against {s['now_idle_mb']:.0f} MiB ({s['idle_ratio']:.2f}x).",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--marker", default="node-memory")
    args = parser.parse_args(argv)

    from clustersearch.datasets import load_adult

    X, y = load_adult(return_X_y=True)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    runs = []
    vhost = f"bench-memory-{os.getpid()}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        for round_ in range(1, args.rounds + 1):
            for variant in VARIANTS:
                runs.append(measure(variant, X, y, round_, RABBITMQ.format(vhost=vhost)))
                report(runs[-1])
    finally:
        rabbitmqctl("delete_vhost", vhost)

    def med(variant, key):
        return statistics.median(
            (r[key]["pss"] - (r[key]["data"] if key == "after" else 0))
            for r in runs if r["variant"] == variant
        )  # fmt: skip

    summary = {
        "before_own_mb": mb(med("before", "after")), "now_own_mb": mb(med("now", "after")),
        "before_idle_mb": mb(med("before", "idle")), "now_idle_mb": mb(med("now", "idle")),
    }  # fmt: skip
    summary["own_ratio"] = summary["now_own_mb"] / summary["before_own_mb"]
    summary["idle_ratio"] = summary["now_idle_mb"] / summary["before_idle_mb"]
    result = {"machine": machine(), "load": load, "runs": runs, "summary": summary}
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
