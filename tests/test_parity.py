"""Parity with scikit-learn: its own search tests, run through the cluster.

Each test ports a case of scikit-learn's
``sklearn/model_selection/tests/test_search.py`` or
``test_successive_halving.py`` (named in the comment above it): the same
search (data, estimator, grid or distributions, cv, random_state) runs through
scikit-learn in this process and through our class on the cluster's worker
processes, and both must give the same ``cv_results_`` (timings aside), the
same ``best_*`` attributes and the same predictions, with every
(candidate, split) fit on a worker.

The core cases use the transport-parametrized ``cluster`` fixture; the rest
use ``embedded_cluster`` to keep the suite fast.
"""

import difflib
import re
import warnings

import numpy as np
import pytest
from conftest import (
    assert_ran_in_pool_processes,
    assert_ran_on_workers,
    assert_same_results,
    session_processes,
)
from scipy.sparse import csr_matrix
from scipy.stats import expon, loguniform, randint, uniform
from sklearn import config_context
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.cluster import KMeans
from sklearn.datasets import load_iris, make_blobs, make_classification, make_regression
from sklearn.decomposition import PCA
from sklearn.dummy import DummyClassifier
from sklearn.ensemble import RandomForestClassifier
from sklearn.exceptions import FitFailedWarning
from sklearn.experimental import enable_halving_search_cv  # noqa: F401
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    make_scorer,
    recall_score,
)
from sklearn.model_selection import (
    GridSearchCV,
    GroupKFold,
    GroupShuffleSplit,
    HalvingGridSearchCV,
    HalvingRandomSearchCV,
    KFold,
    LeaveOneGroupOut,
    LeavePGroupsOut,
    RandomizedSearchCV,
    StratifiedKFold,
    StratifiedShuffleSplit,
)
from sklearn.model_selection.tests.common import OneTimeSplitter
from sklearn.naive_bayes import ComplementNB
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor
from sklearn.utils._mocking import CheckingClassifier

from clustersearch import (
    ClusterGridSearchCV,
    ClusterHalvingGridSearchCV,
    ClusterHalvingRandomSearchCV,
    ClusterRandomizedSearchCV,
)
from clustersearch.exceptions import RemoteTraceback

OURS = {
    GridSearchCV: ClusterGridSearchCV,
    RandomizedSearchCV: ClusterRandomizedSearchCV,
    HalvingGridSearchCV: ClusterHalvingGridSearchCV,
    HalvingRandomSearchCV: ClusterHalvingRandomSearchCV,
}

X_IRIS, Y_IRIS = load_iris(return_X_y=True)
X_CLF, Y_CLF = make_classification(
    n_samples=100, n_features=6, n_informative=3, random_state=0
)
X_BIN, Y_BIN = make_classification(n_samples=40, n_features=4, random_state=42)


# -- helpers ----------------------------------------------------------------------


def n_fits(search):
    """Fits a search ran: candidates x splits, all rounds together."""
    if hasattr(search, "n_candidates_"):  # successive halving
        return sum(search.n_candidates_) * search.n_splits_
    return len(search.cv_results_["params"]) * search.n_splits_


def both(SearchCV, *args, cluster, fit_args=(), fit_params=None, **kwargs):
    """Fit scikit-learn's ``SearchCV`` and ours on the same arguments; check parity.

    Returns ``(ours, theirs)``.
    """
    fit_params = fit_params or {}
    theirs = SearchCV(*args, **kwargs).fit(*fit_args, **fit_params)
    ours = OURS[SearchCV](*args, cluster=cluster, **kwargs).fit(*fit_args, **fit_params)
    assert_same_results(ours, theirs)
    for key, value in theirs.cv_results_.items():
        if not isinstance(value, np.ndarray):
            continue
        assert ours.cv_results_[key].dtype == value.dtype, key
        if isinstance(value, np.ma.MaskedArray):
            np.testing.assert_array_equal(
                np.ma.getmaskarray(ours.cv_results_[key]), np.ma.getmaskarray(value)
            )
    assert_ran_on_workers(ours, cluster, n_fits(theirs))
    return ours, theirs


def assert_session_ran_on_workers(sessions, cluster, n_fits):
    """A search that raised after its fits: they all ran on the nodes' pool processes."""
    (session,) = sessions
    assert sum(session.fits_per_node.values()) == n_fits, session.fits_per_node
    assert_ran_in_pool_processes(session_processes(session), cluster)


def assert_raised_on_a_node(error, cluster):
    """``error`` came from a fit on a node of ``cluster``, not from the client."""
    cause = error.__cause__
    assert isinstance(cause, RemoteTraceback), f"not raised on a node: {cause!r}"
    node = re.search(r"Raised on node '([^']+)'", str(cause))
    assert node and node.group(1) in {n.name for n in cluster.nodes()}, str(cause)[:300]


def assert_same_predictions(ours, theirs, X, methods):
    for method in methods:
        assert hasattr(ours, method) == hasattr(theirs, method), method
        if hasattr(theirs, method):
            np.testing.assert_array_equal(
                getattr(ours, method)(X), getattr(theirs, method)(X), err_msg=method
            )


# A traceback frame in this module's code. The nodes cannot import this test
# module, so its classes and functions travel by value, and cloudpickle names
# such code "<dynamic-code>" (no file, so no source line), as it does for
# scikit-learn's loky workers.
_OUR_FRAME = re.compile(
    r'  File "' + re.escape(__file__) + r'", line (\d+), in (\S+)\n'
    r"(?:    .*\n(?: *[~^]+ *\n)?)?"  # its source line, and carets under it
)


def as_sent(text):
    """``text`` with this module's traceback frames as the nodes show them."""
    return _OUR_FRAME.sub(r'  File "<dynamic-code>", line \1, in \2\n', text)


def sklearn_warnings(record):
    """The warnings scikit-learn's search gives in the client, as comparable text."""
    return [
        (w.category, as_sent(str(w.message)))
        for w in record
        if issubclass(w.category, (FitFailedWarning, UserWarning))
        and "sklearn" in w.filename
    ]


