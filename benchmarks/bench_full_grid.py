"""The original job, whole: the 3,360-candidate Adult grid, then halving on it.

Runs ``ClusterGridSearchCV`` over the full grid of ``examples/adult_grid_search.py``
(max_features x min_samples_split x min_samples_leaf x max_depth, 10,080 fits
with 3-fold CV) on the embedded default cluster (one node per core) or a
broker, then ``ClusterHalvingGridSearchCV`` on the same grid and cluster.
Prints, for each: wall time, fits, best CV accuracy, test accuracy and error
on adult.test, beside the UCI error rates that adult.names lists; and the
ratios halving / full grid. Writes JSON with each candidate's parameters and
mean fit time (``pine64_model.py --fit-times`` reads it) and a
docs/benchmarks.md section (``full-grid`` markers).

This is the long benchmark (an hour or more on 2 cores): ``nox -s
bench_full``, on a machine with nothing else running.

    python benchmarks/bench_full_grid.py --json benchmarks/results/full_grid.json \\
        --markdown docs/benchmarks.md
    python benchmarks/bench_full_grid.py --grid small      # the same, 24 candidates
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "examples"))
from adult_grid_search import GRIDS  # noqa: E402
from bench_search import machine, write_markdown  # noqa: E402

# adult.names: error rates of the algorithms its authors ran (test set).
UCI = {"C4.5": 15.54, "NBTree": 14.10, "FSS Naive Bayes": 14.05}


def _data_home(path):
    if path:
        return path
    beside = ROOT.parent / "shared" / "data" / "adult"
    return str(beside) if (beside / "adult.data").exists() else None


def run(kind, grid, X, y, X_test, y_test, args, cluster):
    from sklearn.ensemble import RandomForestClassifier

    from clustersearch import ClusterGridSearchCV, ClusterHalvingGridSearchCV

    forest = RandomForestClassifier(n_estimators=args.n_estimators, random_state=0)
    if kind == "grid":
        search = ClusterGridSearchCV(forest, grid, cv=args.cv, scoring="accuracy",
                                     cluster=cluster)  # fmt: skip
    else:
        search = ClusterHalvingGridSearchCV(forest, grid, cv=args.cv, scoring="accuracy",
                                            factor=3, random_state=0, cluster=cluster)  # fmt: skip
    start = time.perf_counter()
    search.fit(X, y)
    wall = time.perf_counter() - start
    test_accuracy = float(search.score(X_test, y_test))
    results = search.cv_results_
    out = {
        "wall_s": wall,
        "fits": int(sum(search.fits_per_node_.values())),
        "fits_per_node": dict(search.fits_per_node_),
        "candidates": len(results["params"]),
        "best_params": {k: v for k, v in search.best_params_.items()},
        "best_cv_accuracy": float(search.best_score_),
        "test_accuracy": test_accuracy,
        "test_error_pct": 100 * (1 - test_accuracy),
    }
    if kind == "grid":
        out["fit_times"] = [
            {"params": params, "mean_fit_time": float(t)}
            for params, t in zip(results["params"], results["mean_fit_time"])
        ]
    else:
        out["iterations"] = int(search.n_iterations_)
        out["resources"] = [int(r) for r in search.n_resources_]
    print(f"{kind:8s} {out['wall_s']:8.1f} s  {out['fits']} fits  CV {out['best_cv_accuracy']:.4f}"
          f"  test {out['test_accuracy']:.4f}", flush=True)  # fmt: skip
    return out


def markdown(result, args):
    m, grid, halving = result["machine"], result["grid"], result.get("halving")
    lines = [
        f"Measured {m['date']} on `{m['host']}`: {m['cpu']}, {m['cores']} cores, "
        f"Python {m['python']}; " + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + ".",
        "",
        f"`RandomForestClassifier(n_estimators={args.n_estimators}, random_state=0)` on "
        f"UCI Adult ({result['shape'][0]} x {result['shape'][1]} train, "
        f"{result['test_rows']} test), the `{args.grid}` grid "
        f"({grid['candidates']} candidates, {args.cv}-fold CV), on "
        f"{result['cluster']}. Halving: `ClusterHalvingGridSearchCV(factor=3)` on the "
        "same grid (resource: training samples).",
        "",
        "| search | wall s | fits | best CV accuracy | test accuracy | test error |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in (("full grid", grid), ("halving", halving)):
        if r is None:
            continue
        lines.append(f"| {name} | {r['wall_s']:.0f} | {r['fits']} | {r['best_cv_accuracy']:.4f} "
                     f"| {r['test_accuracy']:.4f} | {r['test_error_pct']:.2f}% |")  # fmt: skip
    for name, error in UCI.items():
        lines.append(f"| {name} (UCI, adult.names) | | | | | {error:.2f}% |")
    lines.append("")
    lines.append(f"Best parameters (full grid): `{grid['best_params']}`.")
    if halving is not None:
        lines.append(
            f"Halving against the full grid: {halving['wall_s'] / grid['wall_s']:.3f}x the wall "
            f"time, {halving['fits'] / grid['fits']:.3f}x the fits, best CV accuracy "
            f"{halving['best_cv_accuracy'] - grid['best_cv_accuracy']:+.4f}, test error "
            f"{halving['test_error_pct'] - grid['test_error_pct']:+.2f} points "
            f"({halving['iterations']} iterations, {halving['resources'][0]} to "
            f"{halving['resources'][-1]} samples)."
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", choices=sorted(GRIDS), default="full")
    parser.add_argument("--cluster", default=None,
                        help="broker URL (default: the embedded local cluster)")
    parser.add_argument("--n-estimators", type=int, default=25)
    parser.add_argument("--cv", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=["grid", "halving"],
                        default=["grid", "halving"])
    parser.add_argument("--data", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--marker", default="full-grid")
    args = parser.parse_args(argv)

    from clustersearch import LocalCluster
    from clustersearch.datasets import load_adult

    home = _data_home(args.data)
    X, y = load_adult(home, subset="train")
    X_test, y_test = load_adult(home, subset="test")
    grid = GRIDS[args.grid]
    local = None if args.cluster else LocalCluster(allow_root=os.geteuid() == 0)
    cluster = args.cluster or local
    try:
        result = {
            "machine": machine(),
            "shape": list(X.shape),
            "test_rows": int(X_test.shape[0]),
            "cluster": (f"the embedded LocalCluster ({len(local.node_names)} one-process nodes)"
                        if local is not None else f"the cluster at {args.cluster}"),  # fmt: skip
        }
        for kind in args.only:
            result[kind] = run(kind, grid, X, y, X_test, y_test, args, cluster)
            # Written after each search: the full grid is an hour's work.
            _write(result, args)
    finally:
        if local is not None:
            local.close()
    if "grid" in result:
        print(markdown(result, args))
    return 0


def _write(result, args):
    if "grid" in result and args.markdown:
        write_markdown(args.markdown, markdown(result, args), args.marker)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
