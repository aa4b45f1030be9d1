"""An attacker with broker access and no secret, against a signed cluster.

While a real search runs on a signed ``LocalCluster`` (RabbitMQ and Redis),
a second app that knows the broker's URL but not the secret tries Celery's
remote control (``cancel_consumer``, ``shutdown``, a ``revoke`` that kills
the running fits) and the data plane (junk chunks on a node's reply queue,
a blob request that names a reply queue of its own). Each search must end
with scikit-learn's results, every fit counted once, and every node still
serving; with ``--allow-remote-control`` the node that stops consuming is
lost and reported, and the search ends on the other node.
"""

import contextlib
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import RABBITMQ, REDIS, assert_same_results, require_servers
from kombu import Queue
from sklearn.datasets import make_classification
from sklearn.model_selection import GridSearchCV
from sklearn.tree import DecisionTreeClassifier

from clustersearch import ClusterGridSearchCV, LocalCluster
from clustersearch.client.blobs import BlobServer
from clustersearch.wire.blobs import CHUNK_BYTES, RAW
from clustersearch.wire.config import create_app
from clustersearch.wire.protocol import queue_for

pytestmark = pytest.mark.broker

REDIS15 = REDIS + "/15"
TRANSPORTS = {"rabbitmq": (RABBITMQ, "rpc://"), "redis": (REDIS15, REDIS15)}
POLICY = {"heartbeat_interval": 0.5, "missed_heartbeats": 2, "no_node_timeout": 20.0}
GRID = {"max_depth": [1, 2, 3, 4, 5, 6], "min_samples_leaf": [1, 5]}
N_FITS = 12 * 3
FIT_S = 0.25
# A hang guard only: a search here takes a few seconds.
HANG_S = 90


class _SlowTree(DecisionTreeClassifier):
    """A tree whose fit takes FIT_S longer: the attacks land while fits run."""

    def fit(self, X, y, **kwargs):
        time.sleep(FIT_S)
        return super().fit(X, y, **kwargs)


def _data(seed, n_features=10):
    # Fresh data per test: the nodes fetch it during the search.
    return make_classification(n_samples=600, n_features=n_features, random_state=seed)


def _reference(X, y):
    return GridSearchCV(DecisionTreeClassifier(random_state=0), GRID, cv=3).fit(X, y)


def _start(transport, **env):
    broker, backend = TRANSPORTS[transport]
    require_servers(broker, backend)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return LocalCluster(n_workers=2, broker_url=broker, backend=backend, allow_root=True,
                            **POLICY)  # fmt: skip
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module", params=list(TRANSPORTS))
def signed(request):
    """Two signed nodes that refuse state-changing remote control (the default)."""
    with _start(request.param) as cluster:
        cluster.transport = request.param
        yield cluster


@pytest.fixture
def attacker(signed):
    """An app on the same broker without the secret."""
    app = create_app(signed.broker_url, None)
    yield app
    app.close()


def _hostnames(cluster, names=None):
    host = socket.gethostname()
    return [f"{name}@{host}" for name in (names or cluster.node_names)]


class Search:
    """A search on ``cluster``; ``attack(run)`` runs in a thread meanwhile."""

    def __init__(self, cluster, X, y):
        self.cluster, self.X, self.y = cluster, X, y
        self.session = None
        self.started = threading.Event()
        self.search = ClusterGridSearchCV(_SlowTree(random_state=0), GRID, cv=3, cluster=cluster)
        opened = cluster.session

        @contextlib.contextmanager
        def session(**kwargs):
            with opened(**kwargs) as self.session:
                self.started.set()
                yield self.session

        cluster.session = session
        self._restore = lambda: vars(cluster).pop("session", None)

    def fit(self, attack):
        errors = []

        def run():
            try:
                assert self.started.wait(30), "the search did not start"
                attack(self)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        start = time.monotonic()
        try:
            self.search.fit(self.X, self.y)
        finally:
            self.wall = time.monotonic() - start
            self._restore()
            thread.join(HANG_S)
        assert not thread.is_alive(), "the attack did not finish"
        if errors:
            raise errors[0]
        self.events = list(self.session.events)
        assert self.wall < HANG_S
        return self

    def events_of(self, kind):
        return [e for e in self.events if e["event"] == kind]