def assert_same_warnings(ours, theirs):
    """Same warnings, in the same order, with the same text (diffed on failure)."""
    if ours != theirs:
        diff = "\n".join(
            difflib.unified_diff(
                [f"{c.__name__}: {line}" for c, m in theirs for line in m.splitlines()],
                [f"{c.__name__}: {line}" for c, m in ours for line in m.splitlines()],
                "scikit-learn",
                "clustersearch",
                lineterm="",
            )
        )
        pytest.fail(f"the warnings differ from scikit-learn's:\n{diff}")


def fit_recording_warnings(search, *fit_args, **fit_params):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        search.fit(*fit_args, **fit_params)
    return sklearn_warnings(record)


# -- estimators and scorers the ported tests need --------------------------------------


class FailingClassifier(ClassifierMixin, BaseEstimator):
    """scikit-learn's test_search.FailingClassifier: fit raises for parameter=2."""

    FAILING_PARAMETER = 2

    def __init__(self, parameter=None):
        self.parameter = parameter

    def fit(self, X, y=None):
        if self.parameter == FailingClassifier.FAILING_PARAMETER:
            raise ValueError("Failing classifier failed as required")
        self.classes_ = np.unique(y)
        return self

    def predict(self, X):
        return np.zeros(X.shape[0])

    def score(self, X=None, Y=None):
        return 0.0


class SometimesFailClassifier(DummyClassifier):
    """test_successive_halving.SometimesFailClassifier (seeded for parity)."""

    def __init__(
        self,
        strategy="stratified",
        random_state=0,
        constant=None,
        n_estimators=10,
        fail_fit=False,
        fail_predict=False,
        a=0,
    ):
        self.fail_fit = fail_fit
        self.fail_predict = fail_predict
        self.n_estimators = n_estimators
        self.a = a
        super().__init__(
            strategy=strategy, random_state=random_state, constant=constant
        )

    def fit(self, X, y):
        if self.fail_fit:
            raise Exception("fitting failed")
        return super().fit(X, y)

    def predict(self, X):
        if self.fail_predict:
            raise Exception("predict failed")
        return super().predict(X)


class ScalarFitParamClassifier(ClassifierMixin, BaseEstimator):
    """test_search.test_scalar_fit_param's TestEstimator."""

    def __init__(self, a=None):
        self.a = a

    def fit(self, X, y, r=None):
        self.r_ = r
        self.classes_ = np.unique(y)
        return self

    def predict(self, X):
        return np.zeros(shape=(len(X)))


def confusion_scorer(clf, X, y):
    y_pred = clf.predict(X)
    cm = confusion_matrix(y, y_pred)
    return {"tn": cm[0, 0], "fp": cm[0, 1], "fn": cm[1, 0], "tp": cm[1, 1]}


def recall_accuracy_scorer(est, X, y):
    y_pred = est.predict(X)
    return {"recall": recall_score(y, y_pred), "accuracy": accuracy_score(y, y_pred)}


def constant_acc_scorer(est, X, y):
    return {"acc": 1}


def nan_for_depth_3(estimator, X, y):
    """Deterministic non-finite scores: NaN for max_depth=3, else accuracy."""
    if estimator.max_depth == 3:
        return np.nan
    return accuracy_score(y, estimator.predict(X))


def lowest_mean_prec(cv_results):
    return int(cv_results["mean_test_prec"].argmin())


def lowest_mean_test_score(cv_results):
    return int(cv_results["mean_test_score"].argmin())


# == the core cases, on every transport ===============================================


# Ports test_search.py::test_grid_search (and test_grid_search_cv_results,
# test_search_cv_timing): an exhaustive grid over SVC on iris.
def test_grid_search(cluster):
    grid = {"C": [0.1, 1, 10], "kernel": ["linear", "rbf"]}
    ours, theirs = both(
        GridSearchCV, SVC(), grid, cv=3, cluster=cluster, fit_args=(X_IRIS, Y_IRIS)
    )
    for key in ("mean_fit_time", "std_fit_time", "mean_score_time", "std_score_time"):
        assert np.all(ours.cv_results_[key] >= 0), key
    assert isinstance(ours.refit_time_, float) and ours.refit_time_ >= 0
    assert_same_predictions(ours, theirs, X_IRIS, ["predict", "decision_function"])
    assert ours.score(X_IRIS, Y_IRIS) == theirs.score(X_IRIS, Y_IRIS)


# Ports test_search.py::test_random_search_cv_results: scipy distributions,
# sampled with random_state.
def test_randomized_search(cluster):
    distributions = {"C": expon(scale=10), "gamma": loguniform(1e-3, 1e1)}
    ours, theirs = both(
        RandomizedSearchCV,
        SVC(),
        distributions,
        n_iter=6,
        cv=3,
        random_state=0,
        return_train_score=True,
        cluster=cluster,
        fit_args=(X_IRIS, Y_IRIS),
    )
    assert len(ours.cv_results_["params"]) == 6
    assert_same_predictions(ours, theirs, X_IRIS, ["predict"])


# Ports test_search.py::test_grid_search_pipeline_steps and
# test_search_with_estimators_issue_29157: step__param names and a grid over
# estimators (which must be cloned, not fitted in place).
def test_pipeline_grid_over_estimators(cluster):
    pipe = Pipeline([("scale", StandardScaler()), ("clf", SVC())])
    grid = [
        {"clf": [SVC()], "clf__C": [0.1, 1, 10]},
        {"clf": [LogisticRegression(max_iter=1000)], "clf__C": [0.1, 1]},
        {
            "scale": ["passthrough"],
            "clf": [KNeighborsClassifier()],
            "clf__n_neighbors": [3, 7],
        },
    ]
    ours, theirs = both(
        GridSearchCV, pipe, grid, cv=3, cluster=cluster, fit_args=(X_CLF, Y_CLF)
    )
    for sub in grid:
        assert not hasattr(sub["clf"][0], "classes_")  # the grid is left unfitted
    assert ours.best_estimator_ is not ours.cv_results_["param_clf"][ours.best_index_]
    assert type(ours.best_estimator_[-1]) is type(theirs.best_estimator_[-1])
    assert_same_predictions(ours, theirs, X_CLF, ["predict"])


