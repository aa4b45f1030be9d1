"""What the result journal (``journal=``) costs, measured in one run.

1. Per fit, in the client: the key of a real ``_fit_and_score`` call of an
   Adult search (estimator, parameters, X/y/split digests, scorer), the
   lookup that misses, the note of the batch sent, and the record of its
   result; then the lookup that hits. Goal: under 0.5 ms per fit.
2. The Adult RandomForest demo grid on a 2-node embedded LocalCluster,
   without a journal and with a fresh one, alternated (``--rounds``):
   the ratio of wall times. Goal: under 2 %.

    python benchmarks/bench_journal.py [--rounds 2] [--calls 2000]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from sklearn.base import clone
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import check_scoring
from sklearn.model_selection import KFold
from sklearn.utils.parallel import delayed

from clustersearch import ClusterGridSearchCV, LocalCluster
from clustersearch._compat import fit_and_score
from clustersearch.client.blobs import BlobTable
from clustersearch.client.journal import Journal, SearchJournal, _Keyer
from clustersearch.datasets import load_adult

# The Adult demo grid of benchmarks/bench_search.py (GRID_72): 24 x 3 = 72 fits.
GRID = {
    "max_features": [5, 15],
    "min_samples_split": [2, 10],
    "min_samples_leaf": [1, 4],
    "max_depth": [8, 16, None],
}


class _Batch:
    """The shape of a joblib batch the journal reads (``items``)."""

    def __init__(self, items):
        self.items = items


def per_fit(X, y, n_calls, folder):
    est = RandomForestClassifier(n_estimators=10, random_state=0)
    scorer = check_scoring(est)
    splits = list(KFold(3).split(X, y))
    sj = SearchJournal(Journal(Path(folder) / "per_fit.sqlite"), "seeded")
    sj.keyer = _Keyer(BlobTable())
    sj.collectable = True
    sj.search_id = "bench"
    calls = []
    for i in range(n_calls):
        train, test = splits[i % 3]
        params = {"max_depth": i, "min_samples_leaf": 1}
        call = delayed(fit_and_score())(
            clone(est), X, y, scorer=scorer, train=train, test=test, verbose=0,
            parameters=params, fit_params={}, score_params={}, return_train_score=False,
            return_n_test_samples=True, return_times=True, return_parameters=False,
            error_score=float("nan"), split_progress=(i % 3, 3), candidate_progress=(i, n_calls),
        )  # fmt: skip
        calls.append(_Batch([call]))
    output = {"fit_error": None, "test_scores": 0.8, "n_test_samples": 10854,
              "fit_time": 0.3, "score_time": 0.05}  # fmt: skip

    class W:
        journal = None
        task_id = None

    sj.keys(calls[0])  # X and y digested once per search (not a per-fit cost)
    t = time.perf_counter()
    for i, batch in enumerate(calls):
        keyed = sj.keys(batch)
        sj.journal.lookup(keyed[0], "seeded", "bench")
        w = W()
        w.journal, w.task_id = keyed, f"task-{i}"
        sj.sending(w, "node")
        sj.finished(w, [output])
    miss = (time.perf_counter() - t) / n_calls
    t = time.perf_counter()
    for batch in calls:
        assert sj.journal.lookup(sj.keys(batch)[0], "seeded", "bench")
    hit = (time.perf_counter() - t) / n_calls
    sj.close()
    return miss, hit


def demo(X, y, rounds, folder):
    est = RandomForestClassifier(n_estimators=10, random_state=0)
    times = {"off": [], "on": []}
    with LocalCluster(n_workers=2, allow_root=True, progress=False) as cluster:
        # Warm the nodes' data caches and imports first (not timed).
        ClusterGridSearchCV(est, {"max_depth": [2]}, cv=3, cluster=cluster).fit(X, y)
        for r in range(rounds):
            for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                journal = str(Path(folder) / f"demo{r}.sqlite") if mode == "on" else None
                t = time.perf_counter()
                ClusterGridSearchCV(est, GRID, cv=3, cluster=cluster, journal=journal).fit(X, y)
                times[mode].append(time.perf_counter() - t)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    X, y = load_adult()
    with tempfile.TemporaryDirectory() as folder:
        miss, hit = per_fit(X, y, args.calls, folder)
        print(f"per fit: key + miss + note + record {miss * 1e3:.3f} ms; "
              f"key + hit {hit * 1e3:.3f} ms (goal < 0.5 ms)")  # fmt: skip
        times = demo(X, y, args.rounds, folder)
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    print(f"Adult demo (72 fits, median of {args.rounds}): "
          f"no journal {off:.2f} s, journal {on:.2f} s, ratio {on / off:.3f} "
          f"({(on / off - 1) * 100:+.1f} %; goal < 2 %)")  # fmt: skip
    print(f"all runs: {times}")


if __name__ == "__main__":
    main()