def _fits_running(search, timeout=20):
    """Wait until fits are in flight on both nodes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len({c.node for c in list(search.session.copies.values())}) >= 2:
            return
        time.sleep(0.02)
    raise AssertionError("no fits in flight on both nodes")


def _assert_serving(cluster, pids):
    """Every node answers, consumes its queue, and is the same process."""
    nodes = {n.name: n for n in cluster.nodes(timeout=2)}
    assert set(nodes) == set(cluster.node_names), nodes
    for name, node in nodes.items():
        assert node.consuming, f"{name} stopped consuming its queue"
        assert node.pid == pids[name], f"{name} was restarted"
        assert cluster.processes[name].poll() is None


# -- (a) Celery's state-changing remote control -------------------------------------


def test_cancel_consumer_and_shutdown_are_refused(signed, attacker):
    X, y = _data(1)
    pids = {n.name: n.pid for n in signed.nodes()}
    replies = {}

    def attack(run):
        _fits_running(run)
        destination = _hostnames(signed)
        for name in signed.node_names:
            replies[name] = attacker.control.broadcast(
                "cancel_consumer", arguments={"queue": queue_for(name)},
                destination=_hostnames(signed, [name]), reply=True, timeout=2,
            )  # fmt: skip
        for command in ("pool_shrink", "autoscale", "rate_limit", "time_limit"):
            arguments = {"rate_limit": {"task_name": "clustersearch.run_batch",
                                        "rate_limit": "1/h"},
                         "time_limit": {"task_name": "clustersearch.run_batch", "hard": 0.01},
                         "autoscale": {"max": 1, "min": 0}}.get(command, {})  # fmt: skip
            attacker.control.broadcast(command, arguments=arguments, destination=destination)
        attacker.control.broadcast("shutdown", destination=destination)

    run = Search(signed, X, y).fit(attack)
    assert_same_results(run.search, _reference(X, y))
    assert sum(run.search.fits_per_node_.values()) == N_FITS
    assert not run.events_of("lost"), run.events
    for reply in replies.values():
        assert reply and "error" in list(reply[0].values())[0], reply
    _assert_serving(signed, pids)
    for name in signed.node_names:
        log = signed.log(name)
        for command in ("cancel_consumer", "shutdown", "pool_shrink", "rate_limit"):
            assert f"refused the remote-control command '{command}'" in log, (command, log)


def test_inspection_still_works_and_hides_the_broker_password(signed, attacker):
    inspect = attacker.control.inspect(destination=_hostnames(signed), timeout=2)
    assert set(inspect.ping() or {}) == set(_hostnames(signed))
    queues = inspect.active_queues() or {}
    assert {q["name"] for qs in queues.values() for q in qs} == {
        queue_for(name) for name in signed.node_names
    }
    # Celery 5.7 already censors URLs in ``conf``; nodes mask it again
    # (node.remote), whatever the Celery version. The secret never shows.
    conf = inspect.conf() or {}
    assert set(conf) == set(_hostnames(signed))
    for reply in conf.values():
        assert reply["broker_url"]
        assert signed.secret not in repr(reply)
        if signed.transport == "rabbitmq":
            assert "guest:guest" not in repr(reply), reply["broker_url"]


@pytest.mark.parametrize("transport", list(TRANSPORTS))
def test_with_allow_remote_control_a_cancelled_node_is_lost_and_the_search_ends(transport):
    X, y = _data(2)
    with _start(transport, CLUSTERSEARCH_ALLOW_REMOTE_CONTROL="1") as cluster:
        attacker = create_app(cluster.broker_url, None)
        victim = cluster.node_names[0]
        replies = []

        def attack(run):
            _fits_running(run)
            replies.extend(attacker.control.broadcast(
                "cancel_consumer", arguments={"queue": queue_for(victim)},
                destination=_hostnames(cluster, [victim]), reply=True, timeout=2,
            ))  # fmt: skip

        run = Search(cluster, X, y).fit(attack)
        attacker.close()
        assert replies and "ok" in list(replies[0].values())[0], replies
        assert_same_results(run.search, _reference(X, y))
        assert sum(run.search.fits_per_node_.values()) == N_FITS
        (lost,) = run.events_of("lost")
        assert lost["node"] == victim and lost.get("consuming") is False, lost
        assert run.wall < POLICY["no_node_timeout"]
        # It answers, but says it takes no work: the next search leaves it out.
        nodes = {n.name: n for n in cluster.nodes(timeout=2)}
        assert nodes[victim].consuming is False
        assert nodes[cluster.node_names[1]].consuming is True


# -- (b) a forged revoke ------------------------------------------------------------


def test_a_forged_revoke_with_terminate_is_ignored(signed, attacker):
    X, y = _data(3)
    pids = {n.name: n.pid for n in signed.nodes()}
    sent = []

    def attack(run):
        _fits_running(run)
        inspect = attacker.control.inspect(destination=_hostnames(signed), timeout=1)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and len(sent) < 6:
            # Inspection works, so the attacker learns the running task ids.
            ids = [t["id"] for tasks in (inspect.active() or {}).values() for t in tasks]
            ids += [t["id"] for tasks in (inspect.reserved() or {}).values() for t in tasks]
            if ids:
                attacker.control.revoke(ids, terminate=True, signal="SIGKILL",
                                        destination=_hostnames(signed))  # fmt: skip
                attacker.control.terminate(ids[0], signal="SIGKILL",
                                           destination=_hostnames(signed))  # fmt: skip
                sent.extend(ids)

    run = Search(signed, X, y).fit(attack)
    assert sent, "the attacker found no task to revoke"
    assert_same_results(run.search, _reference(X, y))
    assert sum(run.search.fits_per_node_.values()) == N_FITS
    # No fit was killed or lost: nothing was retried.
    assert not run.events_of("worker-lost"), run.events
    assert not run.events_of("lost"), run.events
    _assert_serving(signed, pids)


# -- (c) a blob flood on a node's reply queue -----------------------------------------


def _publish(app, routing_key, body, headers):
    with app.connection_for_write() as conn:
        producer = conn.Producer()
        producer.publish(body, routing_key=routing_key, exchange="", content_type=RAW,
                         content_encoding="binary", delivery_mode=1,
                         headers=headers)  # fmt: skip


def test_junk_chunks_on_a_reply_queue_are_dropped_and_the_fit_succeeds(
    signed, attacker, monkeypatch
):
    # 1.1 MB of X: two chunks.
    X, y = _data(4, n_features=230)
    flooded = []
    original = BlobServer._on_request

    def on_request(self, message, *, producer):
        # Whoever reads the client's blob queue learns a node's reply queue:
        # the attacker floods it before the client's real chunks go out.
        request = message.decode()
        reply_to = request["reply_to"]
        for digest in request["digests"]:
            blob = self.table.get(digest)
            count = -(-blob.nbytes // CHUNK_BYTES)
            junk = [
                (b"x" * 1000, {}),  # no headers at all
                (b"x" * 1000, {"digest": digest}),  # no index, no count
                (b"x" * 1000, {"digest": digest, "index": count + 3, "count": count + 5,
                               "kind": blob.kind}),  # wrong index and count
                (b"x" * (3 * CHUNK_BYTES), {"digest": digest, "index": 0, "count": count,
                                            "kind": blob.kind}),  # oversized
                (b"y" * min(CHUNK_BYTES, blob.nbytes), {"digest": digest, "index": 0,
                                                      "count": count, "kind": blob.kind}),
            ]  # fmt: skip
            for _ in range(4):
                for body, headers in junk:
                    _publish(attacker, reply_to, body, headers)
            flooded.append((digest, blob.nbytes))
        return original(self, message, producer=producer)

    monkeypatch.setattr(BlobServer, "_on_request", on_request)
    run = Search(signed, X, y).fit(lambda run: None)
    assert flooded, "no blob was fetched"
    assert max(n for _, n in flooded) > CHUNK_BYTES
    assert_same_results(run.search, _reference(X, y))
    assert sum(run.search.fits_per_node_.values()) == N_FITS
    # The cache holds the declared blobs, nothing more, no partial file left.
    cache = Path(signed.cache_dir)
    for digest, nbytes in flooded:
        (path,) = cache.glob(f"{digest}.*")
        assert path.stat().st_size == nbytes
    assert not list(cache.glob(".*.part"))
    logs = "".join(signed.log(name) for name in signed.node_names)
    assert "dropped a data chunk that is not the client's" in logs


# -- (d) a blob request naming someone else's reply queue -----------------------------


def _reply_queue(node):
    # A node's reply queues are named so (wire.blobs.reply_queue).
    return f"clustersearch.reply.{node}.{uuid.uuid4().hex}"


def test_the_blob_server_answers_only_reply_queues_of_its_nodes(signed, attacker):
    X, y = _data(5)
    got = {}
    tries = {}

    def attack(run):
        server = run.session.blob_server
        deadline = time.monotonic() + 20
        while not run.session.blobs.blobs and time.monotonic() < deadline:
            time.sleep(0.02)
        digests = sorted(run.session.blobs.blobs)
        node = signed.node_names[0]
        with attacker.connection_for_write() as conn:
            channel = conn.default_channel
            names = {
                "any queue": f"attacker.{uuid.uuid4().hex}",
                "an unknown node's": _reply_queue("evil"),
                "another node's name": _reply_queue(signed.node_names[1]),
            }
            queues = {}
            for why, name in names.items():
                queues[why] = Queue(name, routing_key=name, auto_delete=True, durable=False)
                queues[why].bind(channel).declare()
                tries[why] = name
            producer = conn.Producer()
            for why, name in names.items():
                # The request claims to come from node 0 (or "evil").
                claimed = "evil" if why == "an unknown node's" else node
                producer.publish(
                    {"digests": digests, "reply_to": name, "node": claimed},
                    routing_key=server.queue_name, exchange="", serializer="json",
                )  # fmt: skip
            deadline = time.monotonic() + 20
            while getattr(server, "refused", 0) < len(names) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)
            for why, queue in queues.items():
                got[why] = 0
                while (message := queue.bind(channel).get(no_ack=True)) is not None:
                    got[why] += len(message.body)
                with contextlib.suppress(Exception):
                    queue.bind(channel).delete()

    run = Search(signed, X, y).fit(attack)
    assert_same_results(run.search, _reference(X, y))
    assert tries and got == {why: 0 for why in tries}, got
    assert getattr(run.session.blob_server, "refused", 0) >= len(tries)
