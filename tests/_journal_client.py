"""A search run as a client process of its own, for tests/test_journal.py
(which SIGKILLs it mid-search and runs it again).

    python tests/_journal_client.py SPEC.json

SPEC: broker, backend, journal, log_dir, delay, kind ("grid", "halving",
"random"), grid, out (where cv_results_ go as JSON). The secret comes in
``CLUSTERSEARCH_SECRET``.
"""

import json
import os
import sys
import time
import uuid

import numpy as np
from sklearn.datasets import make_classification
from sklearn.tree import DecisionTreeClassifier


class LoggedTree(DecisionTreeClassifier):
    """A decision tree that leaves one file per fit in ``log_dir`` (what it
    fitted, on which rows, in which process), and takes ``delay`` seconds."""

    def __init__(self, max_depth=None, min_samples_leaf=1, random_state=None,
                 log_dir=None, delay=0.0):
        super().__init__(max_depth=max_depth, min_samples_leaf=min_samples_leaf,
                         random_state=random_state)
        self.log_dir = log_dir
        self.delay = delay

    def fit(self, X, y, sample_weight=None, check_input=True):
        if self.log_dir:
            rows = f"{len(X)}:{float(np.asarray(X)[:, 0].sum()):.10f}"
            what = f"{self.max_depth} {self.min_samples_leaf} {rows} {os.getpid()} {os.getppid()}"
            with open(os.path.join(self.log_dir, uuid.uuid4().hex), "w") as f:
                f.write(what)
        time.sleep(self.delay)
        return super().fit(X, y, sample_weight=sample_weight, check_input=check_input)


def data():
    return make_classification(n_samples=300, n_features=8, random_state=0)


def search(spec, cluster=None):
    """The search ``spec`` describes; ``cluster=None`` builds scikit-learn's."""
    from sklearn import model_selection as ms
    from sklearn.experimental import enable_halving_search_cv  # noqa: F401

    import clustersearch as cs

    est = LoggedTree(random_state=spec.get("seed", 0), log_dir=spec.get("log_dir"),
                     delay=spec.get("delay", 0.0))
    if cluster is None:
        est.set_params(log_dir=None, delay=0.0)
    local = cluster is None
    extra = {} if local else {"cluster": cluster, "journal": spec["journal"],
                              "journal_reuse": spec.get("reuse", "seeded")}
    kind, grid = spec["kind"], spec["grid"]
    if kind == "grid":
        cls = ms.GridSearchCV if local else cs.ClusterGridSearchCV
        return cls(est, grid, cv=3, **extra)
    if kind == "random":
        cls = ms.RandomizedSearchCV if local else cs.ClusterRandomizedSearchCV
        return cls(est, grid, n_iter=spec["n_iter"], random_state=1, cv=3, **extra)
    cls = ms.HalvingGridSearchCV if local else cs.ClusterHalvingGridSearchCV
    return cls(est, grid, cv=3, factor=3, min_resources=30, random_state=0, **extra)


def results(s):
    keep = [k for k in s.cv_results_ if "time" not in k]
    return {k: [str(v) for v in s.cv_results_[k]] for k in keep}


if __name__ == "__main__":
    spec = json.loads(open(sys.argv[1]).read())
    # The module's own LoggedTree (not __main__'s copy), as the tests build it.
    import _journal_client as me

    from clustersearch import Cluster

    X, y = me.data()
    # No straggler backups: a backup runs a fit a second time (counted once),
    # and the tests count every fit the nodes run to check the resume.
    with Cluster(spec["broker"], spec["backend"], progress=False,
                 straggler_factor=None) as cluster:  # fmt: skip
        s = me.search(spec, cluster).fit(X, y)
    with open(spec["out"], "w") as f:
        json.dump({"results": results(s), "fits_per_node": s.fits_per_node_,
                   "from_journal": s.fits_from_journal_,
                   "fit_time": [float(t) for t in s.cv_results_["mean_fit_time"]]}, f)