# Ports test_search.py::test_grid_search_cv_results_multimetric and
# test_random_search_cv_results_multimetric: a dict of scorers, refit=<name>.
def test_multimetric_dict_refit_name(cluster):
    scoring = {
        "accuracy": make_scorer(accuracy_score),
        "f1": make_scorer(f1_score, average="macro"),
        "recall": "recall_macro",
    }
    ours, theirs = both(
        GridSearchCV,
        SVC(),
        [
            {"kernel": ["rbf"], "C": [1, 10], "gamma": [0.1, 1]},
            {"kernel": ["poly"], "degree": [1, 2]},
        ],
        scoring=scoring,
        refit="f1",
        cv=3,
        return_train_score=True,
        cluster=cluster,
        fit_args=(X_IRIS, Y_IRIS),
    )
    assert ours.multimetric_
    assert ours.score(X_IRIS, Y_IRIS) == theirs.score(X_IRIS, Y_IRIS)


# Ports test_search.py::test_grid_search_failing_classifier: error_score=nan
# with an estimator that fails on some parameters; the FitFailedWarning (with
# the failures' tracebacks) and the non-finite-score warning are the same.
def test_error_score_nan(cluster):
    X, y = make_classification(n_samples=20, n_features=10, random_state=0)
    kwargs = dict(scoring="accuracy", refit=False, error_score=np.nan)
    grid = [{"parameter": [0, 1, 2]}]
    theirs = GridSearchCV(FailingClassifier(), grid, **kwargs)
    ours = ClusterGridSearchCV(FailingClassifier(), grid, cluster=cluster, **kwargs)
    their_warnings = fit_recording_warnings(theirs, X, y)
    our_warnings = fit_recording_warnings(ours, X, y)

    pattern = re.compile(
        "5 fits failed.+total of 15.+The score on these"
        r" train-test partitions for these parameters will be set to nan.+"
        "5 fits failed with the following error.+ValueError.+Failing classifier "
        "failed as required",
        flags=re.DOTALL,
    )
    assert any(c is FitFailedWarning and pattern.search(m) for c, m in their_warnings)
    assert_same_warnings(our_warnings, their_warnings)
    assert_same_results(ours, theirs)
    assert_ran_on_workers(ours, cluster, 15)
    assert ours.cv_results_["rank_test_score"][FailingClassifier.FAILING_PARAMETER] == 3
    assert np.all(np.isnan(ours.cv_results_["split0_test_score"][2]))


# Ports test_successive_halving.py::test_cv_results and test_min_max_resources
# (resource='n_samples') for HalvingGridSearchCV, and test_resource_parameter /
# test_random_search for HalvingRandomSearchCV (a parameter resource).
@pytest.mark.parametrize("SearchCV", [HalvingGridSearchCV, HalvingRandomSearchCV])
def test_halving(cluster, SearchCV):
    X, y = make_classification(n_samples=200, n_features=6, random_state=0)
    if SearchCV is HalvingGridSearchCV:
        args = (SVC(), {"C": [0.1, 1, 10], "gamma": [0.01, 0.1, 1]})
        kwargs = dict(resource="n_samples", factor=3, cv=3, random_state=0)
    else:
        args = (
            RandomForestClassifier(random_state=0),
            {"max_depth": randint(1, 6), "min_samples_leaf": randint(1, 5)},
        )
        kwargs = dict(
            n_candidates=9,
            resource="n_estimators",
            min_resources=2,
            max_resources=18,
            factor=3,
            cv=3,
            random_state=0,
        )
    ours, theirs = both(SearchCV, *args, cluster=cluster, fit_args=(X, y), **kwargs)
    for attr in (
        "n_resources_",
        "n_candidates_",
        "n_iterations_",
        "n_remaining_candidates_",
        "n_required_iterations_",
        "n_possible_iterations_",
        "min_resources_",
        "max_resources_",
    ):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert ours.n_iterations_ > 1
    assert_same_predictions(ours, theirs, X, ["predict"])


# == the rest, on the embedded transport ===========================================


# Ports test_search.py::test_random_search_cv_results_multimetric (a list of
# scorers, refit=False and refit=<name>) and test_no_refit.
@pytest.mark.parametrize("refit", [False, "accuracy"])
def test_multimetric_list(embedded_cluster, refit):
    ours, theirs = both(
        RandomizedSearchCV,
        LogisticRegression(random_state=42),
        {"C": np.logspace(-4, 1, 3)},
        n_iter=3,
        scoring=["accuracy", "recall"],
        refit=refit,
        cv=3,
        random_state=0,
        cluster=embedded_cluster,
        fit_args=(X_BIN, Y_BIN),
    )
    assert hasattr(ours, "best_estimator_") == bool(refit)
    if not refit:
        for name in ("predict", "predict_proba", "transform"):
            with pytest.raises(AttributeError, match=f"has no attribute '{name}'"):
                getattr(ours, name)(X_BIN)


# Ports test_search.py::test_refit_callable and test_refit_callable_multi_metric.
@pytest.mark.parametrize(
    "scoring, refit",
    [
        ("precision", lowest_mean_test_score),
        (
            {"Accuracy": make_scorer(accuracy_score), "prec": "precision"},
            lowest_mean_prec,
        ),
    ],
    ids=["single", "multi"],
)
def test_refit_callable(embedded_cluster, scoring, refit):
    X, y = make_classification(n_samples=100, n_features=4, random_state=42)
    ours, theirs = both(
        GridSearchCV,
        LinearSVC(random_state=42),
        {"C": [0.01, 0.1, 1]},
        scoring=scoring,
        refit=refit,
        cluster=embedded_cluster,
        fit_args=(X, y),
    )
    assert ours.best_index_ == 0
    assert not hasattr(ours, "best_score_")
    assert_same_predictions(ours, theirs, X, ["predict"])


