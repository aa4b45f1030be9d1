"""Model the original Pine64 shelf: static split by hand vs clustersearch.

The hobbyist ran the 3,360-candidate Adult RandomForest grid (3-fold CV,
10,080 fits) in 9.1 h on one 4-core Pine64 and in 1.5 h on five, splitting
the grid by hand, one GridSearchCV per host. This script

1. measures per-fit times on this machine for a sample of the grid (every
   ``max_features`` x ``max_depth`` pair at middle split/leaf values, and
   every ``min_samples_split`` x ``min_samples_leaf`` pair at a middle
   ``max_features``/``max_depth``), and models every fit's time as
   ``t(max_features, max_depth) * f(min_samples_split, min_samples_leaf)``;
2. scales the model so that one board (4 slots, list scheduling in grid
   order, as GridSearchCV with n_jobs=4) takes the reported 9.1 h;
3. simulates 5 and 10 boards two ways: the static split (each host gets a
   contiguous slice of the grid, as a hand split by parameter value does,
   and runs it with its own 4 slots) and clustersearch (one global queue
   over every slot: a fit goes to whichever slot frees first, plus the
   measured per-task overhead and the data shipped once per board).

    python benchmarks/pine64_model.py [--overhead-ms 3] [--link-mbit 100]
"""

import argparse
import heapq
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search import load_data  # noqa: E402

FULL = {
    "max_features": [2, 4, 6, 8, 10, 12, 14],
    "min_samples_split": [2, 4, 6, 8, 10, 12, 14, 16],
    "min_samples_leaf": [1, 2, 3, 4, 5, 6],
    "max_depth": [4, 6, 8, 10, 12, 14, 16, 18, 20, None],
}
ONE_BOARD_S = 9.1 * 3600
SLOTS_PER_BOARD = 4


def _fit_time(X, y, train, **params):
    from sklearn.ensemble import RandomForestClassifier

    est = RandomForestClassifier(n_estimators=10, random_state=0, **params)
    t = time.perf_counter()
    est.fit(X[train], y[train])
    return time.perf_counter() - t


def measure(X, y):
    rng = np.random.RandomState(0)
    train = rng.permutation(len(X))[: 2 * len(X) // 3]
    base = {}
    for mf, md in itertools.product(FULL["max_features"], FULL["max_depth"]):
        base[mf, md] = _fit_time(X, y, train, max_features=mf, max_depth=md,
                                 min_samples_split=8, min_samples_leaf=3)  # fmt: skip
    ref = _fit_time(X, y, train, max_features=8, max_depth=12,
                    min_samples_split=8, min_samples_leaf=3)  # fmt: skip
    factor = {}
    for mss, msl in itertools.product(FULL["min_samples_split"], FULL["min_samples_leaf"]):
        factor[mss, msl] = _fit_time(X, y, train, max_features=8, max_depth=12,
                                     min_samples_split=mss, min_samples_leaf=msl) / ref  # fmt: skip
    return base, factor


def fits_in_grid_order(base, factor, cv=3):
    """Per-fit seconds, candidate-major as GridSearchCV sends them."""
    keys = sorted(FULL)  # ParameterGrid iterates sorted keys, last fastest
    times = []
    for values in itertools.product(*(FULL[k] for k in keys)):
        p = dict(zip(keys, values))
        t = base[p["max_features"], p["max_depth"]] * factor[
            p["min_samples_split"], p["min_samples_leaf"]
        ]
        times.extend([t] * cv)
    return np.array(times)


def list_schedule(times, slots, overhead=0.0):
    """Makespan of sending ``times`` in order to whichever slot frees first."""
    free = [0.0] * slots
    heapq.heapify(free)
    for t in times:
        start = heapq.heappop(free)
        heapq.heappush(free, start + t + overhead)
    return max(free)


def static_split(times, boards, cv=3):
    """Each board runs a contiguous slice of the candidates on its 4 slots."""
    candidates = len(times) // cv
    bounds = np.linspace(0, candidates, boards + 1).round().astype(int) * cv
    return max(
        list_schedule(times[a:b], SLOTS_PER_BOARD) for a, b in zip(bounds[:-1], bounds[1:])
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--overhead-ms", type=float, default=3.0,
                        help="per-task overhead on the cluster (measured: bench_search.py)")
    parser.add_argument("--link-mbit", type=float, default=100.0,
                        help="the broker's link to each board")
    parser.add_argument("--data", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    X, y = load_data(args.data)
    started = time.perf_counter()
    base, factor = measure(X, y)
    here = fits_in_grid_order(base, factor)
    scale = ONE_BOARD_S / list_schedule(here, SLOTS_PER_BOARD)
    board = here * scale
    dataset_s = (X.nbytes + y.nbytes) * 8 / (args.link_mbit * 1e6)
    rows = []
    for boards in (1, 5, 10):
        static = static_split(board, boards)
        ours = list_schedule(board, boards * SLOTS_PER_BOARD, args.overhead_ms / 1e3)
        # Boards fetch the data one after another over the broker's link.
        ours += dataset_s * boards
        rows.append({"boards": boards, "static_h": static / 3600, "clustersearch_h": ours / 3600,
                     "ideal_h": ONE_BOARD_S / boards / 3600})  # fmt: skip
    print(f"measured {len(base) + len(factor) + 1} fits in {time.perf_counter() - started:.0f} s; "
          f"scaled x{scale:.1f} to the reported 9.1 h on one board (their forests were "
          f"bigger and their cores slower); per-fit time on a board: median "
          f"{np.median(board):.1f} s, max {board.max():.1f} s")  # fmt: skip
    print("| boards | static split (h) | clustersearch (h) | ideal (h) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['boards']} | {r['static_h']:.2f} | {r['clustersearch_h']:.2f} | "
              f"{r['ideal_h']:.2f} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"scale": scale, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
