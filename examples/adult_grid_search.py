"""The original clustersearch job: a RandomForest grid search on UCI Adult.

It reproduces the hobbyist's Pine64 search (max_features x min_samples_split
x min_samples_leaf x max_depth) with ClusterGridSearchCV. Without
``--cluster`` and without CLUSTERSEARCH_BROKER_URL it runs on an embedded
LocalCluster (one node per CPU core, no server needed)::

    python examples/adult_grid_search.py                 # 24 candidates, ~40 s on 2 idle cores
    python examples/adult_grid_search.py --grid full     # the original 3,360 candidates
    python examples/adult_grid_search.py --cluster amqp://remote:secret@pine0//

The data is read from --data, else $CLUSTERSEARCH_DATA, else ../shared/data/adult
beside this checkout, else the copy shipped with clustersearch (no network needed).
"""

import argparse
import os
import time
from pathlib import Path

from sklearn.ensemble import RandomForestClassifier

from clustersearch import ClusterGridSearchCV
from clustersearch.datasets import load_adult

GRIDS = {
    # 2 x 2 x 2 x 3 = 24 candidates, 72 fits with 3 folds.
    "small": {
        "max_features": [5, 15],
        "min_samples_split": [2, 10],
        "min_samples_leaf": [1, 4],
        "max_depth": [8, 16, None],
    },
    # 7 x 8 x 6 x 10 = 3,360 candidates: the original search.
    "full": {
        "max_features": [2, 4, 6, 8, 10, 12, 14],
        "min_samples_split": [2, 4, 6, 8, 10, 12, 14, 16],
        "min_samples_leaf": [1, 2, 3, 4, 5, 6],
        "max_depth": [4, 6, 8, 10, 12, 14, 16, 18, 20, None],
    },
}


def _data_home(arg):
    if arg:
        return arg
    if os.environ.get("CLUSTERSEARCH_DATA"):
        return None  # load_adult reads it
    beside = Path(__file__).resolve().parents[2] / "shared" / "data" / "adult"
    return str(beside) if (beside / "adult.data").exists() else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", choices=sorted(GRIDS), default="small")
    parser.add_argument("--cluster", default=None,
                        help="broker URL (default: $CLUSTERSEARCH_BROKER_URL, "
                        "else an embedded local cluster)")
    parser.add_argument("--data", default=None, help="folder with adult.data and adult.test")
    parser.add_argument("--n-estimators", type=int, default=25)
    parser.add_argument("--cv", type=int, default=3)
    args = parser.parse_args(argv)

    data_home = _data_home(args.data)
    X, y = load_adult(data_home, subset="train")
    X_test, y_test = load_adult(data_home, subset="test")
    grid = GRIDS[args.grid]

    search = ClusterGridSearchCV(
        RandomForestClassifier(n_estimators=args.n_estimators, random_state=0),
        grid,
        cv=args.cv,
        scoring="accuracy",
        cluster=args.cluster,
    )
    start = time.perf_counter()
    search.fit(X, y)
    wall = time.perf_counter() - start

    n_candidates = len(search.cv_results_["params"])
    print(f"data:            {X.shape[0]} x {X.shape[1]} (train), {X_test.shape[0]} (test)")
    print(f"candidates:      {n_candidates} ({n_candidates * search.n_splits_} fits)")
    print(f"fits per node:   {search.fits_per_node_}")
    sent = sum(search.data_bytes_per_node_.values())
    messages = sum(search.message_bytes_per_node_.values())
    print(f"data sent:       {sent / 1e6:.1f} MB to the nodes' caches, "
          f"{messages / 1e3:.0f} kB of task messages")  # fmt: skip
    print(f"best params:     {search.best_params_}")
    print(f"CV accuracy:     {search.best_score_:.4f}")
    print(f"test accuracy:   {search.score(X_test, y_test):.4f}")
    print(f"wall time:       {wall:.1f} s (search and refit)")


if __name__ == "__main__":
    main()