# Ports test_search.py::test_callable_multimetric_confusion_matrix and
# test_callable_multimetric_same_as_list_of_strings: a callable scorer that
# returns a dict.
@pytest.mark.parametrize(
    "scoring, refit",
    [(confusion_scorer, "fp"), (recall_accuracy_scorer, "recall")],
    ids=["confusion-matrix", "recall-accuracy"],
)
def test_callable_scorer_returning_dict(embedded_cluster, scoring, refit):
    ours, theirs = both(
        GridSearchCV,
        LinearSVC(random_state=42),
        {"C": [0.1, 1]},
        scoring=scoring,
        refit=refit,
        cluster=embedded_cluster,
        fit_args=(X_BIN, Y_BIN),
    )
    assert ours.score(X_BIN, Y_BIN) == theirs.score(X_BIN, Y_BIN)
    if scoring is recall_accuracy_scorer:
        as_strings = GridSearchCV(
            LinearSVC(random_state=42),
            {"C": [0.1, 1]},
            scoring=["recall", "accuracy"],
            refit="recall",
        ).fit(X_BIN, Y_BIN)
        assert ours.best_index_ == as_strings.best_index_
        assert ours.best_score_ == pytest.approx(as_strings.best_score_)


# Ports test_search.py::test_callable_multimetric_error_failing_clf.
def test_callable_scorer_with_failing_classifier(embedded_cluster):
    X, y = make_classification(n_samples=20, n_features=10, random_state=0)
    kwargs = dict(scoring=constant_acc_scorer, refit=False, error_score=0.1)
    grid = [{"parameter": [0, 1, 2]}]
    theirs = GridSearchCV(FailingClassifier(), grid, **kwargs)
    ours = ClusterGridSearchCV(
        FailingClassifier(), grid, cluster=embedded_cluster, **kwargs
    )
    their_warnings = fit_recording_warnings(theirs, X, y)
    our_warnings = fit_recording_warnings(ours, X, y)
    assert [c for c, _ in their_warnings] == [FitFailedWarning]
    assert_same_warnings(our_warnings, their_warnings)
    assert_same_results(ours, theirs)
    np.testing.assert_allclose(ours.cv_results_["mean_test_acc"], [1, 1, 0.1])
    assert_ran_on_workers(ours, embedded_cluster, 15)


# Ports test_search.py::test_grid_search_failing_classifier_raise: with
# error_score='raise' the fit's own exception reaches the caller.
def test_error_score_raise(embedded_cluster, sessions):
    X, y = make_classification(n_samples=20, n_features=10, random_state=0)
    kwargs = dict(scoring="accuracy", refit=False, error_score="raise")
    grid = [{"parameter": [0, 1, 2]}]
    with pytest.raises(
        ValueError, match="Failing classifier failed as required"
    ) as theirs:
        GridSearchCV(FailingClassifier(), grid, **kwargs).fit(X, y)
    with pytest.raises(
        ValueError, match="Failing classifier failed as required"
    ) as ours:
        ClusterGridSearchCV(
            FailingClassifier(), grid, cluster=embedded_cluster, **kwargs
        ).fit(X, y)
    assert type(ours.value) is type(theirs.value)
    assert str(ours.value) == str(theirs.value)
    assert_raised_on_a_node(ours.value, embedded_cluster)
    # The fits that ended before the failure, if any, ran on the nodes too.
    (session,) = sessions
    if session.fits_per_node:
        assert_ran_in_pool_processes(session_processes(session), embedded_cluster)


# Ports test_search.py::test_grid_search_classifier_all_fits_fail and
# test_callable_multimetric_clf_all_fits_fail.
@pytest.mark.parametrize(
    "scoring", [None, constant_acc_scorer], ids=["default", "callable"]
)
def test_all_fits_fail(embedded_cluster, sessions, scoring):
    X, y = make_classification(n_samples=20, n_features=10, random_state=0)
    grid = [{"parameter": [FailingClassifier.FAILING_PARAMETER] * 3}]
    kwargs = dict(scoring=scoring, refit=False, error_score=0.0)
    pattern = re.compile(
        "All the 15 fits failed.+15 fits failed with the following error.+"
        "ValueError.+Failing classifier failed as required",
        flags=re.DOTALL,
    )
    with pytest.raises(ValueError, match=pattern) as theirs:
        GridSearchCV(FailingClassifier(), grid, **kwargs).fit(X, y)
    with pytest.raises(ValueError, match=pattern) as ours:
        ClusterGridSearchCV(
            FailingClassifier(), grid, cluster=embedded_cluster, **kwargs
        ).fit(X, y)
    assert str(ours.value) == as_sent(str(theirs.value))
    assert_session_ran_on_workers(sessions, embedded_cluster, 15)


# Ports test_search.py::test_searchcv_raise_warning_with_non_finite_score (with
# a stateless scorer: each fit runs in its own process, so a scorer that counts
# its calls, as the original's does, counts per process).
@pytest.mark.parametrize("return_train_score", [False, True])
@pytest.mark.parametrize("SearchCV", [GridSearchCV, RandomizedSearchCV])
def test_non_finite_score_warning(embedded_cluster, SearchCV, return_train_score):
    X, y = make_classification(n_classes=2, n_samples=100, random_state=0)
    grid = {"max_depth": [2, 3, 5, 8]}
    kwargs = dict(scoring=nan_for_depth_3, cv=3, return_train_score=return_train_score)
    if SearchCV is RandomizedSearchCV:
        kwargs.update(n_iter=4, random_state=0)
    theirs = SearchCV(DecisionTreeClassifier(random_state=0), grid, **kwargs)
    ours = OURS[SearchCV](
        DecisionTreeClassifier(random_state=0), grid, cluster=embedded_cluster, **kwargs
    )
    their_warnings = fit_recording_warnings(theirs, X, y)
    our_warnings = fit_recording_warnings(ours, X, y)
    datasets = ["test", "train"] if return_train_score else ["test"]
    assert len(their_warnings) == len(datasets)
    for (_, message), dataset in zip(their_warnings, datasets, strict=True):
        assert f"One or more of the {dataset} scores are non-finite" in message
    assert_same_warnings(our_warnings, their_warnings)
    assert_same_results(ours, theirs)
    assert_ran_on_workers(ours, embedded_cluster, 12)


# Ports test_search.py::test_search_cv_results_rank_tie_breaking and
# test_search_train_scores_set_to_false: return_train_score=True.
@pytest.mark.parametrize("SearchCV", [GridSearchCV, RandomizedSearchCV])
def test_return_train_score(embedded_cluster, SearchCV):
    X, y = make_blobs(n_samples=50, random_state=42)
    grid = {"C": [1, 1.001, 0.001]}
    kwargs = dict(return_train_score=True)
    if SearchCV is RandomizedSearchCV:
        kwargs.update(n_iter=3, random_state=0)
    ours, _ = both(
        SearchCV, SVC(), grid, cluster=embedded_cluster, fit_args=(X, y), **kwargs
    )
    assert "mean_train_score" in ours.cv_results_
    np.testing.assert_array_equal(ours.cv_results_["rank_test_score"], [1, 1, 3])


