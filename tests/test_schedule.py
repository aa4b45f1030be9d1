"""Longest expected fits first (client/schedule.py, Policy.longest_first).

The scheduler's decisions as plain functions, then real searches on the
embedded 2-node cluster: cv_results_ equal to scikit-learn's in the new
order, the long fits sent early (and last without the scheduler), each fit
counted once, and batches still formed for grids of near-instant fits.
"""

import math

import numpy as np
import pytest
from conftest import assert_ran_on_workers, assert_same_results
from sklearn.datasets import make_classification
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import GridSearchCV, RandomizedSearchCV
from sklearn.tree import DecisionTreeClassifier

from clustersearch import ClusterGridSearchCV, ClusterRandomizedSearchCV
from clustersearch.client.policy import Policy
from clustersearch.client.recovery import backups
from clustersearch.client.schedule import (
    CostModel,
    Scheduler,
    call_features,
    candidate_key,
)
from clustersearch.exceptions import ConfigurationError

# -- the cost model and the decisions ------------------------------------------


def feats(**params):
    return call_features({"parameters": params, "train": np.arange(100)})


def test_call_features_one_hot_numeric_and_pairs():
    f = feats(max_depth=None, n_estimators=10)
    assert f["max_depth=None"] == 1.0
    assert f["n_estimators=10"] == 1.0
    assert f["n_estimators#log"] == pytest.approx(math.log1p(10))
    assert f["max_depth=None&n_estimators=10"] == 1.0
    assert f["n_train#log"] == pytest.approx(math.log1p(100))
    assert "max_depth#log" not in f  # None is not a number
    assert candidate_key(f) == {"max_depth=None", "n_estimators=10"}
    assert call_features({"X": 1}) is None  # not a search's fit: not ranked


def test_cost_model_learns_which_values_take_long_and_node_speeds():
    model = CostModel()
    assert not model.ready and model.seconds([feats(max_depth=2)]) is None
    for _ in range(3):
        for depth, seconds in ((2, 0.1), (8, 0.3), (None, 3.0)):
            model.observe(feats(max_depth=depth), "fast", seconds)
            model.observe(feats(max_depth=depth), "slow", 4 * seconds)
    long, short = model.seconds([feats(max_depth=None)]), model.seconds([feats(max_depth=2)])
    assert long / short > 10
    assert model.speed("slow") / model.speed("fast") == pytest.approx(4, rel=0.2)
    assert model.speed("unknown") == 1.0
    nodes = ["slow", "fast", "unknown"]
    assert model.speeds(nodes) == {n: model.speed(n) for n in nodes}


def test_cost_model_predicts_between_refits_with_new_features():
    # Refits are spaced out (every tenth more fit): a value first seen since
    # the last refit counts as unknown until the next, instead of failing.
    model = CostModel()
    for i in range(40):
        model.observe(feats(max_depth=2, min_samples_leaf=i % 4 + 1), "a", 0.1)
    assert model.seconds([feats(max_depth=2)]) is not None
    model.observe(feats(max_depth=None, criterion="entropy"), "new-node", 5.0)
    assert model.seconds([feats(max_depth=None, criterion="entropy")], "new-node") > 0
    assert model.speed("new-node") == 1.0


def test_cost_model_stays_bounded_on_continuous_values():
    # A randomized search over continuous distributions: every candidate
    # has new values. One-hot features per value (and per pair) grew X'X
    # without bound (here 4,200 features: a 537 MB matrix, refits of
    # seconds); the model keeps MAX_VALUES per parameter and MAX_FEATURES in
    # all, and still learns from the values' logs.
    rng = np.random.RandomState(0)
    model = CostModel()
    for _ in range(700):
        C, gamma, tol = rng.uniform(0.01, 100, 3)
        model.observe(feats(C=C, gamma=gamma, tol=tol), "a", 0.01 * (1 + C))
    assert len(model.index) <= CostModel.MAX_FEATURES + 8
    assert model._xtx.shape[0] <= 2 * (CostModel.MAX_FEATURES + 8)
    values = {name.split("=")[0] for name in model.index if "=" in name and "&" not in name}
    for param in ("C", "gamma", "tol"):
        singles = [n for n in model.index if n.startswith(f"{param}=") and "&" not in n]
        assert len(singles) == CostModel.MAX_VALUES
        assert f"{param}#log" in model.index
    assert values >= {"C", "gamma", "tol"}
    new_small, new_large = feats(C=0.5, gamma=1.0, tol=1.0), feats(C=90.0, gamma=1.0, tol=1.0)
    assert model.seconds([new_large]) > 5 * model.seconds([new_small])


