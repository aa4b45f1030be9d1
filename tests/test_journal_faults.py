"""The result journal's resume after a SIGKILLed client (issue 12), on the
multi-host test cluster (Redis results) and with ``rpc://`` results.

As in ``test_journal.py`` (whose helpers these reuse), a real client process
(``_journal_client.py``) is SIGKILLed at about half of a search and run
again; each fit leaves a file from the node pool process that ran it, so the
tests count what the nodes really executed. On the multi-host cluster the
nodes run in network namespaces of their own (``netcluster.py``) but share
the filesystem, so the fits' files land in the test's ``tmp_path``.
"""

import os
import time

import pytest
from conftest import RABBITMQ, REDIS, require_servers, skip_broker_test
from kombu import Connection
from netcluster import NetCluster, why_unavailable
from test_journal import _executions, _kill_and_rerun

from clustersearch import LocalCluster
from clustersearch.wire.protocol import queue_for

pytestmark = [pytest.mark.slow, pytest.mark.broker]

# Rerun figures per transport; printed with -s, quoted in docs/journal.md.
FIGURES = []


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """Three nodes in network namespaces, RabbitMQ broker, Redis results."""
    reason = why_unavailable()
    if reason:
        skip_broker_test(reason)
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


@pytest.fixture(scope="module")
def rpc_cluster():
    require_servers(RABBITMQ)
    with LocalCluster(n_workers=2, broker_url=RABBITMQ, backend="rpc://",
                      allow_root=True) as cluster:  # fmt: skip
        yield cluster


def _settled_executions(cluster, log_dir, quiet_s=3.0):
    """The nodes' executions once the dead client's batches are all done.

    Its batches still waiting in the nodes' queues on RabbitMQ run after its
    death: wait until those queues are empty (a node holds at most one
    unstarted batch more per process, acknowledged when it starts) and then
    until no fit has started for ``quiet_s`` seconds."""
    queues = [queue_for(n.name) for n in cluster.nodes(timeout=5)]
    deadline = time.monotonic() + 180
    with Connection(cluster.broker_url) as conn:
        channel = conn.default_channel
        while any(channel.queue_declare(q, passive=True).message_count for q in queues):
            assert time.monotonic() < deadline, "the dead client's batches never ran"
            time.sleep(0.1)
    seen, since = None, time.monotonic()
    while True:
        now = len(os.listdir(log_dir))
        if now != seen:
            seen, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return _executions(log_dir)[0]
        assert time.monotonic() < deadline, "the nodes never went quiet"
        time.sleep(0.1)


def _timeline(log, first):
    """(seconds after the rerun began, the fit's file) of every fit."""
    files = sorted(log.iterdir(), key=lambda f: f.stat().st_mtime)
    return [(round(f.stat().st_mtime - first["rerun"], 2), f.read_text()) for f in files]


def test_a_killed_client_resumes_rpc_results(rpc_cluster, tmp_path):
    """rpc:// results went with the dead client's reply queue (the journal
    notes no batch in flight there: none could be collected). In flight at
    the death: the fits the dead client's batches ran, or still run, without
    a recorded result. At most those run again; nothing recorded runs again;
    the results are scikit-learn's (checked inside)."""
    first = {}

    def settle(spec, recorded):
        first["runs"] = _settled_executions(rpc_cluster, spec["log_dir"])
        first["recorded"] = len(recorded)
        first["rerun"] = time.time()

    twice, noted, report = _kill_and_rerun(rpc_cluster, tmp_path, kill_at=18, delay=0.3,
                                           after_kill=settle)  # fmt: skip
    assert not noted  # nothing to collect on rpc://: nothing noted
    # Each recorded fit ran once, before the death; the rest the dead
    # client's batches ran are the fits in flight at the death.
    assert sum(first["runs"].values()) == len(first["runs"])
    flying = len(first["runs"]) - first["recorded"]
    assert flying >= 0
    ran_by_rerun = sum(report["fits_per_node"].values())
    assert report["from_journal"] == first["recorded"]
    assert ran_by_rerun == 36 - first["recorded"]
    if twice > flying:
        print(*_timeline(tmp_path / "log", first), sep="\n")
    assert twice <= flying, (twice, flying)
    FIGURES.append(f"rpc://: recorded at the death {first['recorded']}, in flight at the death "
                   f"{flying}, run twice {twice}, ran by the rerun {ran_by_rerun}")  # fmt: skip
    print(FIGURES[-1])
