"""ClusterStackingClassifier / ClusterStackingRegressor: scikit-learn's
stacking, every fit of the base estimators on the nodes."""

import pickle

import numpy as np
import pytest
from conftest import assert_ran_on_workers
from sklearn.base import clone
from sklearn.datasets import make_classification, make_regression
from sklearn.ensemble import (
    RandomForestClassifier,
    StackingClassifier,
    StackingRegressor,
)
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import GridSearchCV, KFold, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

from clustersearch import (
    ClusterGridSearchCV,
    ClusterStackingClassifier,
    ClusterStackingRegressor,
)
from clustersearch.wire.context import in_node_task

X, y = make_classification(n_samples=300, n_features=8, n_informative=4, n_classes=3,
                           random_state=0)  # fmt: skip
Xr, yr = make_regression(n_samples=300, n_features=6, noise=5.0, random_state=0)


def _base():
    return [
        ("lr", make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))),
        ("tree", DecisionTreeClassifier(max_depth=4, random_state=0)),
    ]


def assert_same_stacking(ours, theirs, X):
    for method in ("predict", "predict_proba", "transform"):
        if hasattr(theirs, method):
            np.testing.assert_array_equal(getattr(ours, method)(X), getattr(theirs, method)(X),
                                          err_msg=method)  # fmt: skip
    assert ours.stack_method_ == theirs.stack_method_
    assert list(ours.named_estimators_) == list(theirs.named_estimators_)
    for a, b in zip(ours.estimators_, theirs.estimators_):
        assert type(a) is type(b)
        np.testing.assert_array_equal(a.predict(X), b.predict(X))
        if hasattr(b, "predict_proba"):
            np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))


def test_stacking_classifier_equals_scikit_learns_with_every_fit_on_the_nodes(cluster):
    # A shuffled splitter with a seed: every base estimator sees the same folds.
    cv = StratifiedKFold(3, shuffle=True, random_state=1)
    ours = ClusterStackingClassifier(_base(), cv=cv, cluster=cluster).fit(X, y)
    theirs = StackingClassifier(_base(), cv=cv).fit(X, y)
    assert_same_stacking(ours, theirs, X)
    # 2 final fits of the base estimators + 2 x 3 cross_val_predict fits, all
    # in the nodes' pool processes (n_jobs=None, joblib's "sequential" value).
    assert ours.n_jobs is None
    assert_ran_on_workers(ours, cluster, n_fits=2 + 2 * 3)


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_any_n_jobs_still_runs_on_the_cluster(embedded_cluster, n_jobs):
    ours = ClusterStackingClassifier(_base(), cv=3, n_jobs=n_jobs, cluster=embedded_cluster)
    ours.fit(X, y)
    assert_same_stacking(ours, StackingClassifier(_base(), cv=3).fit(X, y), X)
    assert_ran_on_workers(ours, embedded_cluster, n_fits=2 + 2 * 3)


def test_stacking_regressor_equals_scikit_learns(embedded_cluster):
    base = [("ridge", Ridge(alpha=2.0)), ("tree", DecisionTreeRegressor(max_depth=3, random_state=0))]
    cv = KFold(4, shuffle=True, random_state=3)
    ours = ClusterStackingRegressor(base, cv=cv, passthrough=True, cluster=embedded_cluster)
    ours.fit(Xr, yr)
    theirs = StackingRegressor(base, cv=cv, passthrough=True).fit(Xr, yr)
    assert_same_stacking(ours, theirs, Xr)
    assert_ran_on_workers(ours, embedded_cluster, n_fits=2 + 2 * 4)


def test_a_cluster_search_or_n_jobs_among_the_base_estimators_fits_inside_the_node(
    embedded_cluster,
):
    assert not in_node_task()  # the marker is off in the client
    grid = {"max_depth": [2, 4]}
    forest = RandomForestClassifier(n_estimators=5, n_jobs=-1, random_state=0)
    base = [
        ("search", ClusterGridSearchCV(DecisionTreeClassifier(random_state=0), grid, cv=2,
                                       cluster=embedded_cluster)),  # fmt: skip
        ("forest", forest),
    ]
    plain = [("search", GridSearchCV(DecisionTreeClassifier(random_state=0), grid, cv=2)),
             ("forest", forest)]  # fmt: skip
    ours = ClusterStackingClassifier(base, cv=3, cluster=embedded_cluster).fit(X, y)
    theirs = StackingClassifier(plain, cv=3).fit(X, y)
    np.testing.assert_array_equal(ours.predict_proba(X), theirs.predict_proba(X))
    # Only the stacking's own fits went out: the search's 2 x 2 fits ran
    # inside the node's process that fitted it, sending nothing.
    assert_ran_on_workers(ours, embedded_cluster, n_fits=2 + 2 * 3)
    inner = ours.named_estimators_["search"]
    assert inner.fits_per_node_ == {} and inner.best_params_ == theirs.estimators_[0].best_params_


def test_pipeline_clone_params_and_pickle(embedded_cluster):
    stack = ClusterStackingClassifier(_base(), cv=3, cluster=embedded_cluster)
    params = stack.get_params()
    assert params["cluster"] is embedded_cluster and params["stack_method"] == "auto"
    copy = clone(stack)
    assert copy.cluster is embedded_cluster
    copy.set_params(tree__max_depth=2, cv=2)
    assert copy.named_estimators["tree"].max_depth == 2
    model = make_pipeline(StandardScaler(), copy).fit(X, y)
    theirs = make_pipeline(
        StandardScaler(), StackingClassifier(_base(), cv=2).set_params(tree__max_depth=2)
    ).fit(X, y)
    np.testing.assert_array_equal(model.predict_proba(X), theirs.predict_proba(X))
    again = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(again.predict_proba(X), model.predict_proba(X))
    assert again[-1].fits_per_node_ == model[-1].fits_per_node_


def test_bad_parameters_fail_before_anything_is_sent(embedded_cluster, sessions):
    with pytest.raises(ValueError, match="cluster"):
        ClusterStackingClassifier(_base(), cluster=3.5).fit(X, y)
    with pytest.raises(ValueError, match="stack_method"):
        ClusterStackingClassifier(_base(), stack_method="vote", cluster=embedded_cluster).fit(X, y)
    assert sessions == []
