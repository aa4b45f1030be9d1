"""A 10,080-fit grid of near-instant fits: per-fit overhead at the scale of
the original Pine64 grid (3,360 candidates x 3 folds).

Times one ``GridSearchCV`` serially (n_jobs=1), with loky (n_jobs=2), and
``ClusterGridSearchCV`` on a 2-node ``LocalCluster`` over RabbitMQ (running
as root needs ``--allow-root``), and checks that the scores agree.

    python benchmarks/bench_big_grid.py [--broker amqp://guest:guest@127.0.0.1:5672//]
"""

import argparse
import os
import time

import numpy as np
from sklearn.datasets import make_classification
from sklearn.model_selection import GridSearchCV
from sklearn.tree import DecisionTreeClassifier

from clustersearch import ClusterGridSearchCV, LocalCluster

GRID = {
    "max_features": [2, 4, 6, 8, 10],
    "min_samples_split": list(range(2, 30)),
    "min_samples_leaf": list(range(1, 7)),
    "max_depth": [2, 4, 8, None],
}  # 3,360 candidates


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", default="amqp://guest:guest@127.0.0.1:5672//")
    parser.add_argument("--only", nargs="+", default=["serial", "loky", "cluster"])
    args = parser.parse_args()
    X, y = make_classification(500, 10, random_state=0)
    tree = DecisionTreeClassifier(random_state=0)
    scores = {}
    for name in args.only:
        start = time.perf_counter()
        if name == "cluster":
            with LocalCluster(
                n_workers=2, broker_url=args.broker, allow_root=os.geteuid() == 0
            ) as cluster:
                search = ClusterGridSearchCV(tree, GRID, cv=3, cluster=cluster).fit(X, y)
        else:
            n_jobs = 1 if name == "serial" else 2
            search = GridSearchCV(tree, GRID, cv=3, n_jobs=n_jobs).fit(X, y)
        took = time.perf_counter() - start
        scores[name] = search.cv_results_["mean_test_score"]
        print(f"{name:8s} {3 * len(search.cv_results_['params'])} fits {took:7.1f} s", flush=True)
    first = next(iter(scores.values()))
    print("scores agree:", all(np.allclose(s, first) for s in scores.values()))


if __name__ == "__main__":
    main()