# Ports test_search.py::test_grid_search_groups and
# test_successive_halving.py::test_groups_support: groups reach the splitter.
@pytest.mark.parametrize(
    "cv",
    [
        GroupKFold(n_splits=3),
        LeaveOneGroupOut(),
        LeavePGroupsOut(2),
        GroupShuffleSplit(n_splits=3, random_state=0),
    ],
    ids=lambda cv: type(cv).__name__,
)
@pytest.mark.parametrize("SearchCV", [GridSearchCV, HalvingGridSearchCV])
def test_groups(embedded_cluster, SearchCV, cv):
    rng = np.random.RandomState(0)
    X, y = make_classification(n_samples=60, n_classes=2, random_state=0)
    groups = rng.randint(0, 4, 60)
    grid = {"C": [0.1, 1, 10]}
    kwargs = dict(cv=cv)
    if SearchCV is HalvingGridSearchCV:
        kwargs.update(random_state=0, min_resources=20)
    with pytest.raises(ValueError, match="The 'groups' parameter should not be None"):
        OURS[SearchCV](
            LinearSVC(random_state=0), grid, cluster=embedded_cluster, **kwargs
        ).fit(X, y)
    both(
        SearchCV,
        LinearSVC(random_state=0),
        grid,
        cluster=embedded_cluster,
        fit_args=(X, y),
        fit_params={"groups": groups},
        **kwargs,
    )


# Ports test_search.py::test_SearchCV_with_fit_params: fit params are sliced per
# split, and a failing check (error_score='raise') raises the same error.
@pytest.mark.parametrize("SearchCV", [GridSearchCV, RandomizedSearchCV])
def test_fit_params_sliced(embedded_cluster, SearchCV):
    X = np.arange(100).reshape(10, 10)
    y = np.array([0] * 5 + [1] * 5)
    kwargs = dict(cv=2, error_score="raise")
    if SearchCV is RandomizedSearchCV:
        kwargs.update(n_iter=3, random_state=0)
    ours = OURS[SearchCV](
        CheckingClassifier(expected_fit_params=["spam", "eggs"]),
        {"foo_param": [1, 2, 3]},
        cluster=embedded_cluster,
        **kwargs,
    )
    with pytest.raises(
        AssertionError, match=r"Expected fit parameter\(s\) \['eggs'\] not seen."
    ):
        ours.fit(X, y, spam=np.ones(10))
    with pytest.raises(
        AssertionError, match="Fit parameter spam has length 1; expected"
    ):
        ours.fit(X, y, spam=np.ones(1), eggs=np.zeros(10))
    both(
        SearchCV,
        CheckingClassifier(expected_fit_params=["spam", "eggs"]),
        {"foo_param": [1, 2, 3]},
        cluster=embedded_cluster,
        fit_args=(X, y),
        fit_params={"spam": np.ones(10), "eggs": np.zeros(10)},
        **kwargs,
    )


# Ports test_search.py::test_search_cv_sample_weight_equivalence: sample_weight
# as a fit param (routed to the estimator's fit, without metadata routing).
@pytest.mark.parametrize("SearchCV", [GridSearchCV, HalvingGridSearchCV])
def test_sample_weight_fit_param(embedded_cluster, SearchCV):
    X, y = make_classification(n_samples=120, n_features=5, random_state=0)
    weights = np.random.RandomState(0).randint(0, 4, size=len(y)).astype(float)
    kwargs = dict(cv=3)
    if SearchCV is HalvingGridSearchCV:
        kwargs.update(random_state=0)
    ours, theirs = both(
        SearchCV,
        LogisticRegression(),
        {"C": [0.01, 0.1, 1, 10]},
        cluster=embedded_cluster,
        fit_args=(X, y),
        fit_params={"sample_weight": weights},
        **kwargs,
    )
    assert_same_predictions(ours, theirs, X, ["predict", "predict_proba"])
    # and the weights did change the results
    unweighted = SearchCV(
        LogisticRegression(), {"C": [0.01, 0.1, 1, 10]}, **kwargs
    ).fit(X, y)
    assert not np.array_equal(
        unweighted.cv_results_["mean_test_score"], theirs.cv_results_["mean_test_score"]
    )


# Ports test_search.py::test_multi_metric_search_forwards_metadata: with metadata
# routing enabled, sample_weight reaches the estimator's fit and every scorer.
@pytest.mark.parametrize("SearchCV", [GridSearchCV, RandomizedSearchCV])
def test_metadata_routing(embedded_cluster, SearchCV):
    X, y = make_classification(n_samples=120, n_features=5, random_state=0)
    weights = np.random.RandomState(0).randint(0, 4, size=len(y)).astype(float)
    kwargs = dict(cv=3, refit="acc")
    if SearchCV is RandomizedSearchCV:
        kwargs.update(n_iter=4, random_state=0)
    with config_context(enable_metadata_routing=True):
        scoring = {
            "acc": make_scorer(accuracy_score).set_score_request(sample_weight=True),
            "f1": make_scorer(f1_score).set_score_request(sample_weight=True),
            "unweighted": make_scorer(recall_score).set_score_request(
                sample_weight=False
            ),
        }
        estimator = LogisticRegression().set_fit_request(sample_weight=True)
        ours, theirs = both(
            SearchCV,
            estimator,
            {"C": [0.01, 0.1, 1, 10]},
            scoring=scoring,
            cluster=embedded_cluster,
            fit_args=(X, y),
            fit_params={"sample_weight": weights},
            **kwargs,
        )
        unweighted = SearchCV(
            LogisticRegression(),
            {"C": [0.01, 0.1, 1, 10]},
            scoring=["accuracy"],
            **{**kwargs, "refit": "accuracy"},
        ).fit(X, y)
    assert not np.array_equal(
        unweighted.cv_results_["mean_test_accuracy"], ours.cv_results_["mean_test_acc"]
    )


