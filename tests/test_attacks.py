"""An attacker with broker access and no secret, while real searches run.

The attacker is a thread of this process with a Celery app and kombu
connections of its own (the broker URL, no secret): what anyone who can
publish to the broker can do. Each attack runs against a real 2-node
LocalCluster (signed, concurrency 2), on RabbitMQ with rpc:// results and
on Redis alone, and must end with scikit-learn's own results, nothing the
attacker sent counted or printed, and both nodes still serving.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import signal
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from billiard.exceptions import WorkerLostError
from celery import Celery, states
from celery.app.task import Context
from conftest import RABBITMQ, REDIS, assert_same_results, require_servers
from kombu import Queue
from sklearn.model_selection import GridSearchCV
from sklearn.tree import DecisionTreeClassifier

from clustersearch import LocalCluster
from clustersearch.wire.protocol import INFO_COMMAND, TASK_NAME, queue_for
from clustersearch.wire.serialization import dumps
from clustersearch.wire.signing import Signer

pytestmark = [pytest.mark.broker, pytest.mark.timeout(300)]

BROKERS = {
    "rabbitmq-rpc": (RABBITMQ, "rpc://"),
    "redis": (REDIS + "/13", REDIS + "/13"),
}

MARKER = "ATTACKER-TEXT-" + uuid.uuid4().hex[:8]

rng = np.random.RandomState(0)
X = rng.normal(size=(300, 5))
y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(int)
GRID = {"max_depth": [1, 2, 3, 4, 5, 6, 7, 8]}
N_FITS = len(GRID["max_depth"]) * 3


@pytest.fixture(scope="module", params=list(BROKERS))
def target(request):
    broker, backend = BROKERS[request.param]
    require_servers(broker, backend)
    with LocalCluster(
        n_workers=2, concurrency=2, broker_url=broker, backend=backend, allow_root=True
    ) as cluster:
        yield cluster


def _search():
    return GridSearchCV(DecisionTreeClassifier(random_state=0), GRID, cv=3, n_jobs=-1)


def _run_search(cluster):
    with cluster.joblib() as session:
        ours = _search().fit(X, y)
    assert_same_results(ours, _search().fit(X, y))
    # Each fit counted once, by the nodes that ran it.
    assert sum(session.fits_per_node.values()) == N_FITS
    assert set(session.fits_per_node) <= set(cluster.node_names)
    return session


def _pids(cluster):
    return {node.name: node.pid for node in cluster.nodes()}


def _still_serving(cluster, pids):
    nodes = cluster.nodes()
    assert {n.name: n.pid for n in nodes} == pids, "a node is gone or was restarted"
    assert all(n.concurrency == 2 for n in nodes)


def _nothing_shown(capsys, caplog):
    out, err = capsys.readouterr()
    assert MARKER not in out + err
    assert MARKER not in caplog.text


class Attacker:
    """Broker access, no secret: a Celery app and connections of its own."""

    def __init__(self, cluster):
        self.app = Celery("attacker", broker=cluster.broker_url, backend=cluster.backend_url,
                          set_as_current=False)  # fmt: skip
        self.app.conf.update(accept_content=["json"], result_serializer="json",
                             task_serializer="json")  # fmt: skip
        self.victims = {f"{name}@{socket.gethostname()}" for name in cluster.node_names}
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []

    def spawn(self, target, *args):
        def run():
            try:
                target(*args)
            except BaseException as exc:  # reported by close()
                self.errors.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self._threads.append(thread)

    def close(self):
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        self.app.close()
        assert not self.errors, self.errors

    def consume(self, queue, on_message, until):
        """A competing consumer on a node's queue (prefetch 1)."""
        with self.app.connection_for_write() as conn:
            consumer = conn.Consumer(
                Queue(queue, no_declare=True), callbacks=[on_message], accept=["json"],
                prefetch_count=1,
            )  # fmt: skip
            with consumer:
                while not self.stop.is_set() and not until():
                    try:
                        conn.drain_events(timeout=0.2)
                    except TimeoutError:
                        pass

    def answer_info(self, replies):
        """Fake nodes: each answers every info broadcast to the target's
        nodes with its reply."""
        with self.app.connection_for_write() as conn:
            mailbox = self.app.control.mailbox(conn)
            consumers = []
            for i, reply in enumerate(replies):
                node = _any_destination_node(
                    mailbox, f"attacker{i}-{uuid.uuid4().hex[:6]}@nowhere", conn.channel(),
                    {INFO_COMMAND: (lambda r: lambda state, **kw: r)(reply)}, self.victims,
                )
                consumers.append(node.listen())
            while not self.stop.is_set():
                try:
                    conn.drain_events(timeout=0.2)
                except TimeoutError:
                    pass
            for consumer in consumers:
                consumer.cancel()

    def forge_result(self, message, value, state=states.SUCCESS):
        """Publish ``value`` as the result of the task in ``message``: to its
        reply queue (rpc://) or its result key and channel (Redis)."""
        task_id = message.headers["id"]
        request = Context(
            reply_to=message.properties.get("reply_to"),
            correlation_id=message.properties.get("correlation_id") or task_id,
        )
        if state == states.FAILURE:
            self.app.backend.mark_as_failure(task_id, value, request=request)
        else:
            self.app.backend.store_result(task_id, value, state, request=request)

    def publish(self, captured, queue):
        """Send a captured task message, as it was, to ``queue``."""
        body, headers, properties, content_type, encoding = captured
        with self.app.connection_for_write() as conn:
            conn.Producer().publish(
                body, routing_key=queue, exchange="", headers=headers,
                content_type=content_type, content_encoding=encoding,
                reply_to=properties.get("reply_to"),
                correlation_id=properties.get("correlation_id"), retry=True,
            )  # fmt: skip