def test_guess_is_the_models_estimate_call_by_call_with_floors():
    scheduler = Scheduler()
    timed = [
        (feats(max_depth=depth, min_samples_leaf=leaf), seconds * leaf)
        for depth, seconds in ((2, 0.1), (8, 0.4), (None, 2.0))
        for leaf in (1, 4)
    ]
    for f, seconds in timed:
        scheduler.learn([f], "n", [{"fit_time": seconds, "score_time": 0.0}])
    calls = [f for f, _ in timed]
    work = _work(calls)
    assert scheduler.guess(work) == pytest.approx(scheduler.model.seconds(calls), rel=1e-9)
    # A candidate running for 30 s: its calls count at least 30 s each.
    key = candidate_key(calls[0])
    floor = 30.0
    expected = sum(
        max(scheduler.model.seconds([f]), floor if candidate_key(f) == key else 0.0)
        for f in calls
    )
    assert scheduler.guess(work, {key: floor}) == pytest.approx(expected, rel=1e-9)
    # Kept on the work until the model changes; costs replaced: worked out again.
    est = scheduler.estimates(work)
    assert scheduler.estimates(work) is est
    work.costs = calls[:2]
    assert scheduler.guess(work) == pytest.approx(scheduler.model.seconds(calls[:2]), rel=1e-9)


def _work(costs, **attrs):
    class W:
        pass

    work = W()
    work.costs, work.guess = costs, None
    for name, value in attrs.items():
        setattr(work, name, value)
    return work


def test_order_untried_values_first_then_longest_expected():
    scheduler = Scheduler()
    a, b, c = feats(max_depth=2), feats(max_depth=8), feats(max_depth=None)
    works = [_work([a]), _work([b]), _work([c]), _work(None)]
    # Nothing tried: untried values first, in the given order; unranked in front.
    assert scheduler.order(works, lambda w: w.costs) == [works[3], works[0], works[1], works[2]]
    for f in (a, b, c):
        scheduler.dispatched([f])
    for _ in range(2):
        for f, seconds in ((a, 0.1), (b, 0.5), (c, 4.0)):
            scheduler.learn([f], "n", [{"fit_time": seconds, "score_time": 0.0}])
    again = [_work([a]), _work([b]), _work([c])]
    assert scheduler.order(again, lambda w: w.costs) == [again[2], again[1], again[0]]
    # A fit of a candidate that has run for 9 s: its other fits go first.
    floors = {candidate_key(a): 9.0}
    assert scheduler.order(again, lambda w: w.costs, floors)[0] is again[0]


def test_a_slow_node_does_not_take_a_long_fit_a_fast_one_ends_sooner():
    scheduler = Scheduler()
    long, short = feats(max_depth=None), feats(max_depth=1)
    for _ in range(3):
        for node, factor in (("fast", 1.0), ("slow", 4.0)):
            scheduler.model.observe(long, node, 10.0 * factor)
            scheduler.model.observe(short, node, 0.1 * factor)
    ready = {"fast": 1.0, "slow": 0.0}  # slow is free now, fast in 1 s
    assert not scheduler.fits_on([long], "slow", ready, horizon=5.0)
    assert scheduler.fits_on([long], "fast", ready, horizon=5.0)
    assert scheduler.fits_on([short], "slow", ready, horizon=5.0)
    # Before the search's expected end anyway: the slow node may take it.
    assert scheduler.fits_on([long], "slow", ready, horizon=100.0)


def test_ready_at_counts_running_and_queued_work():
    scheduler = Scheduler()
    assert scheduler.ready_at([], 1, now=10.0) == 10.0
    # One process: runs a 5 s batch sent at 8, a 3 s batch waits behind it.
    assert scheduler.ready_at([(8.0, 5.0), (9.0, 3.0)], 1, now=10.0) == pytest.approx(16.0)
    # Overdue by 2 s: expected to take 2 s more.
    assert scheduler.ready_at([(0.0, 8.0)], 1, now=10.0) == pytest.approx(12.0)


def test_backups_with_a_threshold_per_batch():
    in_flight = [("long", "A", 0.0), ("short", "B", 5.0)]
    late = {"long": 30.0, "short": 1.0}
    chosen = backups(in_flight, {"C": 2}, late=lambda w, n: late[w], now=10.0, skip=lambda w: False)
    assert chosen == [("short", "B", "C", 5.0)]  # the long one is on time


def test_policy_longest_first_is_a_bool():
    assert Policy().longest_first is True
    assert Policy(longest_first=False).longest_first is False
    with pytest.raises(ConfigurationError, match="longest_first must be a bool"):
        Policy(longest_first=1)


# -- real searches -----------------------------------------------------------------

X, y = make_classification(2000, 20, n_informative=8, random_state=0)
# The long candidate last in the grid's order: 1-tree forests, then 150
# trees (about 100 times longer: clear of a loaded machine's noise).
GRID = [
    {"n_estimators": [1], "max_depth": [1, 2, 3, 4, 5]},
    {"n_estimators": [150], "max_depth": [None]},
]


def _sent_ranks_of_longest(search, k):
    tasks = sorted(search.fit_timeline_["tasks"], key=lambda t: t["sent"])
    longest = sorted(range(len(tasks)), key=lambda i: tasks[i]["end"] - tasks[i]["start"])[-k:]
    return sorted(longest)


