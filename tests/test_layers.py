"""The package's layers, checked in fresh interpreters.

The node (what ``celery -A clustersearch.worker`` and ``clustersearch
worker`` load) imports the wire and the node, never the client or the
estimators; importing ``clustersearch`` and its public names loads neither
Celery's prefork pool nor the node.
"""

import json
import subprocess
import sys
import textwrap

import pytest


def _modules_after(code):
    script = textwrap.dedent(code) + textwrap.dedent(
        """
        import json, sys
        print(json.dumps(sorted(sys.modules)))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


def _ours(modules, prefix):
    return sorted(m for m in modules if m == prefix or m.startswith(prefix + "."))


@pytest.mark.parametrize(
    "code",
    [
        "import clustersearch.worker; clustersearch.worker.__getattr__",
        "from clustersearch.node.app import create_node_app\n"
        "create_node_app('filesystem:///tmp/cs-layer-test')",
        "from clustersearch.cli import main",
    ],
    ids=["worker-module", "node-app", "cli"],
)
def test_the_node_loads_no_client_module(code):
    modules = _modules_after(code)
    assert _ours(modules, "clustersearch.client") == []
    assert "clustersearch._search" not in modules


def test_the_node_app_is_what_a_node_loads():
    # The positive control: the same check sees the node's modules.
    modules = _modules_after(
        "from clustersearch.node.app import create_node_app\n"
        "create_node_app('filesystem:///tmp/cs-layer-test')"
    )
    assert "clustersearch.node.task" in modules
    assert "clustersearch.wire.protocol" in modules
    assert "clustersearch.node.pool" in modules
    assert "celery.concurrency.prefork" in modules


@pytest.mark.parametrize(
    "code",
    [
        "import clustersearch",
        "from clustersearch import ClusterGridSearchCV, ClusterRandomizedSearchCV, "
        "ClusterHalvingGridSearchCV, ClusterHalvingRandomSearchCV, Cluster, "
        "LocalCluster, NodeInfo, Policy, ClusterStackingClassifier, ClusterStackingRegressor",
    ],
    ids=["package", "public-names"],
)
def test_the_client_loads_neither_the_node_nor_the_prefork_pool(code):
    modules = _modules_after(code)
    assert _ours(modules, "clustersearch.node") == []
    assert "clustersearch.worker" not in modules
    assert "celery.concurrency.prefork" not in modules
    assert "celery.concurrency.asynpool" not in modules
    assert "celery.worker" not in modules


def test_the_public_names_load_the_client():
    # The positive control for the test above.
    modules = _modules_after("from clustersearch import ClusterGridSearchCV, LocalCluster")
    assert "clustersearch.client.session" in modules
    assert "clustersearch._search" in modules


def test_client_and_node_never_import_each_other():
    """Read the sources: no module of one layer names the other."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1] / "clustersearch"
    for layer, other in (("client", "node"), ("node", "client"), ("wire", "client"),
                         ("wire", "node")):  # fmt: skip
        for path in (root / layer).glob("*.py"):
            text = path.read_text()
            found = re.findall(rf"from \.\.{other}\b|import clustersearch\.{other}\b|"
                               rf"from clustersearch\.{other}\b", text)  # fmt: skip
            assert not found, f"{path.name} ({layer}) imports the {other} layer: {found}"
