"""search.report(): one HTML page, opened in a real headless browser."""

import os
import re
import shutil
import subprocess
import sys
import warnings

import joblib
import numpy as np
import pytest
from conftest import assert_ran_on_workers
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV

from clustersearch import ClusterGridSearchCV
from clustersearch.exceptions import MissingDependencyError
from clustersearch.report import write_report

X, y = make_classification(n_samples=150, n_features=6, random_state=0)
# C=-1 fails (3 fits); max_iter=2 warns ConvergenceWarning.
GRID = {"C": [-1.0, 0.1, 1.0], "max_iter": [2, 200], "fit_intercept": [True, False]}


def _browser():
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CLUSTERSEARCH_REQUIRE_BROKERS") == "1" or os.environ.get("CI"):
            pytest.fail("CI must have Debian's chromium (.ci/run installs it)")
        pytest.skip("no chromium here: apt-get install chromium")
    return found


@pytest.fixture(scope="module")
def fitted(embedded_cluster):
    search = ClusterGridSearchCV(LogisticRegression(), GRID, cv=3, cluster=embedded_cluster)
    # Recorded, not ignored: the client's filters apply in the fits too.
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        search.fit(X, y)
    assert_ran_on_workers(search, embedded_cluster, n_fits=36)
    return search


def _figures(page):
    return page.count("<figure>")


def test_the_page_holds_every_part(fitted, tmp_path):
    path = fitted.report(str(tmp_path / "report.html"))
    page = path.read_text()
    # 3 parameters: 3 pair heatmaps, 3 slices, fit time vs score, the timeline.
    assert _figures(page) == page.count("<svg") == 8
    # Nothing is fetched: no external script, style sheet, image or font.
    assert not re.search(r"""(src|href)=["'](https?:)?//""", page)
    assert "<link" not in page and "@import" not in page
    for heading in ("Scores for each pair of parameters", "One parameter at a time",
                    "Ranked candidates", "Where and when each fit ran", "Failures",
                    "Data and messages per node", "Warnings the fits raised"):  # fmt: skip
        assert f"<h2>{heading}</h2>" in page
    # The ranked table: its first row is the best candidate.
    best = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in fitted.best_params_.items())
    first = re.search(r"<tbody><tr><td>1</td><td>[^<]*</td><td>[^<]*</td><td>([^<]*)</td>", page)
    assert first and first.group(1) == best
    # The failures: the 3 fits of C=-1 (2 x 2 other settings: 12), with the reason.
    assert len(fitted.fit_failures_) == 12
    assert "12 fits on" in page or sum(
        int(n) for n in re.findall(r"<summary>(\d+) fits? on", page)
    ) == 12
    assert "InvalidParameterError" in page
    # The warnings, with their count.
    (warned,) = [w for w in fitted.fit_warnings_ if w["category"].endswith("ConvergenceWarning")]
    assert warned["count"] > 0 and warned["nodes"]
    assert "sklearn.exceptions.ConvergenceWarning" in page
    for node in fitted.fits_per_node_:
        assert f"<td>{node}</td>" in page


def test_a_real_browser_renders_every_figure(fitted, tmp_path):
    chromium = _browser()
    path = fitted.report(str(tmp_path / "report.html"))
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run(
        [*common, "--enable-logging=stderr", "--v=0", "--dump-dom", path.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body, dom.stderr[-2000:]
    # The page's check ran in the browser: every figure laid out with a size.
    assert 'data-figures="8"' in body.group(0) and 'data-rendered="8"' in body.group(0)
    console_errors = [line for line in dom.stderr.splitlines()
                      if "CONSOLE" in line and ("Error" in line or "Uncaught" in line)]  # fmt: skip
    assert not console_errors, console_errors
    shot = tmp_path / "report.png"
    subprocess.run(
        [*common, "--window-size=1200,3000", f"--screenshot={shot}", path.as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (3000, 1200)
    assert pixels.std() > 0.05, "the screenshot is blank"


def test_a_scikit_learn_search_and_the_command_line(tmp_path):
    search = GridSearchCV(LogisticRegression(max_iter=500), {"C": [0.1, 1.0]}, cv=3).fit(X, y)
    page = write_report(search, tmp_path / "plain.html").read_text()
    # No timeline without the cluster; the rest is there.
    assert "Where and when" not in page and "<h2>Ranked candidates</h2>" in page
    joblib.dump(search, tmp_path / "search.joblib")
    done = subprocess.run(
        [sys.executable, "-m", "clustersearch", "report", str(tmp_path / "search.joblib")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "search.html").read_text().count("<figure>") == 2
    joblib.dump(np.arange(3), tmp_path / "not_a_search.joblib")
    done = subprocess.run(
        [sys.executable, "-m", "clustersearch", "report", str(tmp_path / "not_a_search.joblib")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1 and "not a fitted search" in done.stderr


def test_without_matplotlib_the_error_says_what_to_install(fitted, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match=r"clustersearch\[report\]"):
        fitted.report(str(tmp_path / "r.html"))


def test_an_unfitted_search_is_refused(tmp_path):
    with pytest.raises(ValueError, match="call fit first"):
        write_report(ClusterGridSearchCV(LogisticRegression(), {"C": [1]}), tmp_path / "r.html")
