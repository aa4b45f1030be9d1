"""The result journal's resume after a SIGKILLed client (issue 12), on the
multi-host test cluster (Redis results).

As in ``test_journal.py`` (whose helpers these reuse), a real client process
(``_journal_client.py``) is SIGKILLed at about half of a search and run
again; each fit leaves a file from the node pool process that ran it, so the
tests count what the nodes really executed. On the multi-host cluster the
nodes run in network namespaces of their own (``netcluster.py``) but share
the filesystem, so the fits' files land in the test's ``tmp_path``.
"""

import os

import pytest
from conftest import RABBITMQ, REDIS, require_servers
from netcluster import NetCluster, why_unavailable
from test_journal import _kill_and_rerun

pytestmark = [pytest.mark.slow, pytest.mark.broker]

# Rerun figures per transport; printed with -s, quoted in docs/journal.md.
FIGURES = []


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """Three nodes in network namespaces, RabbitMQ broker, Redis results."""
    reason = why_unavailable()
    if reason:
        if os.environ.get("CLUSTERSEARCH_REQUIRE_BROKERS") == "1":
            pytest.fail(reason + " (CLUSTERSEARCH_REQUIRE_BROKERS=1)")
        pytest.skip(reason)
    require_servers(RABBITMQ, REDIS)
    net = NetCluster(tmp_path_factory.mktemp("netcluster"), n_hosts=3, n_nodes=3).start()
    try:
        with net.cluster() as cluster:  # the client's view, from the host
            cluster.secret = net.secret  # for the client processes
            yield cluster
    finally:
        net.close()


@pytest.mark.cluster
def test_a_killed_client_resumes_on_the_multi_host_cluster(net, tmp_path):
    """Redis results: the rerun runs at most what the journal lacked and none
    of the fits in flight at the death (it collects them from Redis);
    cv_results_ equal scikit-learn's GridSearchCV's (checked inside)."""
    # 36 fits on three single-process nodes; killed at half of them.
    twice, flying, report = _kill_and_rerun(net, tmp_path, kill_at=18, delay=0.4)
    assert flying, "nothing was in flight at the death: the test proves nothing"
    assert twice == 0, (twice, len(flying))
    FIGURES.append(f"multi-host, Redis results: in flight at the death {len(flying)}, "
                   f"run twice {twice}, ran by the rerun {sum(report['fits_per_node'].values())}, "
                   f"answered by the journal {report['from_journal']}")  # fmt: skip
    print(FIGURES[-1])
