"""examples/quickstart.ipynb, executed by a real Jupyter kernel."""

import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the test group installs nbformat")
nbclient = pytest.importorskip("nbclient", reason="the test group installs nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


def _outputs(cell):
    texts, htmls = [], []
    for out in cell.outputs:
        if out.get("text"):
            texts.append(out["text"])
        data = out.get("data", {})
        if "text/plain" in data:
            texts.append(data["text/plain"])
        if "text/html" in data:
            htmls.append(data["text/html"])
    return "\n".join(texts), "\n".join(htmls)


def test_the_quickstart_runs_in_a_kernel(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell, if one fails
    code = [c for c in nb.cells if c.cell_type == "code"]
    outputs = [_outputs(c) for c in code]
    everything = "\n".join(t for t, _ in outputs)
    html = "\n".join(h for _, h in outputs)
    # The cluster's table: its two nodes answered.
    assert "2 nodes, 2 worker processes" in html
    # The live bar was drawn as HTML in the cell, and ended at every fit.
    bars = re.findall(r'<progress value="(\d+)" max="(\d+)"', html)
    assert bars, "no progress bar in the notebook's output"
    assert bars[-1][0] == bars[-1][1] == "24", bars
    # The fitted search shows scikit-learn's diagram and where its fits ran.
    assert "sk-estimator" in html or "sk-top-container" in html
    assert "24 fits on 2 nodes" in html
    # The search ran on the nodes, and scored as it should on Adult.
    best = float(re.search(r"best CV accuracy: (\d\.\d+)", everything).group(1))
    test = float(re.search(r"test accuracy:\s+(\d\.\d+)", everything).group(1))
    assert 0.83 < best < 0.87 and 0.83 < test < 0.87, everything
    per_node = re.search(r"fits per node:\s+(\{.*\})", everything).group(1)
    assert sum(int(n) for n in re.findall(r": (\d+)", per_node)) == 24
    # The report was written beside the notebook.
    report = tmp_path / "quickstart_report.html"
    assert report.stat().st_size > 20_000
    assert report.read_text().count("<figure>") >= 4