def _with_policy(monkeypatch, cluster, **changes):
    monkeypatch.setattr(cluster, "policy", cluster.policy.replace(**changes))


def test_grid_search_sends_the_long_fits_early_with_equal_results(embedded_cluster, monkeypatch):
    forest = RandomForestClassifier(random_state=0)
    theirs = GridSearchCV(forest, GRID, cv=3).fit(X, y)
    _with_policy(monkeypatch, embedded_cluster, longest_first=False, straggler_factor=None)
    # The data into the nodes' caches first, and sklearn.ensemble into their
    # processes: a node's first forest fit also fetches the data (the same
    # folds: their indices are data too) and imports, and would look long.
    # Until every node has.
    for _ in range(5):
        warm = ClusterGridSearchCV(forest, {"n_estimators": [1], "max_depth": [1, 2]}, cv=3,
                                   cluster=embedded_cluster)  # fmt: skip
        if len(warm.fit(X, y).fits_per_node_) == len(embedded_cluster.nodes()):
            break
    before = ClusterGridSearchCV(forest, GRID, cv=3, cluster=embedded_cluster).fit(X, y)
    assert_same_results(before, theirs)
    # In the search's order the 150-tree fits are sent last (joblib may
    # batch the 1-tree fits: count tasks, not fits).
    n_tasks = len(before.fit_timeline_["tasks"])
    assert _sent_ranks_of_longest(before, 3) == [n_tasks - 3, n_tasks - 2, n_tasks - 1]

    _with_policy(monkeypatch, embedded_cluster, longest_first=True, straggler_factor=None)
    ours = ClusterGridSearchCV(forest, GRID, cv=3, cluster=embedded_cluster).fit(X, y)
    assert_same_results(ours, theirs)
    assert_ran_on_workers(ours, embedded_cluster, 18)
    tasks = ours.fit_timeline_["tasks"]
    assert sum(t["fits"] for t in tasks) == 18 and all(t["fits"] == 1 for t in tasks)
    # Untried values first: the first 150-tree fit second (third at worst, if
    # joblib took over 0.5 s to hand every batch over); its other
    # splits as soon as it has run longer than a 1-tree fit takes, long
    # before the 1-tree fits are done.
    ranks = _sent_ranks_of_longest(ours, 3)
    assert ranks[0] <= 2, ranks
    assert ranks[-1] <= 10, ranks


def test_randomized_search_equal_results_in_the_new_order(embedded_cluster, monkeypatch):
    _with_policy(monkeypatch, embedded_cluster, longest_first=True)
    space = {"max_depth": [1, 2, 4, 8, None], "min_samples_leaf": [1, 5, 50]}
    tree = DecisionTreeClassifier(random_state=0)
    kwargs = dict(n_iter=8, cv=3, random_state=0)
    theirs = RandomizedSearchCV(tree, space, **kwargs).fit(X, y)
    ours = ClusterRandomizedSearchCV(tree, space, cluster=embedded_cluster, **kwargs).fit(X, y)
    assert_same_results(ours, theirs)
    assert_ran_on_workers(ours, embedded_cluster, 24)


def test_many_near_instant_fits_still_go_in_batches(embedded_cluster, monkeypatch):
    # Everything is handed over at once, so joblib's auto-batching has no
    # batch to learn from: the backend batches n_fits / (32 x capacity).
    _with_policy(monkeypatch, embedded_cluster, longest_first=True)
    tree = DecisionTreeClassifier(random_state=0)
    grid = {"min_samples_split": list(range(2, 102)), "max_depth": [1, 2]}  # 200 candidates
    small_X, small_y = X[:200], y[:200]
    theirs = GridSearchCV(tree, grid, cv=3).fit(small_X, small_y)
    ours = ClusterGridSearchCV(tree, grid, cv=3, cluster=embedded_cluster).fit(small_X, small_y)
    assert_same_results(ours, theirs)
    assert_ran_on_workers(ours, embedded_cluster, 600)
    tasks = ours.fit_timeline_["tasks"]
    capacity = sum(n.concurrency for n in embedded_cluster.nodes())
    assert max(t["fits"] for t in tasks) == 600 // (32 * capacity)
    assert len(tasks) <= 600 // (600 // (32 * capacity)) + capacity


def test_an_explicit_pre_dispatch_is_kept(embedded_cluster, monkeypatch):
    # The user's pre_dispatch bounds what joblib hands over; the scheduler
    # orders what it holds, and results are the same.
    _with_policy(monkeypatch, embedded_cluster, longest_first=True)
    forest = RandomForestClassifier(random_state=0)
    theirs = GridSearchCV(forest, GRID, cv=3, pre_dispatch=4).fit(X, y)
    ours = ClusterGridSearchCV(forest, GRID, cv=3, pre_dispatch=4, cluster=embedded_cluster)
    ours.fit(X, y)
    assert_same_results(ours, theirs)
    assert_ran_on_workers(ours, embedded_cluster, 18)
