"""Wall time of one Adult RandomForest grid search, every way, in one run.

Compares, with N worker slots on this machine: scikit-learn's GridSearchCV
with loky (the baseline), ClusterGridSearchCV on the embedded LocalCluster,
on RabbitMQ and on Redis, and GridSearchCV under joblib's dask backend
(``distributed.LocalCluster``) and Ray's joblib backend. Every number is a
ratio against loky measured in the same run: these machines are noisy.

Also measured: the data bytes each search sent (first search on the data,
then a second one on the same data), and the per-task overhead, from 400
near-instant tasks (``joblib.Parallel(batch_size=1)``) and from a grid
search of near-instant fits.

    python benchmarks/bench_search.py                   # N=2, all runners
    python benchmarks/bench_search.py --workers 1 2 4 --only loky embedded
    nox -s bench                                        # the same, installed

Writes JSON (``--json``) and rewrites the table in docs/benchmarks.md
(``--markdown``). Cluster start-up is not timed (reported apart).
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RABBITMQ = os.environ.get("BENCH_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672//")
REDIS = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/3")

# 4 x 3 x 3 = 36 candidates, 108 fits with 3 folds, 10 trees each.
GRID = {
    "max_features": [3, 8, 15, 30],
    "min_samples_leaf": [1, 4, 16],
    "max_depth": [8, 16, None],
}
# The grid the reference numbers were measured on: 24 x 3 = 72 fits.
GRID_72 = {
    "max_features": [5, 15],
    "min_samples_split": [2, 10],
    "min_samples_leaf": [1, 4],
    "max_depth": [8, 16, None],
}

RUNNERS = ["loky", "embedded", "rabbitmq", "redis", "dask", "ray", "serial"]


def load_data(path):
    from clustersearch.datasets import load_adult

    beside = ROOT.parent / "shared" / "data" / "adult"
    home = path or (str(beside) if (beside / "adult.data").exists() else None)
    return load_adult(home, return_X_y=True)


def _estimator(n_estimators):
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(n_estimators=n_estimators, random_state=0)


def _instant(i):
    return i


# -- runners: each returns a context manager yielding fit(X, y, grid) -----------


@contextlib.contextmanager
def run_loky(n, args):
    from sklearn.model_selection import GridSearchCV

    def fit(X, y, grid):
        return GridSearchCV(_estimator(args.n_estimators), grid, cv=args.cv, n_jobs=n).fit(X, y)

    def tasks(k):
        from joblib import Parallel, delayed

        Parallel(n_jobs=n, batch_size=1)(delayed(_instant)(i) for i in range(k))

    yield fit, tasks


@contextlib.contextmanager
def run_serial(n, args):
    from sklearn.model_selection import GridSearchCV

    def fit(X, y, grid):
        return GridSearchCV(_estimator(args.n_estimators), grid, cv=args.cv, n_jobs=None).fit(X, y)

    yield fit, None


STARTUP_S = {}


def _cluster_runner(broker, backend):
    @contextlib.contextmanager
    def run(n, args):
        from joblib import Parallel, delayed

        from clustersearch import ClusterGridSearchCV, LocalCluster

        started = time.perf_counter()
        with LocalCluster(n_workers=n, broker_url=broker, backend=backend,
                          allow_root=True) as cluster:  # fmt: skip
            STARTUP_S[broker or "embedded"] = time.perf_counter() - started

            def fit(X, y, grid):
                return ClusterGridSearchCV(
                    _estimator(args.n_estimators), grid, cv=args.cv, cluster=cluster
                ).fit(X, y)

            def tasks(k):
                with cluster.joblib():
                    Parallel(n_jobs=-1, batch_size=1)(delayed(_instant)(i) for i in range(k))

            yield fit, tasks

    return run


@contextlib.contextmanager
def run_dask(n, args):
    import joblib
    from distributed import Client, LocalCluster
    from sklearn.model_selection import GridSearchCV

    with LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster):  # fmt: skip

        def fit(X, y, grid):
            with joblib.parallel_config(backend="dask"):
                return GridSearchCV(_estimator(args.n_estimators), grid, cv=args.cv,
                                    n_jobs=-1).fit(X, y)  # fmt: skip

        def tasks(k):
            with joblib.parallel_config(backend="dask"):
                joblib.Parallel(n_jobs=-1, batch_size=1)(
                    joblib.delayed(_instant)(i) for i in range(k)
                )

        yield fit, tasks


@contextlib.contextmanager
def run_ray(n, args):
    import joblib
    import ray
    from ray.util.joblib import register_ray
    from sklearn.model_selection import GridSearchCV

    ray.init(num_cpus=n, include_dashboard=False, log_to_driver=False,
             configure_logging=False)  # fmt: skip
    register_ray()
    try:

        def fit(X, y, grid):
            with joblib.parallel_config(backend="ray", n_jobs=n):
                return GridSearchCV(_estimator(args.n_estimators), grid, cv=args.cv,
                                    n_jobs=n).fit(X, y)  # fmt: skip

        def tasks(k):
            with joblib.parallel_config(backend="ray", n_jobs=n):
                joblib.Parallel(n_jobs=n, batch_size=1)(
                    joblib.delayed(_instant)(i) for i in range(k)
                )

        yield fit, tasks
    finally:
        ray.shutdown()


def runner(name):
    return {
        "loky": run_loky,
        "serial": run_serial,
        "embedded": _cluster_runner(None, None),
        "rabbitmq": _cluster_runner(RABBITMQ, "rpc://"),
        "redis": _cluster_runner(REDIS, REDIS),
        "dask": run_dask,
        "ray": run_ray,
    }[name]


def instant_grid_ms(fit_instant, n_fits):
    t = time.perf_counter()
    fit_instant()
    return (time.perf_counter() - t) * 1e3 / n_fits


def measure(name, n, args, X, y, grid):
    """Time ``args.repeats`` searches of ``name`` with ``n`` slots."""
    record = {"runner": name, "workers": n, "times_s": []}
    try:
        with runner(name)(n, args) as (fit, tasks):
            for _ in range(args.repeats):
                t = time.perf_counter()
                search = fit(X, y, grid)
                record["times_s"].append(round(time.perf_counter() - t, 3))
                record["best_score"] = float(search.best_score_)
                if hasattr(search, "data_bytes_per_node_"):
                    record.setdefault("data_bytes", []).append(
                        int(sum(search.data_bytes_per_node_.values()))
                    )
                    messages = sum(search.message_bytes_per_node_.values())
                    record["message_bytes"] = int(messages)
                    record["fits_per_node"] = search.fits_per_node_
            if tasks is not None and args.tasks:
                k = args.tasks
                tasks(8)  # warm up
                t = time.perf_counter()
                tasks(k)
                record["task_wall_ms"] = round((time.perf_counter() - t) * 1e3 / k, 3)
            startup = STARTUP_S.pop(
                {"embedded": "embedded", "rabbitmq": RABBITMQ, "redis": REDIS}.get(name, ""), None
            )
            if startup is not None:
                record["startup_s"] = round(startup, 2)
    except Exception as exc:  # a peer that is not installed, a server down
        record["error"] = f"{type(exc).__name__}: {exc}"[:300]
    return record


def machine():
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for module in ("clustersearch", "sklearn", "numpy", "joblib", "celery", "kombu",
                   "distributed", "ray"):  # fmt: skip
        with contextlib.suppress(Exception):
            versions[module] = __import__(module).__version__
    return {
        "host": socket.gethostname(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": versions,
    }


def markdown(result):
    m = result["machine"]
    lines = [
        f"Measured {m['date']} on `{m['host']}`: {m['cpu']}, {m['cores']} cores, "
        f"Python {m['python']}; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + ".",
        "",
        f"Grid: {result['n_fits']} fits ({result['grid']}), RandomForest with "
        f"{result['n_estimators']} trees, {result['cv']}-fold CV, on UCI Adult "
        f"({result['dataset_bytes'] / 1e6:.1f} MB as float64). Times are the best "
        f"of {result['repeats']} runs; the first ClusterGridSearchCV run on a "
        "cluster also ships the data (cold), the later ones find it cached.",
        "",
        "| N | runner | best s | all runs s | x loky | data sent MB (cold, warm) "
        "| task msg kB | ms/task (batch_size=1) | start-up s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n, records in sorted(result["by_workers"].items(), key=lambda kv: int(kv[0])):
        base = next((r for r in records if r["runner"] == "loky" and r.get("times_s")), None)
        for r in records:
            if r.get("error"):
                lines.append(f"| {n} | {r['runner']} | failed: {r['error'][:80]} | | | | | | |")
                continue
            best = min(r["times_s"])
            ratio = f"{best / min(base['times_s']):.2f}" if base else "?"
            data = r.get("data_bytes")
            data = ", ".join(f"{b / 1e6:.1f}" for b in data) if data else "n/a"
            msgs = r.get("message_bytes")
            per_task = "n/a"
            if msgs is not None:
                per_task = f"{msgs / 1e3:.0f} total"
            lines.append(
                f"| {n} | {r['runner']} | {best:.2f} | "
                + " / ".join(f"{t:.2f}" for t in r["times_s"])
                + f" | {ratio} | {data} | {per_task} | {r.get('task_wall_ms', 'n/a')} | "
                + f"{r.get('startup_s', '')} |"
            )
    return "\n".join(lines)


def write_markdown(path, text, marker):
    path = Path(path)
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    old = path.read_text() if path.exists() else f"# Benchmarks\n\n{begin}\n{end}\n"
    if begin not in old:
        old += f"\n{begin}\n{end}\n"
    head, rest = old.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--only", nargs="+", choices=RUNNERS,
                        default=[r for r in RUNNERS if r != "serial"])  # fmt: skip
    parser.add_argument("--grid", choices=["108", "72"], default="108")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--n-estimators", type=int, default=10)
    parser.add_argument("--cv", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=400,
                        help="near-instant tasks for the per-task overhead (0: skip)")
    parser.add_argument("--data", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--marker", default="bench")
    args = parser.parse_args(argv)

    X, y = load_data(args.data)
    grid = GRID if args.grid == "108" else GRID_72
    n_fits = int(np.prod([len(v) for v in grid.values()])) * args.cv
    result = {
        "machine": machine(),
        "grid": grid,
        "n_fits": n_fits,
        "n_estimators": args.n_estimators,
        "cv": args.cv,
        "repeats": args.repeats,
        "dataset_bytes": int(X.nbytes + np.asarray(y).nbytes),
        "by_workers": {},
    }
    print(f"{n_fits} fits on Adult {X.shape}, runners {args.only}, N={args.workers}")
    order = ["loky"] + [r for r in args.only if r != "loky"]
    for n in args.workers:
        records = []
        for name in order:
            record = measure(name, n, args, X, y, grid)
            records.append(record)
            base = records[0].get("times_s")
            ratio = (
                f"{min(record['times_s']) / min(base):.2f}x loky"
                if base and record.get("times_s")
                else ""
            )
            print(f"N={n} {name:9s} {record.get('times_s', record.get('error'))} {ratio} "
                  f"data={record.get('data_bytes')} ms/task={record.get('task_wall_ms')}",
                  flush=True)  # fmt: skip
        result["by_workers"][str(n)] = records
    table = markdown(result)
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.markdown:
        write_markdown(args.markdown, table, args.marker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