# Ports test_search.py::test_scalar_fit_param: a scalar fit param travels as is.
@pytest.mark.parametrize(
    "SearchCV, params",
    [(GridSearchCV, {"a": [0.1, 0.01]}), (RandomizedSearchCV, {"a": uniform(1, 3)})],
)
def test_scalar_fit_param(embedded_cluster, SearchCV, params):
    X, y = make_classification(n_samples=60, random_state=42)
    kwargs = {"n_iter": 3, "random_state": 0} if SearchCV is RandomizedSearchCV else {}
    ours, _ = both(
        SearchCV,
        ScalarFitParamClassifier(),
        params,
        cluster=embedded_cluster,
        fit_args=(X, y),
        fit_params={"r": 42},
        **kwargs,
    )
    assert ours.best_estimator_.r_ == 42


# Covers the n_jobs / pre_dispatch parameters that scikit-learn's tests pass
# (test_search.py::test_search_with_2d_array uses n_jobs=2,
# test_random_search_bad_cv n_jobs=4): whatever they say, every fit runs on the
# workers and the results are scikit-learn's.
@pytest.mark.parametrize(
    "n_jobs, pre_dispatch",
    [(1, "2*n_jobs"), (-1, "2*n_jobs"), (2, "n_jobs"), (-1, "all"), (2, 3)],
)
def test_n_jobs_and_pre_dispatch(embedded_cluster, n_jobs, pre_dispatch):
    ours, _ = both(
        GridSearchCV,
        SVC(),
        {"C": [0.1, 1, 10], "kernel": ["linear", "rbf"]},
        cv=3,
        n_jobs=n_jobs,
        pre_dispatch=pre_dispatch,
        cluster=embedded_cluster,
        fit_args=(X_IRIS, Y_IRIS),
    )
    assert len(ours.fits_per_node_) >= 1


class BrokenKFold(KFold):
    """test_search.py::test_random_search_bad_cv's splitter."""

    def get_n_splits(self, *args, **kw):
        return 1


# Ports test_search.py::test_random_search_bad_cv (n_jobs=4): splits that
# disagree with get_n_splits raise scikit-learn's ValueError.
def test_bad_cv(embedded_cluster, sessions):
    X, y = X_CLF, Y_CLF
    kwargs = dict(cv=BrokenKFold(n_splits=3), n_jobs=4)
    match = "cv.split and cv.get_n_splits return inconsistent results. Expected \\d+ splits, got \\d+"
    with pytest.raises(ValueError, match=match) as theirs:
        RandomizedSearchCV(Ridge(), {"alpha": [1e-3, 1e-2, 1e-1]}, **kwargs).fit(X, y)
    with pytest.raises(ValueError, match=match) as ours:
        ClusterRandomizedSearchCV(
            Ridge(), {"alpha": [1e-3, 1e-2, 1e-1]}, cluster=embedded_cluster, **kwargs
        ).fit(X, y)
    assert str(ours.value) == str(theirs.value)
    # scikit-learn compares the splits before any fit: nothing reached a node.
    (session,) = sessions
    assert not session.fits_per_node and not session.tasks_per_node


# Ports test_search.py::test_empty_cv_iterator_error (n_jobs=4): an exhausted
# cv iterator raises scikit-learn's ValueError.
def test_empty_cv_iterator(embedded_cluster, sessions):
    X, y = X_CLF, Y_CLF
    match = "No fits were performed. Was the CV iterator empty\\? Were there no candidates\\?"
    for SearchCV, extra in (
        (RandomizedSearchCV, {}),
        (ClusterRandomizedSearchCV, {"cluster": embedded_cluster}),
    ):
        cv = KFold(n_splits=3).split(X)
        [u for u in cv]  # exhaust it
        with pytest.raises(ValueError, match=match):
            SearchCV(
                Ridge(), {"alpha": [1e-3, 1e-2, 1e-1]}, cv=cv, n_jobs=4, **extra
            ).fit(X, y)
    # No split, so no fit: nothing reached a node.
    (session,) = sessions
    assert not session.fits_per_node and not session.tasks_per_node


# Ports test_search.py::test_search_with_2d_array: text (a list of strings)
# through a TfidfVectorizer pipeline, tuple-valued parameters, n_jobs=2.
def test_text_pipeline(embedded_cluster):
    grid = {"vect__ngram_range": ((1, 1), (1, 2)), "vect__norm": ("l1", "l2")}
    pipeline = Pipeline([("vect", TfidfVectorizer()), ("clf", ComplementNB())])
    data = ["one", "two", "three", "four", "five"]
    target = [0, 0, 1, 0, 1]
    ours, theirs = both(
        RandomizedSearchCV,
        pipeline,
        grid,
        n_iter=3,
        random_state=0,
        n_jobs=2,
        cv=3,
        cluster=embedded_cluster,
        fit_args=(data, target),
    )
    expected = np.empty(3, dtype=object)
    expected[:] = [(1, 2), (1, 2), (1, 1)]
    np.testing.assert_array_equal(
        ours.cv_results_["param_vect__ngram_range"].data, expected
    )
    np.testing.assert_array_equal(ours.predict(data), theirs.predict(data))




def _cv_list():
    return [(train, test) for train, test in KFold(n_splits=4).split(X_CLF)]


# Ports test_search.py::test_grid_search_cv_splits_consistency: cv as an int, a
# splitter, a one-time splitter, a generator and an explicit list of
# (train, test) index tuples.
@pytest.mark.parametrize(
    "make_cv",
    [
        lambda: 4,
        lambda: KFold(n_splits=3, shuffle=True, random_state=0),
        lambda: StratifiedKFold(n_splits=3),
        lambda: StratifiedShuffleSplit(n_splits=3, test_size=0.3, random_state=0),
        lambda: OneTimeSplitter(n_splits=4, n_samples=len(Y_CLF)),
        lambda: KFold(n_splits=3, shuffle=True, random_state=0).split(X_CLF, Y_CLF),
        _cv_list,
    ],
    ids=[
        "int",
        "KFold",
        "StratifiedKFold",
        "StratifiedShuffleSplit",
        "OneTimeSplitter",
        "generator",
        "list-of-tuples",
    ],
)
def test_cv_forms(embedded_cluster, make_cv):
    grid = {"C": [0.1, 0.2, 0.3]}
    theirs = GridSearchCV(
        LinearSVC(random_state=0), grid, cv=make_cv(), return_train_score=True
    ).fit(X_CLF, Y_CLF)
    ours = ClusterGridSearchCV(
        LinearSVC(random_state=0),
        grid,
        cv=make_cv(),
        return_train_score=True,
        cluster=embedded_cluster,
    ).fit(X_CLF, Y_CLF)
    assert_same_results(ours, theirs)
    assert_ran_on_workers(ours, embedded_cluster, n_fits(theirs))


