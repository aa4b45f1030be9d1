"""Wall time of one Adult random forest fit: on the cluster vs scikit-learn's threads.

Compares, with N slots on this machine: ``RandomForestClassifier(n_jobs=N)``
(scikit-learn's threads, the baseline) and ``ClusterRandomForestClassifier``
on a ``LocalCluster`` of N one-process nodes (the embedded transport, or
RabbitMQ / Redis). The runs alternate, local then cluster, so that both see
the same machine; every number is a ratio measured in the same run. The
first cluster run is cold (it ships the data into the nodes' cache).

Also measured: bytes of pickled trees sent back (per tree), data bytes sent,
trees per node; and that both forests are the same (same trees).

    python benchmarks/bench_forest.py                     # N=2, 200 trees
    python benchmarks/bench_forest.py --n-estimators 100 --transport rabbitmq
    nox -s bench                                          # writes docs/benchmarks.md
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search import load_data, machine, write_markdown  # noqa: E402

RABBITMQ = os.environ.get("BENCH_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672//")
REDIS = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/3")
TRANSPORTS = {
    "embedded": (None, None),
    "rabbitmq": (RABBITMQ, "rpc://"),
    "redis": (REDIS, REDIS),
}


def same_forest(a, b):
    return len(a.estimators_) == len(b.estimators_) and all(
        np.array_equal(x.tree_.__getstate__()["nodes"], y.tree_.__getstate__()["nodes"])
        and np.array_equal(x.tree_.__getstate__()["values"], y.tree_.__getstate__()["values"])
        for x, y in zip(a.estimators_, b.estimators_)
    )


def measure(args, X, y):
    from sklearn.ensemble import RandomForestClassifier

    from clustersearch import ClusterRandomForestClassifier, LocalCluster

    broker, backend = TRANSPORTS[args.transport]
    params = dict(n_estimators=args.n_estimators, random_state=0)
    start = time.perf_counter()
    cluster = LocalCluster(n_workers=args.workers, broker_url=broker, backend=backend,
                           allow_root=True)  # fmt: skip
    startup = time.perf_counter() - start
    local_s, cluster_s, records = [], [], []
    try:
        for _ in range(args.repeats):
            t = time.perf_counter()
            theirs = RandomForestClassifier(n_jobs=args.workers, **params).fit(X, y)
            local_s.append(time.perf_counter() - t)
            ours = ClusterRandomForestClassifier(cluster=cluster, **params)
            t = time.perf_counter()
            ours.fit(X, y)
            cluster_s.append(time.perf_counter() - t)
            records.append({
                "trees_per_node": ours.fits_per_node_,
                "result_bytes": sum(ours.result_bytes_per_node_.values()),
                "same": same_forest(ours, theirs),
            })  # fmt: skip
            print(f"local {local_s[-1]:.2f} s, cluster {cluster_s[-1]:.2f} s "
                  f"({cluster_s[-1] / local_s[-1]:.2f}x) {records[-1]}", flush=True)  # fmt: skip
        predict = measure_predict(args, cluster, theirs, X, y, params)
    finally:
        cluster.close()
    return {
        "predict": predict,
        "local_s": local_s,
        "cluster_s": cluster_s,
        "startup_s": round(startup, 2),
        "runs": records,
        "tree_bytes": records[-1]["result_bytes"] / args.n_estimators,
    }


def measure_predict(args, cluster, local, X, y, params):
    """predict_proba latency of a forest kept on the nodes (keep="nodes",
    replicas=2) against the same forest in this process (n_jobs=N), on all
    of X and on 100 rows, alternating; and that both agree."""
    from clustersearch import ClusterRandomForestClassifier

    resident = ClusterRandomForestClassifier(cluster=cluster, keep="nodes", replicas=2, **params)
    t = time.perf_counter()
    resident.fit(X, y)
    fit_s = time.perf_counter() - t
    out = {"fit_s": fit_s, "store_bytes": dict(resident.resident_.nbytes)}
    try:
        for name, rows in (("all", X), ("100 rows", X[:100])):
            local_t, resident_t = [], []
            for _ in range(args.repeats):
                t = time.perf_counter()
                theirs = local.predict_proba(rows)
                local_t.append(time.perf_counter() - t)
                t = time.perf_counter()
                ours = resident.predict_proba(rows)
                resident_t.append(time.perf_counter() - t)
            out[name] = {
                "local_s": local_t, "resident_s": resident_t,
                "max_diff": float(np.abs(ours - theirs).max()),
            }  # fmt: skip
            print(f"predict_proba {name}: local {min(local_t):.3f} s, resident "
                  f"{min(resident_t):.3f} s, max diff {out[name]['max_diff']:.1e}", flush=True)  # fmt: skip
    finally:
        resident.delete()
    return out


def markdown(result, args):
    m = result["machine"]
    local, ours = result["local_s"], result["cluster_s"]
    ratios = [c / loc for c, loc in zip(ours, local)]
    return "\n".join([
        f"Measured {m['date']} on `{m['host']}`: {m['cpu']}, {m['cores']} cores, "
        f"Python {m['python']}; " + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + ".",
        "",
        f"One `RandomForestClassifier(n_estimators={args.n_estimators}, random_state=0)` "
        f"fit on UCI Adult ({result['shape'][0]} x {result['shape'][1]}), N={args.workers}: "
        f"scikit-learn's threads (`n_jobs={args.workers}`) against "
        f"`ClusterRandomForestClassifier` on a {args.workers}-node LocalCluster "
        f"({args.transport} transport), runs alternating; the first cluster run ships the data.",
        "",
        "| run | sklearn n_jobs=N s | cluster s | x sklearn | trees per node | same trees |",
        "|---|---|---|---|---|---|",
        *(
            f"| {i + 1} | {lo:.2f} | {c:.2f} | {r:.2f} | "
            f"{', '.join(str(v) for v in rec['trees_per_node'].values())} | {rec['same']} |"
            for i, (lo, c, r, rec) in enumerate(zip(local, ours, ratios, result["runs"]))
        ),
        "",
        f"Best run against best run: {min(ours) / min(local):.2f}x; median ratio "
        f"{float(np.median(ratios)):.2f}x. Trees sent back: "
        f"{result['tree_bytes'] / 1e3:.0f} kB per tree pickled "
        f"({result['tree_bytes'] * args.n_estimators / 1e6:.0f} MB per fit). "
        f"Cluster start-up (not timed above): {result['startup_s']} s.",
        "",
        f"The same forest kept on the nodes (`keep=\"nodes\"`, `replicas=2`; fit "
        f"{result['predict']['fit_s']:.1f} s, each part built twice; stores "
        + ", ".join(f"{b / 1e6:.0f} MB" for b in result["predict"]["store_bytes"].values())
        + "): `predict_proba` latency against the merged forest in this process "
        f"(`n_jobs={args.workers}`), best of {args.repeats}, alternating:",
        "",
        "| rows | local s | resident s | x local | max difference |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {min(r['local_s']):.3f} | {min(r['resident_s']):.3f} | "
            f"{min(r['resident_s']) / min(r['local_s']):.2f} | {r['max_diff']:.1e} |"
            for name, r in ((n, result["predict"][n]) for n in ("all", "100 rows"))
        ),
    ])  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--n-estimators", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--transport", choices=sorted(TRANSPORTS), default="embedded")
    parser.add_argument("--data", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--marker", default="forest")
    args = parser.parse_args(argv)

    X, y = load_data(args.data)
    result = {"machine": machine(), "shape": list(np.shape(X)), "args": vars(args)}
    result.update(measure(args, X, y))
    table = markdown(result, args)
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.markdown:
        write_markdown(args.markdown, table, args.marker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
