"""What a task message carries: what the node uses, not the search.

scikit-learn passes the search itself (``caller=self``) to every fit; sent
whole, every task carried the grid, the cv splitter and the cluster handle,
whose broker URL holds the broker's password.
"""

import pytest
from conftest import RABBITMQ, require_servers
from sklearn.datasets import load_iris
from sklearn.svm import SVC

from clustersearch import ClusterGridSearchCV, LocalCluster

pytestmark = pytest.mark.broker


def test_task_messages_carry_neither_the_search_nor_the_broker_url(monkeypatch):
    import clustersearch.client.session as session_module

    require_servers(RABBITMQ)
    payloads = []
    real = session_module.dumps_with_blobs

    def recording(func, table, drop=None):
        payload, refs = real(func, table, drop)
        payloads.append(payload)
        return payload, refs

    monkeypatch.setattr(session_module, "dumps_with_blobs", recording)
    X, y = load_iris(return_X_y=True)
    # A grid value no estimator parameter holds: it would travel only inside
    # the search's param_grid.
    grid = {"C": [1.0, 2.0], "gamma": ["scale", 0.123456789]}
    with LocalCluster(n_workers=1, broker_url=RABBITMQ, backend="rpc://", allow_root=True) as cluster:
        search = ClusterGridSearchCV(SVC(), grid, cv=2, cluster=cluster).fit(X, y)
    assert sum(search.fits_per_node_.values()) == 8
    assert payloads
    for payload in payloads:
        assert b"amqp://" not in payload  # the broker URL, with its password
        assert b"guest" not in payload
        assert b"clustersearch.client" not in payload  # the cluster handle
        assert b"clustersearch._search" not in payload  # the search (its class)
        assert b"param_grid" not in payload
