"""Model the original Pine64 shelf: static split by hand vs clustersearch.

The hobbyist ran the 3,360-candidate Adult RandomForest grid (3-fold CV,
10,080 fits) in 9.1 h on one 4-core Pine64 and in 1.5 h (5,459 s) on five,
splitting the grid by hand, one GridSearchCV per host. This script

1. measures per-fit times on this machine for a sample of the grid (every
   ``max_features`` x ``max_depth`` pair at middle split/leaf values, and
   every ``min_samples_split`` x ``min_samples_leaf`` pair at a middle
   ``max_features``/``max_depth``), and models every fit's time as
   ``t(max_features, max_depth) * f(min_samples_split, min_samples_leaf)``;
2. scales the model so that one board (4 slots, list scheduling in grid
   order, as GridSearchCV with n_jobs=4) takes the reported 9.1 h;
3. simulates 5 and 10 boards: the static split (each host gets a contiguous
   slice of the grid, as a hand split by parameter value does, and runs it
   with its own 4 slots), clustersearch in grid order (one global queue over
   every slot: a fit goes to whichever slot frees first), and clustersearch
   longest expected fit first (the fits sorted by a prediction of their time
   that is off by a log-normal error, ``--prediction-error``, each going to
   the slot that would finish it first, so a slow board does not start a
   long fit a fast one would finish sooner), each with the per-task overhead
   and the data shipped once per board;
4. does the same on a mixed shelf (a third of the boards at full speed, a
   third at 1/2, a third at 1/4), against the bound of each shelf:
   max(total work / total speed, the longest fit on the fastest board).

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
from bench_search import load_data, write_markdown  # noqa: E402

FULL = {
    "max_features": [2, 4, 6, 8, 10, 12, 14],
    "min_samples_split": [2, 4, 6, 8, 10, 12, 14, 16],
    "min_samples_leaf": [1, 2, 3, 4, 5, 6],
    "max_depth": [4, 6, 8, 10, 12, 14, 16, 18, 20, None],
}
ONE_BOARD_S = 9.1 * 3600
FIVE_BOARDS_S = 5459.0  # the original's measured time on five boards
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


def schedule(times, speeds, order=None, overhead=0.0, earliest_finish=False):
    """Makespan of ``times`` on slots of ``speeds`` (1: a full board core).

    Fits are taken in ``order`` (default: as given). Each goes to the slot
    that frees first, or with ``earliest_finish`` to the slot that would
    finish it first (a slow slot is skipped when a faster one frees soon
    enough to finish the fit sooner).
    """
    order = range(len(times)) if order is None else order
    speeds = np.asarray(speeds, dtype=float)
    free = np.zeros(len(speeds))
    for i in order:
        if earliest_finish:
            slot = int(np.argmin(free + times[i] / speeds))
        else:
            slot = int(np.argmin(free))
        free[slot] += times[i] / speeds[slot] + overhead
    return float(free.max())


def lower_bound(times, speeds):
    """No schedule beats this: all the work on all the speed, or the longest
    fit on the fastest slot."""
    return max(float(np.sum(times)) / float(np.sum(speeds)), float(times.max()) / max(speeds))


def longest_first(times, error, seed=0):
    """Fit order by a prediction ``error`` (log-normal sigma) off the truth."""
    rng = np.random.RandomState(seed)
    predicted = times * np.exp(rng.normal(0.0, error, size=len(times)))
    return np.argsort(-predicted, kind="stable")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--overhead-ms", type=float, default=3.0,
                        help="per-task overhead on the cluster (measured: bench_search.py)")
    parser.add_argument("--link-mbit", type=float, default=100.0,
                        help="the broker's link to each board")
    parser.add_argument("--prediction-error", type=float, default=0.3,
                        help="log-normal sigma of the fit-time predictions that order "
                        "longest-first dispatch (0: exact)")
    parser.add_argument("--data", default=None)
    parser.add_argument("--fit-times", default=None,
                        help="JSON of bench_full_grid.py: the full grid's own per-candidate "
                        "fit times instead of the sampled model")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)

    X, y = load_data(args.data)
    started = time.perf_counter()
    if args.fit_times:
        # The measured grid, in cv_results_ order (ParameterGrid's, as here).
        grid = json.loads(Path(args.fit_times).read_text())["grid"]
        here = np.repeat([c["mean_fit_time"] for c in grid["fit_times"]], 3)
        source = (f"Per-fit times of the full grid run itself ({len(here)} fits, "
                  f"{args.fit_times}; each candidate's mean fit time)")  # fmt: skip
    else:
        base, factor = measure(X, y)
        here = fits_in_grid_order(base, factor)
        source = (f"Per-fit times measured here on {len(base) + len(factor) + 1} fits in "
                  f"{time.perf_counter() - started:.0f} s (10 trees, 2/3 of Adult), modelled as "
                  "t(max_features, max_depth) x f(min_samples_split, min_samples_leaf) over "
                  "the 3,360-candidate grid (10,080 fits)")  # fmt: skip
    scale = ONE_BOARD_S / list_schedule(here, SLOTS_PER_BOARD)
    board = here * scale
    dataset_s = (X.nbytes + y.nbytes) * 8 / (args.link_mbit * 1e6)
    rows = []
    order = longest_first(board, args.prediction_error)
    overhead = args.overhead_ms / 1e3
    for shelf, boards in (("equal", 1), ("equal", 5), ("equal", 10), ("mixed", 6), ("mixed", 9)):
        if shelf == "equal":
            speeds = [1.0] * boards
        else:  # a third each at full speed, 1/2 and 1/4
            speeds = [1.0, 0.5, 0.25] * (boards // 3)
        slots = [s for s in speeds for _ in range(SLOTS_PER_BOARD)]
        # Boards fetch the data one after another over the broker's link.
        shipping = dataset_s * boards
        static = static_split(board, boards) if shelf == "equal" else None
        grid_order = schedule(board, slots, overhead=overhead) + shipping
        ours = schedule(board, slots, order, overhead, earliest_finish=True) + shipping
        bound = lower_bound(board, slots)
        rows.append({"shelf": shelf, "boards": boards, "speeds": speeds,
                     "static_h": None if static is None else static / 3600,
                     "grid_order_h": grid_order / 3600, "longest_first_h": ours / 3600,
                     "bound_h": bound / 3600, "grid_order_x_bound": grid_order / bound,
                     "longest_first_x_bound": ours / bound})  # fmt: skip
    five = next(r for r in rows if r["shelf"] == "equal" and r["boards"] == 5)
    lines = [
        f"{source}, then scaled x{scale:.0f} so that one "
        "4-core board takes the reported 9.1 h (their forests were bigger and their "
        f"cores slower): a fit then takes {np.median(board):.1f} s (median), "
        f"{board.max():.1f} s (max) on a board. Static split: each board runs a "
        "contiguous slice of the grid in scikit-learn's order (a split by hand, by "
        "parameter value) with its own 4 slots. clustersearch: one queue over all "
        f"slots, {args.overhead_ms:g} ms per task, the data ({(X.nbytes + y.nbytes) / 1e6:.0f}"
        f" MB) shipped to the boards one after another at {args.link_mbit:g} Mbit/s; "
        "in grid order (a fit to the first free slot), or longest expected fit first "
        "(predictions off by a log-normal error of sigma "
        f"{args.prediction_error:g}; each fit to the slot that would finish it first). "
        "Mixed shelves: a third of the boards at full speed, a third at 1/2, a third "
        "at 1/4. Bound: max(total work / total speed, longest fit on the fastest board).",
        "",
        "| shelf | boards | static split (h) | grid order (h) | longest first (h) | bound (h) "
        "| grid order x bound | longest first x bound |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        static_h = "" if r["static_h"] is None else f"{r['static_h']:.2f}"
        lines.append(
            f"| {r['shelf']} | {r['boards']} | {static_h} | {r['grid_order_h']:.2f} | "
            f"{r['longest_first_h']:.2f} | {r['bound_h']:.2f} | "
            f"{r['grid_order_x_bound']:.3f} | {r['longest_first_x_bound']:.3f} |"
        )
    lines += [
        "",
        f"Against the original's 5 boards (5,459 s = 1.52 h, split by hand): the "
        f"model's static split gives {five['static_h']:.2f} h "
        f"({five['static_h'] * 3600 / FIVE_BOARDS_S:.2f}x the measured time), its "
        f"clustersearch {five['longest_first_h']:.2f} h "
        f"({five['longest_first_h'] * 3600 / FIVE_BOARDS_S:.2f}x). Even the bound, "
        f"9.1 h / 5 = {ONE_BOARD_S / 5 / 3600:.2f} h, is above the measured 1.52 h: the "
        "five boards did a fit in less board time than the one board did (a speed-up of "
        f"{ONE_BOARD_S / FIVE_BOARDS_S:.1f}x on 5), so the two reported times do not "
        "share one cost per fit (the one-board run's forests, memory or clock differed), "
        "and no schedule calibrated on the one-board time reproduces the five-board one.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        write_markdown(args.markdown, text, "pine64")
    if args.json:
        Path(args.json).write_text(json.dumps({"scale": scale, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