def _any_destination_node(mailbox, hostname, channel, handlers, victims):
    """kombu's pidbox node, answering info broadcasts meant for the nodes
    ``victims`` (Celery host names) as if it were one of them. Broadcasts
    meant for anyone else (other clusters on this broker) are left alone."""
    from kombu.pidbox import Node

    class AnyDestination(Node):
        def handle_message(self, body, message=None):
            if body.get("method") == INFO_COMMAND and set(body.get("destination") or ()) & victims:
                return self.dispatch(**body)
            return None

    return AnyDestination(hostname, state=None, channel=channel, handlers=handlers,
                          mailbox=mailbox)  # fmt: skip


def _captured(message):
    return (message.body, dict(message.headers), dict(message.properties),
            message.content_type, message.content_encoding)  # fmt: skip


# -- a real worker-lost still counts -------------------------------------------

_KILL_FLAG = Path(tempfile.gettempdir(), f"clustersearch-attacks-{uuid.uuid4().hex}")


class _DiesOnceAtDepth3(DecisionTreeClassifier):
    """Its first fit at max_depth=3 kills its worker process (SIGKILL)."""

    def fit(self, X, y, **kwargs):
        if self.max_depth == 3 and not _KILL_FLAG.exists():
            _KILL_FLAG.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return super().fit(X, y, **kwargs)


def test_a_real_worker_lost_is_signed_and_retried(target):
    """The node's own worker-lost report verifies: the fit is retried (not
    dropped as a forgery) and the search ends with scikit-learn's results.

    First in the module, on nodes that no revoke has reached: after the
    forged-result test's revokes, a killed process was once reported as
    REVOKED instead of lost (dropped as unsigned and sent again: the search
    still matched). Likely billiard's ``_job_terminated`` flag, left on a
    process whose stop signal the fit guard dropped, not yet confirmed."""
    pids = _pids(target)
    policy = target.policy
    # No straggler backup: the lost copy's report is the only way back.
    target.policy = policy.replace(straggler_factor=None)
    try:
        with target.joblib() as session:
            ours = GridSearchCV(_DiesOnceAtDepth3(random_state=0), GRID, cv=3,
                                n_jobs=-1).fit(X, y)  # fmt: skip
    finally:
        target.policy = policy
        _KILL_FLAG.unlink(missing_ok=True)
    assert_same_results(ours, _search().fit(X, y))
    events = [e["event"] for e in session.events]
    assert "worker-lost" in events and "rejected-result" not in events, session.events
    assert "gave-up" not in events
    _still_serving(target, pids)


# -- (a) forged results --------------------------------------------------------


