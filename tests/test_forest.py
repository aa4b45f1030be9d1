"""Cluster forests: the trees built on the nodes, the forest scikit-learn fits.

With an integer ``random_state`` a cluster forest must equal scikit-learn's
forest: the same trees in the same order (compared array by array) and the
same outputs, bit for bit (docs/ensembles.md). Every test also checks that
the trees were built in the nodes' pool processes, never in the client.
"""

import pickle

import numpy as np
import pytest
from conftest import (
    assert_ran_in_pool_processes,
    assert_ran_on_workers,
    assert_same_results,
)
from sklearn.base import clone
from sklearn.datasets import make_classification, make_regression
from sklearn.ensemble import (
    ExtraTreesClassifier,
    ExtraTreesRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from clustersearch import (
    Cluster,
    ClusterExtraTreesClassifier,
    ClusterExtraTreesRegressor,
    ClusterGridSearchCV,
    ClusterRandomForestClassifier,
    ClusterRandomForestRegressor,
)
from clustersearch.exceptions import BrokerUnreachableError

Xc, yc = make_classification(n_samples=240, n_features=8, n_informative=5, n_classes=3,
                             random_state=0)  # fmt: skip
Xr, yr = make_regression(n_samples=240, n_features=8, noise=1.0, random_state=0)

PAIRS = [
    (ClusterRandomForestClassifier, RandomForestClassifier, Xc, yc),
    (ClusterRandomForestRegressor, RandomForestRegressor, Xr, yr),
    (ClusterExtraTreesClassifier, ExtraTreesClassifier, Xc, yc),
    (ClusterExtraTreesRegressor, ExtraTreesRegressor, Xr, yr),
]
IDS = [p[0].__name__ for p in PAIRS]

# Small forests leave a few samples in no tree's out-of-bag set.
pytestmark = pytest.mark.filterwarnings("ignore:Some inputs do not have OOB scores")


def assert_same_forest(ours, theirs, X):
    """The same trees in the same order, and every output bit-identical."""
    assert type(ours).__mro__[2] is type(theirs) or isinstance(ours, type(theirs))
    assert len(ours.estimators_) == len(theirs.estimators_) > 0
    for i, (a, b) in enumerate(zip(ours.estimators_, theirs.estimators_)):
        assert a.random_state == b.random_state, f"tree {i}: another seed"
        sa, sb = a.tree_.__getstate__(), b.tree_.__getstate__()
        assert sa["node_count"] == sb["node_count"] and sa["max_depth"] == sb["max_depth"], i
        np.testing.assert_array_equal(sa["nodes"], sb["nodes"], err_msg=f"tree {i} nodes")
        np.testing.assert_array_equal(sa["values"], sb["values"], err_msg=f"tree {i} values")
    np.testing.assert_array_equal(ours.predict(X), theirs.predict(X))
    if hasattr(theirs, "predict_proba"):
        pa, pb = ours.predict_proba(X), theirs.predict_proba(X)
        for x, y in zip(pa if isinstance(pa, list) else [pa], pb if isinstance(pb, list) else [pb]):
            np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(ours.apply(X), theirs.apply(X))
    (ia, pa), (ib, pb) = ours.decision_path(X), theirs.decision_path(X)
    np.testing.assert_array_equal(pa, pb)
    assert (ia != ib).nnz == 0
    np.testing.assert_array_equal(ours.feature_importances_, theirs.feature_importances_)
    for attr in ("oob_score_", "oob_decision_function_", "oob_prediction_", "classes_"):
        assert hasattr(ours, attr) == hasattr(theirs, attr), attr
        if hasattr(theirs, attr):
            np.testing.assert_array_equal(getattr(ours, attr), getattr(theirs, attr), err_msg=attr)
    if getattr(theirs, "bootstrap", False):
        for sa, sb in zip(ours.estimators_samples_, theirs.estimators_samples_):
            np.testing.assert_array_equal(sa, sb)


def assert_built_on_nodes(forest, cluster, n_trees):
    per_node = forest.fits_per_node_
    assert sum(per_node.values()) == n_trees, per_node
    assert set(forest.fit_processes_) == set(per_node)
    assert_ran_in_pool_processes(forest.fit_processes_, cluster)


@pytest.mark.parametrize(("ours", "theirs", "X", "y"), PAIRS, ids=IDS)
def test_each_forest_equals_scikit_learns(embedded_cluster, ours, theirs, X, y):
    params = dict(n_estimators=12, random_state=0, bootstrap=True, oob_score=True)
    forest = ours(cluster=embedded_cluster, **params).fit(X, y)
    assert_same_forest(forest, theirs(**params).fit(X, y), X)
    assert_built_on_nodes(forest, embedded_cluster, 12)
    # Each node built some: the trees went out in batches, not all to one.
    assert len(forest.fits_per_node_) == 2, forest.fits_per_node_


@pytest.mark.parametrize(("ours", "theirs", "X", "y"), PAIRS[2:], ids=IDS[2:])
def test_extra_trees_without_bootstrap(embedded_cluster, ours, theirs, X, y):
    forest = ours(10, random_state=3, cluster=embedded_cluster).fit(X, y)
    assert_same_forest(forest, theirs(10, random_state=3).fit(X, y), X)
    assert_built_on_nodes(forest, embedded_cluster, 10)


def test_random_forest_on_every_transport(cluster):
    forest = ClusterRandomForestClassifier(10, random_state=1, oob_score=True, cluster=cluster)
    forest.fit(Xc, yc)
    theirs = RandomForestClassifier(10, random_state=1, oob_score=True).fit(Xc, yc)
    assert_same_forest(forest, theirs, Xc)
    assert_built_on_nodes(forest, cluster, 10)


def test_explicit_n_jobs_one_still_builds_on_the_nodes(embedded_cluster):
    forest = ClusterRandomForestRegressor(8, n_jobs=1, random_state=0, cluster=embedded_cluster)
    forest.fit(Xr, yr)
    assert_same_forest(forest, RandomForestRegressor(8, n_jobs=1, random_state=0).fit(Xr, yr), Xr)
    assert_built_on_nodes(forest, embedded_cluster, 8)


def test_warm_start_adds_the_trees_scikit_learn_adds(embedded_cluster):
    ours = ClusterRandomForestClassifier(6, warm_start=True, random_state=0,
                                         cluster=embedded_cluster).fit(Xc, yc)  # fmt: skip
    first = list(ours.estimators_)
    theirs = RandomForestClassifier(6, warm_start=True, random_state=0).fit(Xc, yc)
    ours.set_params(n_estimators=14).fit(Xc, yc)
    theirs.set_params(n_estimators=14).fit(Xc, yc)
    assert ours.estimators_[:6] == first  # kept, not rebuilt
    assert_same_forest(ours, theirs, Xc)
    assert_built_on_nodes(ours, embedded_cluster, 8)  # the last fit's new trees
    # ... and the same as 14 trees at once.
    assert_same_forest(ours, RandomForestClassifier(14, random_state=0).fit(Xc, yc), Xc)
    with pytest.warns(UserWarning, match="without increasing n_estimators"):
        ours.fit(Xc, yc)
    assert ours.fits_per_node_ == {}


def test_sample_weight_balanced_subsample_max_samples(embedded_cluster):
    weight = np.random.RandomState(0).uniform(0.1, 3.0, len(yc))
    params = dict(n_estimators=10, random_state=5, class_weight="balanced_subsample",
                  max_samples=0.6, oob_score=True)  # fmt: skip
    ours = ClusterRandomForestClassifier(cluster=embedded_cluster, **params)
    ours.fit(Xc, yc, sample_weight=weight)
    theirs = RandomForestClassifier(**params).fit(Xc, yc, sample_weight=weight)
    assert_same_forest(ours, theirs, Xc)
    assert_built_on_nodes(ours, embedded_cluster, 10)


def test_class_weight_dict_and_balanced(embedded_cluster):
    for class_weight in ({0: 1.0, 1: 3.0, 2: 0.5}, "balanced"):
        params = dict(n_estimators=8, random_state=2, class_weight=class_weight, max_samples=100)
        ours = ClusterExtraTreesClassifier(bootstrap=True, cluster=embedded_cluster, **params)
        theirs = ExtraTreesClassifier(bootstrap=True, **params)
        assert_same_forest(ours.fit(Xc, yc), theirs.fit(Xc, yc), Xc)


def test_multi_output(embedded_cluster):
    # multilabel: the multi-output classification that has an OOB score
    Y = np.column_stack([yc == 0, Xc[:, 0] > 0]).astype(int)
    params = dict(n_estimators=8, random_state=0, oob_score=True)
    ours = ClusterRandomForestClassifier(cluster=embedded_cluster, **params).fit(Xc, Y)
    assert_same_forest(ours, RandomForestClassifier(**params).fit(Xc, Y), Xc)
    Yr = np.column_stack([yr, Xr[:, 1] * 2])
    ours = ClusterRandomForestRegressor(cluster=embedded_cluster, **params).fit(Xr, Yr)
    assert_same_forest(ours, RandomForestRegressor(**params).fit(Xr, Yr), Xr)
    assert_built_on_nodes(ours, embedded_cluster, 8)


def test_clone_params_pickle_pipeline(embedded_cluster):
    forest = ClusterRandomForestClassifier(8, max_depth=4, random_state=0, cluster=embedded_cluster)
    params = forest.get_params()
    assert params["cluster"] is embedded_cluster and params["max_depth"] == 4
    assert set(params) == set(RandomForestClassifier().get_params()) | {"cluster", "keep", "replicas"}
    copy = clone(forest)
    assert copy.get_params()["cluster"] is embedded_cluster  # shared, not copied
    pipe = make_pipeline(StandardScaler(), copy).fit(Xc, yc)
    fitted = pipe[-1]
    assert_built_on_nodes(fitted, embedded_cluster, 8)
    again = pickle.loads(pickle.dumps(pipe))
    np.testing.assert_array_equal(again.predict_proba(Xc), pipe.predict_proba(Xc))
    assert again[-1].fits_per_node_ == fitted.fits_per_node_
    theirs = make_pipeline(StandardScaler(), RandomForestClassifier(8, max_depth=4, random_state=0))
    np.testing.assert_array_equal(pipe.predict_proba(Xc), theirs.fit(Xc, yc).predict_proba(Xc))
    forest.set_params(cluster="amqp://nowhere.invalid//", n_estimators=3)
    assert forest.cluster == "amqp://nowhere.invalid//" and forest.n_estimators == 3


def test_invalid_cluster_is_the_searches_error():
    with pytest.raises(ValueError, match="'cluster' parameter") as ours:
        ClusterRandomForestClassifier(cluster=42).fit(Xc, yc)
    with pytest.raises(ValueError, match="'cluster' parameter") as search:
        ClusterGridSearchCV(RandomForestClassifier(), {}, cluster=42).fit(Xc, yc)
    assert type(ours.value) is type(search.value)


def test_unreachable_cluster_is_an_error_not_a_local_fit():
    cluster = Cluster("amqp://remote:hunter2@127.0.0.1:1//", connect_timeout=2)
    forest = ClusterRandomForestClassifier(5, cluster=cluster)
    with pytest.raises(BrokerUnreachableError):
        forest.fit(Xc, yc)
    assert not hasattr(forest, "estimators_")


def _score_checking_node_fit(estimator, X, y):
    """Accuracy; fails the fit's score unless the forest was fitted as plain
    scikit-learn in the node's process (no nested cluster session)."""
    forest = estimator
    if hasattr(forest, "fits_per_node_"):
        assert forest.fits_per_node_ == {} and forest.fit_processes_ == {}
    return float((forest.predict(X) == y).mean())


def test_forest_as_a_search_estimator(embedded_cluster):
    grid = {"max_depth": [3, None], "max_features": [2, 4]}
    forest = ClusterRandomForestClassifier(10, random_state=0, cluster=embedded_cluster)
    search = ClusterGridSearchCV(forest, grid, cv=3, cluster=embedded_cluster,
                                 scoring=_score_checking_node_fit, error_score="raise")  # fmt: skip
    search.fit(Xc, yc)
    theirs = GridSearchCV(RandomForestClassifier(10, random_state=0), grid, cv=3,
                          scoring=_score_checking_node_fit).fit(Xc, yc)  # fmt: skip
    assert_same_results(search, theirs)
    # Every (candidate, split) fit ran on a node, each forest in one task.
    assert_ran_on_workers(search, embedded_cluster, 12)
    # The refit, in the client, built its trees on the cluster.
    best = search.best_estimator_
    assert_built_on_nodes(best, embedded_cluster, 10)
    assert_same_forest(best, theirs.best_estimator_, Xc)


def test_large_results_come_back_compressed_over_a_network(cluster):
    from clustersearch.wire.serialization import COMPRESS_OVER, dumps, loads

    big = {"trees": np.zeros(COMPRESS_OVER)}
    packed = dumps(big, compress_over=COMPRESS_OVER)
    assert packed[:1] == b"Z" and len(packed) < COMPRESS_OVER
    np.testing.assert_array_equal(loads(packed)["trees"], big["trees"])
    assert dumps(big)[:1] == b"\x80"  # only results ask for compression
    # Fully grown trees on noisy labels: tens of kB each.
    X, y = make_classification(n_samples=6000, n_features=10, flip_y=0.3, random_state=0)
    forest = ClusterRandomForestClassifier(8, random_state=0, cluster=cluster).fit(X, y)
    assert_same_forest(forest, RandomForestClassifier(8, random_state=0).fit(X, y), X)
    sent = sum(forest.result_bytes_per_node_.values())
    pickled = len(dumps(forest.estimators_))
    if cluster.broker_url.startswith("filesystem"):
        # The embedded transport's results are files on this machine:
        # written and read as they are, not compressed.
        assert pickled < sent < pickled * 1.1, (sent, pickled)
    else:
        assert 0 < sent < pickled / 2, (sent, pickled)