# Ports test_search.py::test_grid_search_correct_score_results (regressor side)
# and test_grid_search_with_multioutput_data: regressors with
# scoring='neg_mean_squared_error'; no classes_.
@pytest.mark.parametrize(
    "estimator, grid, n_targets",
    [
        (Ridge(), {"alpha": [0.01, 0.1, 1, 10]}, 1),
        (DecisionTreeRegressor(random_state=0), {"max_depth": [1, 3, 5]}, 3),
    ],
    ids=["Ridge", "multioutput-tree"],
)
def test_regressor_neg_mse(embedded_cluster, estimator, grid, n_targets):
    X, y = make_regression(
        n_samples=100, n_features=5, n_targets=n_targets, noise=10, random_state=0
    )
    ours, theirs = both(
        GridSearchCV,
        estimator,
        grid,
        scoring="neg_mean_squared_error",
        cv=KFold(n_splits=3, shuffle=True, random_state=0),
        cluster=embedded_cluster,
        fit_args=(X, y),
    )
    assert not hasattr(ours, "classes_")
    assert ours.best_score_ < 0
    assert_same_predictions(ours, theirs, X, ["predict"])
    assert ours.score(X, y) == theirs.score(X, y)


# Ports test_search.py::test_classes__property, test_grid_search_score_method
# and test_search_cv_score_samples_method: delegation to best_estimator_.
def test_classifier_delegation(embedded_cluster):
    ours, theirs = both(
        GridSearchCV,
        LogisticRegression(max_iter=1000),
        {"C": [0.01, 0.1, 1]},
        cv=3,
        cluster=embedded_cluster,
        fit_args=(X_IRIS, Y_IRIS),
    )
    np.testing.assert_array_equal(ours.classes_, theirs.best_estimator_.classes_)
    assert ours.n_features_in_ == theirs.n_features_in_
    assert_same_predictions(
        ours,
        theirs,
        X_IRIS,
        ["predict", "predict_proba", "predict_log_proba", "decision_function"],
    )
    assert ours.score(X_IRIS, Y_IRIS) == theirs.score(X_IRIS, Y_IRIS)


# Ports test_search.py::test_transform_inverse_transform_round_trip and
# test_search_cv_score_samples_method: an unsupervised transformer, scored by
# its own score method.
def test_transformer_delegation(embedded_cluster):
    ours, theirs = both(
        GridSearchCV,
        PCA(),
        {"n_components": [1, 2, 3]},
        cv=3,
        cluster=embedded_cluster,
        fit_args=(X_IRIS,),
    )
    assert not hasattr(ours, "classes_")
    assert_same_predictions(ours, theirs, X_IRIS, ["transform", "score_samples"])
    np.testing.assert_array_equal(
        ours.inverse_transform(ours.transform(X_IRIS)),
        theirs.inverse_transform(theirs.transform(X_IRIS)),
    )
    assert ours.score(X_IRIS) == theirs.score(X_IRIS)


# Ports test_search.py::test_unsupervised_grid_search: KMeans with and without y.
@pytest.mark.parametrize(
    "scoring, refit, with_y",
    [
        (["adjusted_rand_score", "fowlkes_mallows_score"], "adjusted_rand_score", True),
        ("fowlkes_mallows_score", True, True),
        (None, True, False),
    ],
    ids=["multimetric", "single", "no-y"],
)
def test_unsupervised(embedded_cluster, scoring, refit, with_y):
    # KMeans reduces over OpenMP threads; nodes cap each fit to its share of
    # the cores (1 thread here), so the reference runs with the same cap.
    # Against an uncapped run, inertia differs in the last bit (1.8e-15).
    from threadpoolctl import threadpool_limits

    X, y = make_blobs(n_samples=50, random_state=0)
    with threadpool_limits(limits=1):
        ours, theirs = both(
            GridSearchCV,
            KMeans(random_state=0, init="random", n_init=1),
            {"n_clusters": [2, 3, 4]},
            scoring=scoring,
            refit=refit,
            cluster=embedded_cluster,
            fit_args=(X, y) if with_y else (X,),
        )
    assert_same_predictions(ours, theirs, X, ["predict", "transform"])


# Ports test_search.py::test_grid_search_sparse: CSR input travels to the nodes.
def test_sparse_input(embedded_cluster):
    X, y = make_classification(n_samples=200, n_features=20, random_state=0)
    X_sparse = csr_matrix(X)
    ours, theirs = both(
        GridSearchCV,
        LinearSVC(random_state=0),
        {"C": [0.1, 1.0]},
        cluster=embedded_cluster,
        fit_args=(X_sparse[:180], y[:180]),
    )
    assert_same_predictions(ours, theirs, X_sparse[180:], ["predict"])


# Ports test_search.py::test_grid_search_precomputed_kernel: pairwise slicing.
def test_precomputed_kernel(embedded_cluster):
    X, y = make_classification(n_samples=100, n_features=5, random_state=0)
    K = X @ X.T
    ours, theirs = both(
        GridSearchCV,
        SVC(kernel="precomputed"),
        {"C": [0.1, 1.0]},
        cv=3,
        cluster=embedded_cluster,
        fit_args=(K, y),
    )
    assert_same_predictions(ours, theirs, K[:10], ["predict"])