def test_forged_results_and_worker_lost_are_dropped(target, capsys, caplog):
    """A competing consumer on a node's queue takes tasks and answers them:
    a "local" result with the attacker's output and text to print, a Celery
    FAILURE named WorkerLostError, and (the task put back, so the node runs
    it too) a forged SUCCESS ahead of the real one."""
    pids = _pids(target)
    attacker = Attacker(target)
    forged: list[str] = []
    forgeries = [
        ("steal", {"local": True, "output": [{"test_scores": 1.0, "fit_error": MARKER}],
                   "stdout": MARKER + "\n", "node": MARKER, "pid": 1}, states.SUCCESS),
        ("steal", WorkerLostError(f"{MARKER} Worker exited prematurely: signal 9 (SIGKILL)."),
         states.FAILURE),
        ("peek", {"local": True, "output": [None], "stdout": MARKER + "\n"}, states.SUCCESS),
    ]  # fmt: skip

    def on_message(body, message):
        how, value, state = forgeries[len(forged)]
        if how == "steal":
            message.ack()
        attacker.forge_result(message, value, state)
        if how == "peek":
            message.requeue()
        forged.append(message.headers["id"])

    attacker.spawn(attacker.consume, queue_for(target.node_names[0]), on_message,
                   lambda: len(forged) == len(forgeries))  # fmt: skip
    try:
        session = _run_search(target)
    finally:
        attacker.close()
    assert len(forged) >= 2, "the attacker got no task: the attack did not happen"
    rejected = [e for e in session.events if e["event"] == "rejected-result"]
    # The two stolen tasks' forgeries were the only answers they got; the
    # peeked one's forgery is dropped too, or comes after the real result.
    assert len(rejected) >= min(len(forged), 2), session.events
    assert not [e for e in session.events if e["event"] in ("worker-lost", "gave-up")]
    _nothing_shown(capsys, caplog)
    _still_serving(target, pids)


class _CreatesFileWhenUnpickled:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_undecodable_results_are_dropped(target, tmp_path, capsys, caplog):
    """A competing consumer steals tasks and answers each with a message that
    is no result: garbage in clustersearch's result codec, a pickle that
    would create a file if anything unpickled it, broken JSON, an empty
    message, and a JSON record without a task id. Before
    the codec's checks, an undecodable result stopped the client's
    dispatcher (the search failed); now each is dropped, the stolen work is
    sent again, and nothing is unpickled."""
    import pickle

    from clustersearch.wire.codec import CONTENT_TYPE

    pids = _pids(target)
    attacker = Attacker(target)
    evil = tmp_path / "unpickled"
    answers = [
        (b"CSR1\xff\xff\xff\xff" + MARKER.encode(), CONTENT_TYPE, "binary"),
        (pickle.dumps(_CreatesFileWhenUnpickled(evil)), "application/x-python-serialize",
         "binary"),
        (b"{" + MARKER.encode(), "application/json", "utf-8"),
        (b"", CONTENT_TYPE, "binary"),
        (b'{"status": "SUCCESS", "result": "%s"}' % MARKER.encode(), "application/json",
         "utf-8"),
    ]  # fmt: skip
    forged: list[str] = []

    def on_message(body, message):
        body, content_type, encoding = answers[len(forged)]
        message.ack()
        task_id = message.headers["id"]
        if target.backend_url.startswith("rpc"):  # to the client's reply queue
            with attacker.app.connection_for_write() as conn:
                conn.Producer().publish(
                    body, routing_key=message.properties["reply_to"], exchange="", content_type=content_type,
                    content_encoding=encoding, correlation_id=task_id, retry=True,
                )  # fmt: skip
        else:  # Redis: the result key and its channel
            backend = attacker.app.backend
            backend.set(backend.get_key_for_task(task_id), body)
        forged.append(task_id)

    attacker.spawn(attacker.consume, queue_for(target.node_names[0]), on_message,
                   lambda: len(forged) == len(answers))  # fmt: skip
    rejected = []
    try:
        # Searches until the attacker has used every answer (a search sends
        # the node a handful of tasks).
        for _ in range(6):
            session = _run_search(target)
            rejected += [e for e in session.events if e["event"] == "rejected-result"]
            if len(forged) == len(answers):
                break
    finally:
        attacker.close()
    assert len(forged) == len(answers), "the attacker did not get a task for every answer"
    assert not evil.exists(), "the client unpickled an attacker's message"
    assert len(rejected) >= len(forged), rejected
    assert any("undecodable" in e.get("why", "") for e in rejected), rejected
    _nothing_shown(capsys, caplog)
    _still_serving(target, pids)


