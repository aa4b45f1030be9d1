"""search.ensemble(): the best candidates of a fitted search, stacked or
voted, refitted on the nodes; keep_predictions reuses the search's own
out-of-fold predictions."""

import pickle

import numpy as np
import pytest
from conftest import assert_ran_in_pool_processes, assert_same_results
from sklearn.base import clone
from sklearn.datasets import make_classification, make_regression
from sklearn.ensemble import (
    StackingClassifier,
    StackingRegressor,
    VotingClassifier,
)
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import (
    GridSearchCV,
    KFold,
    ShuffleSplit,
    StratifiedKFold,
    cross_val_predict,
)
from sklearn.svm import SVC
from sklearn.tree import DecisionTreeClassifier

from clustersearch import (
    ClusterGridSearchCV,
    ClusterHalvingGridSearchCV,
    ClusterRandomizedSearchCV,
)

X, y = make_classification(n_samples=300, n_features=8, n_informative=4, random_state=0)
Xr, yr = make_regression(n_samples=300, n_features=6, noise=5.0, random_state=0)
TREE = DecisionTreeClassifier(random_state=0)
GRID = {"max_depth": [1, 2, 3, 4, 6], "min_samples_leaf": [1, 20]}
N_SPLITS = 3
CV = StratifiedKFold(N_SPLITS, shuffle=True, random_state=0)


def _search(cluster, keep, **kwargs):
    params = {"cv": CV, "keep_predictions": keep, "cluster": cluster, **kwargs}
    return ClusterGridSearchCV(TREE, GRID, **params).fit(X, y)


def _by_hand(search, k, **kwargs):
    """scikit-learn's StackingClassifier, built from the same candidates with
    the search's folds."""
    order = np.argsort(search.cv_results_["rank_test_score"], kind="stable")[:k]
    estimators = [
        (f"c{i}", clone(search.estimator).set_params(**search.cv_results_["params"][i]))
        for i in order
    ]
    splits = list(CV.split(X, y))
    return StackingClassifier(estimators, cv=splits, **kwargs).fit(X, y)


def _n_fits(per_node):
    return sum(per_node.values())


@pytest.fixture(scope="module")
def kept(embedded_cluster):
    return _search(embedded_cluster, keep=True)


@pytest.fixture(scope="module")
def plain(embedded_cluster):
    return _search(embedded_cluster, keep=False)


def test_keep_predictions_leaves_cv_results_as_scikit_learns(kept):
    assert_same_results(kept, GridSearchCV(TREE, GRID, cv=CV).fit(X, y))
    assert "oof_predictions_" not in kept.cv_results_
    for index, params in enumerate(kept.cv_results_["params"]):
        expected = cross_val_predict(clone(TREE).set_params(**params), X, y, cv=CV,
                                     method="predict_proba")  # fmt: skip
        np.testing.assert_array_equal(kept.oof_predictions_[index], expected)
        assert kept.oof_methods_[index] == "predict_proba"


