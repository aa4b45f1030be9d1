"""Make docs/_static/report.png: a small search's report in headless chromium.

    python docs/report_screenshot.py   (needs matplotlib and Debian's chromium)
"""

import shutil
import subprocess
import tempfile
from pathlib import Path

from sklearn.datasets import make_classification
from sklearn.ensemble import RandomForestClassifier

from clustersearch import ClusterGridSearchCV, LocalCluster

GRID = {"max_depth": [2, 4, 8, None], "max_features": [1, 3, 6], "min_samples_leaf": [1, 5]}


def main() -> None:
    X, y = make_classification(n_samples=400, n_features=10, random_state=0)
    out = Path(__file__).parent / "_static" / "report.png"
    with tempfile.TemporaryDirectory() as tmp, LocalCluster(n_workers=2) as cluster:
        search = ClusterGridSearchCV(
            RandomForestClassifier(n_estimators=10, random_state=0), GRID, cv=3,
            cluster=cluster,
        )
        search.fit(X, y)
        page = search.report(Path(tmp, "report.html"))
        chromium = shutil.which("chromium") or shutil.which("chromium-browser") or "chromium"
        subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--screenshot={out}", "--window-size=1200,2400", Path(page).as_uri()],
            check=True, capture_output=True, timeout=120,
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
