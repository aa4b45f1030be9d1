"""Warnings raised inside fits on the nodes come home to the client."""

import re
import warnings

import numpy as np
import pytest
from conftest import assert_ran_on_workers
from sklearn.datasets import make_classification
from sklearn.exceptions import ConvergenceWarning, FitFailedWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV

from clustersearch import ClusterGridSearchCV
from clustersearch.client.session import Stats
from clustersearch.wire.protocol import warning_category

X, y = make_classification(n_samples=120, n_features=8, random_state=0)
GRID = {"C": [0.1, 1.0, 10.0]}


def _recorded(fit, *categories):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit()
    return [w for w in caught if issubclass(w.category, categories)]


def test_convergence_warnings_come_home_once_with_their_count(embedded_cluster):
    estimator = LogisticRegression(max_iter=1)
    local = _recorded(
        lambda: GridSearchCV(estimator, GRID, cv=3, refit=False).fit(X, y), ConvergenceWarning
    )
    search = ClusterGridSearchCV(estimator, GRID, cv=3, refit=False, cluster=embedded_cluster)
    ours = _recorded(lambda: search.fit(X, y), ConvergenceWarning)
    assert_ran_on_workers(search, embedded_cluster, n_fits=9)
    # One fit, one warning, in the local search; here one warning carries the count.
    assert len(local) == 9
    assert len(ours) == 1, [str(w.message) for w in ours]
    text = str(ours[0].message)
    assert text.startswith(str(local[0].message)), text
    match = re.search(r"raised (\d+) times in fits on nodes? (.+)\)$", text)
    assert match, text
    assert int(match.group(1)) == len(local)
    assert set(match.group(2).split(", ")) == set(search.fits_per_node_)


def test_no_warning_from_fits_that_raised_none(embedded_cluster):
    search = ClusterGridSearchCV(
        LogisticRegression(max_iter=1000), GRID, cv=3, cluster=embedded_cluster
    )
    assert _recorded(lambda: search.fit(X, y), Warning) == []


def test_the_clients_error_filter_applies_on_the_nodes(embedded_cluster):
    # -W error::ConvergenceWarning: in a local search each fit's warning is
    # an exception, the fit fails, and the search says all fits failed.
    estimator = LogisticRegression(max_iter=1)
    for search in (
        GridSearchCV(estimator, GRID, cv=3),
        ClusterGridSearchCV(estimator, GRID, cv=3, cluster=embedded_cluster),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            with pytest.raises(ValueError, match="All the 9 fits failed"):
                search.fit(X, y)


def test_fit_failed_warnings_as_a_local_search(embedded_cluster):
    grid = {"C": [1.0, -1.0]}  # C=-1 fails each of its 3 fits
    estimator = LogisticRegression()
    local = _recorded(lambda: GridSearchCV(estimator, grid, cv=3).fit(X, y), FitFailedWarning)
    search = ClusterGridSearchCV(estimator, grid, cv=3, cluster=embedded_cluster)
    ours = _recorded(lambda: search.fit(X, y), FitFailedWarning)
    assert len(ours) == len(local) == 1
    assert str(ours[0].message) == str(local[0].message)
    assert np.isnan(search.cv_results_["mean_test_score"][1])


def test_categories_travel_by_name():
    assert warning_category("sklearn.exceptions", "ConvergenceWarning") is ConvergenceWarning
    assert warning_category("builtins", "DeprecationWarning") is DeprecationWarning
    # Not a warning, or not here: the client falls back to UserWarning.
    assert warning_category("builtins", "ValueError") is None
    assert warning_category("no_such_module_here", "Warning") is None
    stats = Stats()
    stats.add_warnings("n1", [("m", "W", "text", 2)])
    stats.add_warnings("n2", [("m", "W", "text", 1)])
    stats.add_warnings("n3", "not a list of warnings")
    assert stats.warnings == {("m", "W", "text"): [3, {"n1", "n2"}]}


def test_an_ensembles_fits_bring_their_warnings_home(embedded_cluster):
    # search.ensemble() refits the best candidates on the nodes: what those
    # fits warn is raised in the client too, once, with its nodes.
    search = ClusterGridSearchCV(
        LogisticRegression(max_iter=1), {"C": [0.1, 1.0]}, cv=3, cluster=embedded_cluster
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        search.fit(X, y)
    ours = _recorded(lambda: search.ensemble(k=2, method="vote"), ConvergenceWarning)
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert re.search(r"raised 2 times in fits on nodes? ", str(ours[0].message))