@pytest.mark.parametrize("keep", [True, False], ids=["kept", "computed"])
def test_stacked_ensemble_equals_a_stacking_classifier_built_by_hand(
    kept, plain, embedded_cluster, keep
):
    search = kept if keep else plain
    k = 3
    ours = search.ensemble(k=k, method="stack")
    theirs = _by_hand(search, k)
    assert type(ours) is StackingClassifier  # plain scikit-learn
    np.testing.assert_array_equal(ours.predict(X), theirs.predict(X))
    np.testing.assert_allclose(ours.predict_proba(X), theirs.predict_proba(X), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(ours.transform(X), theirs.transform(X))
    # The refits (and, without kept predictions, the k x n_splits fits that
    # compute them) ran on the nodes.
    extra = 0 if keep else k * N_SPLITS
    assert _n_fits(search.ensemble_fits_per_node_) == k + extra
    assert_ran_in_pool_processes(search.ensemble_fit_processes_, embedded_cluster)
    # Usable without the cluster.
    again = pickle.loads(pickle.dumps(ours))
    np.testing.assert_array_equal(again.predict(X), ours.predict(X))


def test_the_final_estimator_and_the_best_candidates(kept):
    final = LogisticRegression(C=0.5)
    ours = kept.ensemble(k=2, final_estimator=final)
    theirs = _by_hand(kept, 2, final_estimator=final)
    np.testing.assert_allclose(ours.predict_proba(X), theirs.predict_proba(X), atol=1e-12)
    best = ours.estimators_[0]
    assert best.get_params() == clone(TREE).set_params(**kept.best_params_).get_params()


def test_voting_ensemble(plain, embedded_cluster):
    ours = plain.ensemble(k=3, method="vote")
    order = np.argsort(plain.cv_results_["rank_test_score"], kind="stable")[:3]
    estimators = [(f"c{i}", clone(TREE).set_params(**plain.cv_results_["params"][i]))
                  for i in order]  # fmt: skip
    theirs = VotingClassifier(estimators, voting="soft").fit(X, y)
    assert type(ours) is VotingClassifier
    np.testing.assert_array_equal(ours.predict_proba(X), theirs.predict_proba(X))
    assert _n_fits(plain.ensemble_fits_per_node_) == 3
    assert_ran_in_pool_processes(plain.ensemble_fit_processes_, embedded_cluster)


def test_regression_ensemble_from_a_randomized_search(embedded_cluster):
    cv = KFold(3, shuffle=True, random_state=2)
    search = ClusterRandomizedSearchCV(
        Ridge(), {"alpha": [0.01, 0.1, 1.0, 10.0, 100.0]}, n_iter=4, cv=cv, random_state=0,
        keep_predictions=True, cluster=embedded_cluster,
    ).fit(Xr, yr)  # fmt: skip
    ours = search.ensemble(k=2)
    order = np.argsort(search.cv_results_["rank_test_score"], kind="stable")[:2]
    estimators = [(f"c{i}", Ridge(**search.cv_results_["params"][i])) for i in order]
    theirs = StackingRegressor(estimators, cv=list(cv.split(Xr))).fit(Xr, yr)
    assert type(ours) is StackingRegressor
    np.testing.assert_allclose(ours.predict(Xr), theirs.predict(Xr), rtol=1e-10)
    assert _n_fits(search.ensemble_fits_per_node_) == 2


def test_halving_search_ensembles_its_last_round(embedded_cluster):
    search = ClusterHalvingGridSearchCV(
        TREE, {"max_depth": [1, 2, 3, 4, 6, 8]}, cv=KFold(3), factor=2, random_state=0,
        keep_predictions=True, cluster=embedded_cluster,
    ).fit(X, y)  # fmt: skip
    last = np.flatnonzero(search.cv_results_["iter"] == search.n_iterations_ - 1)
    model = search.ensemble(k=2)
    assert {name for name, _ in model.estimators} <= {f"candidate{i}" for i in last}
    assert model.estimators[0][0] == f"candidate{search.best_index_}"
    assert _n_fits(search.ensemble_fits_per_node_) == 2  # the kept last round


def test_a_pickled_search_ensembles_with_the_data_given_again(kept, embedded_cluster):
    # A pickled handle holds no secret: the unpickled search gets the cluster again.
    again = pickle.loads(pickle.dumps(kept)).set_params(cluster=embedded_cluster)
    with pytest.raises(ValueError, match=r"pass it again, ensemble\(..., X=X, y=y\)"):
        again.ensemble(k=2)
    ours = again.ensemble(k=2, X=X, y=y)
    np.testing.assert_allclose(ours.predict_proba(X), kept.ensemble(k=2).predict_proba(X))


def test_clear_errors(kept, embedded_cluster):
    n = len(kept.cv_results_["params"])
    with pytest.raises(ValueError, match=rf"k=11, but this search has {n} candidates.*k <= {n}"):
        kept.ensemble(k=n + 1)
    with pytest.raises(ValueError, match=r"k=0: ask for a positive number"):
        kept.ensemble(k=0)
    with pytest.raises(ValueError, match=r"method='blend' is not one of 'stack', 'vote'"):
        kept.ensemble(method="blend")
    with pytest.raises(ValueError, match=r"final_estimator is for method='stack'"):
        kept.ensemble(method="vote", final_estimator=LogisticRegression())
    unfitted = ClusterGridSearchCV(TREE, GRID, cluster=embedded_cluster)
    with pytest.raises(NotFittedError, match=r"call fit\(X, y\) before ensemble\(\)"):
        unfitted.ensemble()
    svc = ClusterGridSearchCV(SVC(), {"C": [1, 2]}, cv=2, cluster=embedded_cluster).fit(X, y)
    with pytest.raises(ValueError, match=r"has no predict_proba.*voting='hard'"):
        svc.ensemble(k=2, method="vote", voting="soft")
    assert type(svc.ensemble(k=2, method="vote", voting="hard")) is VotingClassifier
    multi = ClusterGridSearchCV(TREE, {"max_depth": [1, 2]}, cv=2, scoring=["accuracy", "f1"],
                                refit=lambda r: 0, cluster=embedded_cluster).fit(X, y)  # fmt: skip
    with pytest.raises(ValueError, match=r"set refit to one of \['accuracy', 'f1'\]"):
        multi.ensemble(k=1)
    shuffled = ClusterGridSearchCV(TREE, {"max_depth": [1, 2]}, cv=ShuffleSplit(2, random_state=0),
                                   cluster=embedded_cluster).fit(X, y)  # fmt: skip
    with pytest.raises(ValueError, match=r"exactly once in a test set"):
        shuffled.ensemble(k=2)


def test_keep_predictions_with_failing_fits_and_a_precomputed_kernel(embedded_cluster):
    # A candidate whose fits fail (error_score) keeps no predictions; a
    # pairwise estimator predicts its test fold as _fit_and_score splits it.
    K = X @ X.T
    grid = {"C": [1.0, -1.0], "kernel": ["precomputed"]}
    cv = KFold(3)
    with pytest.warns(UserWarning):
        ours = ClusterGridSearchCV(SVC(), grid, cv=cv, keep_predictions=True,
                                   cluster=embedded_cluster).fit(K, y)  # fmt: skip
    with pytest.warns(UserWarning):
        theirs = GridSearchCV(SVC(), grid, cv=cv).fit(K, y)
    assert_same_results(ours, theirs)
    assert sorted(ours.oof_predictions_) == [0] and ours.oof_methods_ == {0: "decision_function"}
    expected = cross_val_predict(SVC(kernel="precomputed"), K, y, cv=cv, method="decision_function")
    np.testing.assert_array_equal(ours.oof_predictions_[0], expected)