def test_tasks_taken_and_dropped_do_not_stall_the_search(target, capsys, caplog):
    """A competing consumer on both nodes' queues takes tasks and drops them
    (acknowledged, never answered) until it holds as many as each node may
    be sent at once. Before, each dropped copy held its node's room for
    good: with every node's room held, nothing more was sent and nothing
    was idle to take a straggler's backup: the search waited forever. Now
    the heartbeat finds the nodes holding nothing while the client counts
    copies on them: those are sent again, and the search ends with
    scikit-learn's results."""
    pids = _pids(target)
    attacker = Attacker(target)
    # What the client sends a node at once: its processes and one queued.
    room = 2 + 1
    stolen = {name: [] for name in target.node_names}

    def stealer(name):
        def on_message(body, message):
            message.ack()  # gone: nobody will answer it
            stolen[name].append(message.headers["id"])

        return on_message

    for name in target.node_names:
        attacker.spawn(attacker.consume, queue_for(name), stealer(name),
                       lambda name=name: len(stolen[name]) >= room)  # fmt: skip
    try:
        session = _run_search(target)
    finally:
        attacker.close()
    assert any(stolen.values()), "the attacker got no task: the attack did not happen"
    lost = [e for e in session.events if e["event"] == "copies-lost"]
    assert sum(e["copies"] for e in lost) >= 1, session.events
    # Every copy found lost was one the attacker took (none the nodes ran).
    assert {e["node"] for e in lost} <= {n for n, ids in stolen.items() if ids}, lost
    assert not [e for e in session.events if e["event"] in ("worker-lost", "gave-up")]
    _nothing_shown(capsys, caplog)
    _still_serving(target, pids)


# -- (b) fake nodes ------------------------------------------------------------


def _old_fingerprint(secret: str) -> str:
    """What a node published before the challenge (64 bits of an HMAC)."""
    return hmac.new(secret.encode(), b"clustersearch-fingerprint",
                    hashlib.sha256).hexdigest()[:16]  # fmt: skip


def _capture_info(attacker, arguments):
    replies = attacker.app.control.broadcast(
        INFO_COMMAND, arguments=arguments, reply=True, timeout=2,
        destination=sorted(attacker.victims),
    )  # fmt: skip
    return [info for reply in replies for info in reply.values() if "node" in info]


def _real_nodes_despite(target, asks=3):
    """The nodes ``target.nodes()`` admits while fake ones answer too: no
    ask may admit a node that is not one of the real ones; the real ones
    are all found within ``asks`` asks (a real node's reply can miss one ask
    on a loaded machine: Redis delivers broadcasts once, by pub/sub)."""
    found = {}
    for _ in range(asks):
        nodes = target.nodes(timeout=5)
        assert {n.name for n in nodes} <= set(target.node_names), nodes
        found.update((n.name, n) for n in nodes)
        if set(found) == set(target.node_names):
            break
    return [found[name] for name in sorted(found)]


def test_fake_nodes_replaying_replies_are_not_admitted(target, capsys, caplog):
    pids = _pids(target)
    attacker = Attacker(target)
    # The attacker can broadcast too, and capture what the nodes answer
    # (with a challenge of its own, where the nodes take one).
    captured = _capture_info(attacker, {"nonce": "attacker"}) or _capture_info(attacker, None)
    assert {info["node"] for info in captured} >= set(target.node_names)
    # Nothing in a reply says anything about the secret without a challenge.
    assert not any("secret" in info for info in captured)
    real = next(info for info in captured if info["node"] == target.node_names[0])
    fake = f"fake-{uuid.uuid4().hex[:6]}"
    replies = [
        real,  # replayed as it was (another nonce)
        {**real, "node": fake, "hostname": f"{fake}@x", "host": MARKER,
         "queues": [queue_for(fake)], "concurrency": 64},  # renamed, more room
        {**{k: v for k, v in real.items() if k != "proof"}, "node": fake + "2",
         "hostname": f"{fake}2@x", "host": MARKER, "queues": [queue_for(fake + "2")],
         "concurrency": 64, "secret": _old_fingerprint(target.secret)},  # the old proof
    ]  # fmt: skip
    attacker.spawn(attacker.answer_info, replies)
    try:
        time.sleep(0.5)  # the fake nodes listen
        nodes = _real_nodes_despite(target)
        assert sorted(n.name for n in nodes) == sorted(target.node_names)
        assert all(n.concurrency == 2 for n in nodes)
        session = _run_search(target)
    finally:
        attacker.close()
    assert not any(fake in str(e) for e in session.events), session.events
    _nothing_shown(capsys, caplog)
    _still_serving(target, pids)