# Ports test_search.py::test_pandas_input: DataFrame / Series reach the fits.
def test_pandas_input(embedded_cluster):
    pd = pytest.importorskip("pandas")
    X = np.arange(100).reshape(10, 10)
    y = np.array([0] * 5 + [1] * 5)
    X_df, y_ser = pd.DataFrame(X), pd.Series(y)
    clf = CheckingClassifier(
        check_X=lambda x: isinstance(x, pd.DataFrame),
        check_y=lambda x: isinstance(x, pd.Series),
        random_state=0,  # its predict is random
    )
    ours, theirs = both(
        GridSearchCV,
        clf,
        {"foo_param": [1, 2, 3]},
        error_score="raise",
        cluster=embedded_cluster,
        fit_args=(X_df, y_ser),
    )
    assert ours.score(X_df, y_ser) == theirs.score(X_df, y_ser)
    np.testing.assert_array_equal(ours.predict(X_df), theirs.predict(X_df))


# Ports test_search.py::test_search_cv_results_none_param: None among values.
def test_none_param(embedded_cluster):
    X, y = [[1], [2], [3], [4], [5]], [0, 0, 0, 0, 1]
    ours, _ = both(
        GridSearchCV,
        DecisionTreeRegressor(),
        {"random_state": [0, None]},
        cv=KFold(),
        cluster=embedded_cluster,
        fit_args=(X, y),
    )
    np.testing.assert_array_equal(ours.cv_results_["param_random_state"], [0, None])


# Ports test_search.py::test_search_cv_verbose_3: verbose=3 reports each fit's
# score, as scikit-learn does.
@pytest.mark.parametrize("return_train_score", [False, True])
def test_verbose_3(embedded_cluster, capsys, return_train_score):
    X, y = make_classification(n_samples=100, n_classes=2, flip_y=0.2, random_state=0)
    kwargs = dict(
        scoring="accuracy", verbose=3, cv=3, return_train_score=return_train_score
    )
    if return_train_score:
        pattern = r"score=\(train=[\d\.]+, test=[\d.]+\)"
    else:
        pattern = r"score=[\d\.]+"
    GridSearchCV(LinearSVC(random_state=0), {"C": [0.1]}, **kwargs).fit(X, y)
    theirs = re.findall(pattern, capsys.readouterr().out)
    search = ClusterGridSearchCV(
        LinearSVC(random_state=0), {"C": [0.1]}, cluster=embedded_cluster, **kwargs
    ).fit(X, y)
    ours = re.findall(pattern, capsys.readouterr().out)
    assert len(theirs) == 3
    assert sorted(ours) == sorted(theirs)
    assert_ran_on_workers(search, embedded_cluster, 3)


# -- successive halving ------------------------------------------------------------


# Ports test_successive_halving.py::test_aggressive_elimination (with a real,
# seeded estimator and a parameter resource).
@pytest.mark.parametrize("aggressive_elimination", [True, False])
@pytest.mark.parametrize("SearchCV", [HalvingGridSearchCV, HalvingRandomSearchCV])
def test_halving_aggressive_elimination(
    embedded_cluster, SearchCV, aggressive_elimination
):
    X, y = make_classification(n_samples=150, n_features=6, random_state=0)
    if SearchCV is HalvingGridSearchCV:
        params = {"max_depth": [1, 2, 3, 4], "min_samples_leaf": [1, 2, 5]}
        extra = {}
    else:
        params = {"max_depth": randint(1, 6), "min_samples_leaf": randint(1, 6)}
        extra = {"n_candidates": 12}
    ours, theirs = both(
        SearchCV,
        RandomForestClassifier(random_state=0),
        params,
        resource="n_estimators",
        max_resources=9,
        min_resources=3,
        factor=3,
        aggressive_elimination=aggressive_elimination,
        cv=3,
        random_state=0,
        cluster=embedded_cluster,
        fit_args=(X, y),
        **extra,
    )
    for attr in (
        "n_resources_",
        "n_candidates_",
        "n_iterations_",
        "n_required_iterations_",
        "n_possible_iterations_",
        "n_remaining_candidates_",
    ):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert ours.n_candidates_[0] == 12
    if aggressive_elimination:
        assert ours.n_iterations_ == ours.n_required_iterations_ == 3
    for r_i, params_i in zip(
        ours.cv_results_["n_resources"], ours.cv_results_["params"], strict=True
    ):
        assert r_i == params_i["n_estimators"]


# Ports test_successive_halving.py::test_nan_handling: failed fits and
# failed predictions rank last.
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.FitFailedWarning")
@pytest.mark.filterwarnings("ignore:Scoring failed:UserWarning")
@pytest.mark.filterwarnings("ignore:One or more of the:UserWarning")
@pytest.mark.parametrize("fail_at", ["fit", "predict"])
@pytest.mark.parametrize("SearchCV", [HalvingGridSearchCV, HalvingRandomSearchCV])
def test_halving_nan_handling(embedded_cluster, SearchCV, fail_at):
    X, y = make_classification(n_samples=200, random_state=0)
    ours, _ = both(
        SearchCV,
        SometimesFailClassifier(),
        {f"fail_{fail_at}": [False, True], "a": range(3)},
        resource="n_estimators",
        max_resources=6,
        min_resources=1,
        factor=2,
        random_state=0,
        cluster=embedded_cluster,
        fit_args=(X, y),
    )
    assert not ours.best_params_[f"fail_{fail_at}"]
    scores = ours.cv_results_["mean_test_score"]
    ranks = ours.cv_results_["rank_test_score"]
    assert np.isnan(scores).any()
    nan_ranks = np.unique(ranks[np.isnan(scores)])
    assert nan_ranks.shape[0] == 1 and (nan_ranks[0] >= ranks).all()


# Ports test_successive_halving.py::test_halving_random_search_list_of_dicts and
# test_random_search (n_candidates, resource='n_samples').
def test_halving_random_list_of_dicts(embedded_cluster):
    X, y = make_classification(n_samples=150, n_features=4, random_state=42)
    params = [
        {"kernel": ["rbf"], "C": expon(scale=10), "gamma": expon(scale=0.1)},
        {"kernel": ["poly"], "degree": [2, 3]},
    ]
    ours, theirs = both(
        HalvingRandomSearchCV,
        SVC(),
        params,
        n_candidates=8,
        factor=2,
        cv=3,
        random_state=0,
        cluster=embedded_cluster,
        fit_args=(X, y),
    )
    assert ours.n_candidates_ == theirs.n_candidates_
    assert ours.n_candidates_[0] == 8
    assert_same_predictions(ours, theirs, X, ["predict"])
