"""The other half of the original idea: ensembles whose parts live on the nodes.

On UCI Adult, next to the tuned single forest of ``adult_grid_search.py``:

- a forest of 1,000 trees built across the nodes and kept there
  (``keep="nodes"``, each part on two nodes): the client holds a handle, the
  nodes hold the trees and answer ``predict_proba`` with their parts' sums;
- a stack of the search's top 5 candidates (``search.ensemble``), whose
  out-of-fold predictions the search already kept (``keep_predictions=True``).

Without ``--cluster`` and without CLUSTERSEARCH_BROKER_URL it runs on an
embedded LocalCluster (one node per CPU core, no server needed)::

    python examples/adult_ensemble.py
    python examples/adult_ensemble.py --trees 200      # quicker
    python examples/adult_ensemble.py --cluster amqp://remote:secret@pine0//
"""

import argparse
import os
import time
from pathlib import Path

from sklearn.ensemble import RandomForestClassifier

from clustersearch import (
    ClusterGridSearchCV,
    ClusterRandomForestClassifier,
    LocalCluster,
)
from clustersearch.datasets import load_adult

# Error rates on the Adult test set from adult.names (the UCI table the
# original author cited).
UCI = {"C4.5": 15.54, "NBTree": 14.10, "Naive Bayes": 16.12}

GRID = {
    "max_features": [5, 10],
    "min_samples_leaf": [1, 4],
    "max_depth": [12, 16, None],
}


def _data_home(arg):
    if arg:
        return arg
    if os.environ.get("CLUSTERSEARCH_DATA"):
        return None  # load_adult reads it
    beside = Path(__file__).resolve().parents[2] / "shared" / "data" / "adult"
    return str(beside) if (beside / "adult.data").exists() else None


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cluster", default=None,
                        help="broker URL (default: $CLUSTERSEARCH_BROKER_URL, "
                        "else an embedded local cluster)")  # fmt: skip
    parser.add_argument("--data", default=None, help="folder with adult.data and adult.test")
    parser.add_argument("--trees", type=int, default=1000, help="trees of the resident forest")
    parser.add_argument("--top", type=int, default=5, help="candidates in the stack")
    args = parser.parse_args(argv)

    data_home = _data_home(args.data)
    X, y = load_adult(data_home, subset="train")
    X_test, y_test = load_adult(data_home, subset="test")
    # One cluster for the three parts: an embedded one unless told otherwise.
    broker = args.cluster or os.environ.get("CLUSTERSEARCH_BROKER_URL")
    cluster = broker if broker else LocalCluster()

    # 1. The tuned single forest, keeping each fit's out-of-fold predictions.
    search = ClusterGridSearchCV(
        RandomForestClassifier(n_estimators=50, random_state=0),
        GRID, cv=3, scoring="accuracy", keep_predictions=True, cluster=cluster,
    )  # fmt: skip
    _, search_s = _timed(lambda: search.fit(X, y))

    # 2. A forest of --trees trees that stays on the nodes.
    forest = ClusterRandomForestClassifier(
        n_estimators=args.trees, random_state=0, keep="nodes", replicas=2,
        cluster=cluster, **search.best_params_,
    )  # fmt: skip
    _, forest_s = _timed(lambda: forest.fit(X, y))
    forest_acc, predict_s = _timed(lambda: forest.score(X_test, y_test))

    # 3. A stack of the search's top candidates: their refits and the final
    #    estimator's fit; the out-of-fold predictions come from the search.
    stack, stack_s = _timed(lambda: search.ensemble(k=args.top, method="stack"))

    rows = [
        ("tuned single forest", search.score(X_test, y_test), search_s),
        (f"resident forest ({args.trees} trees)", forest_acc, forest_s + predict_s),
        (f"stack of the top {args.top}", stack.score(X_test, y_test), stack_s),
    ]
    print(f"data: {X.shape[0]} x {X.shape[1]} (train), {X_test.shape[0]} (test)")
    print(f"{'model':<32} {'test acc.':>9} {'error':>7} {'wall':>8}")
    for name, acc, wall in rows:
        print(f"{name:<32} {acc:9.4f} {100 * (1 - acc):6.2f}% {wall:7.1f}s")
    for name, err in UCI.items():
        print(f"{name + ' (UCI, adult.names)':<32} {1 - err / 100:9.4f} {err:6.2f}%")
    print(f"trees per node:       {forest.fits_per_node_}")
    held = forest.resident_.nbytes
    print("store bytes per node: " + ", ".join(
        f"{name} {b / 1e6:.1f} MB" for name, b in sorted(held.items())))  # fmt: skip
    print(f"best params:          {search.best_params_}")
    print(f"wall time:            search {search_s:.1f} s, forest fit {forest_s:.1f} s "
          f"and predict {predict_s:.1f} s, stack {stack_s:.1f} s")  # fmt: skip
    forest.delete()
    if isinstance(cluster, LocalCluster):
        cluster.close()


if __name__ == "__main__":
    main()