# -- (c) replayed tasks --------------------------------------------------------


class SlowTouch:
    """A batch that appends a line to ``path`` after ``seconds``."""

    def __init__(self, path, seconds):
        self.path, self.seconds = str(path), seconds

    def __call__(self):
        time.sleep(self.seconds)
        with open(self.path, "a") as f:
            f.write("ran\n")
        return "done"


def _wait_for(predicate, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_captured_task_is_refused_by_another_node(target, capsys, caplog):
    """A task the client signed for one node, captured from its queue during
    a search (and put back: that node runs it), sent to the other node."""
    pids = _pids(target)
    first, other = target.node_names
    attacker = Attacker(target)
    captured = []

    def on_message(body, message):
        captured.append(_captured(message))
        message.requeue()

    attacker.spawn(attacker.consume, queue_for(first), on_message, lambda: bool(captured))
    try:
        _run_search(target)
    finally:
        attacker.close()
    assert captured, "the attacker got no task: the attack did not happen"
    task_id = captured[0][1]["id"]
    attacker = Attacker(target)
    try:
        attacker.publish(captured[0], queue_for(other))
        _wait_for(lambda: f"rejected task {task_id}" in target.log(other),
                  f"node {other} to refuse the replayed task")  # fmt: skip
    finally:
        attacker.close()
    line = next(x for x in target.log(other).splitlines() if f"rejected task {task_id}" in x)
    assert "wrong signature" in line, line
    _nothing_shown(capsys, caplog)
    _still_serving(target, pids)


def test_a_task_sent_twice_to_a_node_runs_once(target, tmp_path):
    """The same signed task twice at once to a node with 2 idle processes:
    one runs it, the other refuses it (the marker is claimed before the run)."""
    pids = _pids(target)
    node = target.node_names[0]
    path = tmp_path / "ran"
    payload = dumps(SlowTouch(path, 2.0))
    task_id = str(uuid.uuid4())
    # Signed as the client signs (client/dispatch.py): for this node.
    auth = Signer(target.secret.encode()).sign("task", task_id, payload, [None, [], node])
    sent = []
    for _ in range(2):  # the attacker's copy: the same message, once more
        sent.append(target.app.send_task(
            TASK_NAME, args=(payload,), kwargs={"source": None, "blobs": [], "auth": auth},
            task_id=task_id, queue=queue_for(node), serializer="json",
        ))  # fmt: skip
    _wait_for(path.exists, "the task to run")
    time.sleep(4)  # a copy that ran beside it has finished by now
    assert Path(path).read_text() == "ran\n", "the task ran twice"
    log = target.log(node)
    assert log.count(f"rejected task {task_id}") == 1, log[-3000:]
    assert "already ran here" in log
    _still_serving(target, pids)


# -- (d) malformed info replies ------------------------------------------------


def test_malformed_info_replies_are_ignored(target, capsys, caplog):
    pids = _pids(target)
    attacker = Attacker(target)
    real = target.nodes()[0]
    good = {"node": "x", "queues": [], "concurrency": 2, "hostname": "x@x", "host": MARKER,
            "cpu_count": 2, "pid": 1, "versions": real.versions, "stalled_s": 0.0}
    bad = [
        {**good, "node": "bad-abc", "concurrency": "abc"},
        {**good, "node": "bad-zero", "concurrency": 0},
        {**good, "node": "bad-negative", "concurrency": -1},
        {**good, "node": "bad-stalled", "stalled_s": -5},
        {**good, "node": "bad-versions", "versions": {"numpy": 2}},
        {**good, "node": "bad-running", "running": -1},
        {**good, "node": "bad-fits", "fits_done": "many"},
        {**good, "node": "bad-mean", "mean_fit_s": 10**400},
        {**good, "node": "bad-cache", "cache_bytes": 1.5},
        {**good, "node": "bad-unsigned"},  # valid, but says it has no secret
        {"node": "bad-missing"},
        {"concurrency": 4},
        MARKER,
    ]  # fmt: skip
    attacker.spawn(attacker.answer_info, bad)
    try:
        time.sleep(0.5)  # the fake nodes listen
        nodes = _real_nodes_despite(target)
        assert sorted(n.name for n in nodes) == sorted(target.node_names)
        session = _run_search(target)
    finally:
        attacker.close()
    assert not any("bad-" in str(e) for e in session.events), session.events
    _nothing_shown(capsys, caplog)
    _still_serving(target, pids)
