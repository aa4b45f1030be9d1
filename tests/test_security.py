"""Nobody but the client runs code on the nodes; bad input never runs.

The bad-input suite publishes straight to a node's queue, the way anyone
with access to the broker could, then checks that the node ran nothing,
is still up (same process), logged the refusal, and serves the next search
correctly.
"""

import os
import pickle
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    TRANSPORTS,
    assert_ran_on_workers,
    assert_same_results,
    require_servers,
    transport_params,
)
from sklearn.model_selection import GridSearchCV
from sklearn.tree import DecisionTreeClassifier

from clustersearch import Cluster, ClusterGridSearchCV, LocalCluster
from clustersearch.client.cluster import NodeInfo, check_nodes
from clustersearch.exceptions import SecretMismatchError, VersionMismatchError
from clustersearch.wire.protocol import TASK_NAME, local_versions, queue_for
from clustersearch.wire.serialization import dumps
from clustersearch.wire.signing import Signer

rng = np.random.RandomState(0)
X = rng.normal(size=(300, 5))
y = (X[:, 0] > 0).astype(int)
GRID = {"max_depth": [1, 2, 3]}


class Evil:
    """Unpickling this runs a command: the attack a broker user could try."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Touch:
    """A legitimate batch: appends a line to ``path`` each time it runs."""

    def __init__(self, path):
        self.path = str(path)

    def __call__(self):
        with open(self.path, "a") as f:
            f.write("ran\n")
        return "done"


@pytest.fixture(scope="module", params=transport_params(["embedded", "rabbitmq-rpc"]))
def guarded(request):
    """One node, one process (messages run in order), small payload limit."""
    broker, backend = TRANSPORTS[request.param]
    require_servers(broker, backend)
    old = os.environ.get("CLUSTERSEARCH_MAX_PAYLOAD")
    os.environ["CLUSTERSEARCH_MAX_PAYLOAD"] = "1MiB"
    try:
        cluster = LocalCluster(n_workers=1, broker_url=broker, backend=backend, allow_root=True)
    finally:
        if old is None:
            os.environ.pop("CLUSTERSEARCH_MAX_PAYLOAD")
        else:
            os.environ["CLUSTERSEARCH_MAX_PAYLOAD"] = old
    with cluster:
        yield cluster


def _node(cluster):
    (node,) = cluster.require_nodes()  # asks again when the node answers late
    return node


def _send(cluster, payload, *, auth=None, task_id=None, source=None, blobs=()):
    """Publish a clustersearch task the way an attacker with broker access can."""
    task_id = task_id or str(uuid.uuid4())
    kwargs = {"source": source, "blobs": [list(b) for b in blobs]}
    if auth is not None:
        kwargs["auth"] = auth
    return cluster.app.send_task(
        TASK_NAME, args=(payload,), kwargs=kwargs, task_id=task_id,
        queue=queue_for(_node(cluster).name), serializer="json",
    )  # fmt: skip


def _publish_raw(cluster, body, content_type, encoding="utf-8"):
    """A message with Celery's task headers and an arbitrary body."""
    task_id = str(uuid.uuid4())
    queue = queue_for(_node(cluster).name)
    with cluster.app.connection_for_write() as conn:
        conn.Producer().publish(
            body, routing_key=queue, exchange="", content_type=content_type,
            content_encoding=encoding,
            headers={"lang": "py", "task": TASK_NAME, "id": task_id, "root_id": task_id,
                     "parent_id": None, "group": None, "retries": 0, "eta": None,
                     "expires": None, "timelimit": [None, None], "shadow": None,
                     "argsrepr": "", "kwargsrepr": "", "origin": "attacker",
                     "ignore_result": False},
            declare=[], retry=True,
        )  # fmt: skip
    return task_id


def _signed(cluster, payload, *, task_id=None, signed_at=None):
    task_id = task_id or str(uuid.uuid4())
    signer = Signer(cluster.secret.encode())
    # Signed for the node it is sent to (node/task.py refuses it elsewhere).
    context = [None, [], _node(cluster).name]
    if signed_at is None:
        auth = signer.sign("task", task_id, payload, context)
    else:
        auth = {"t": signed_at, "mac": signer._mac("task", task_id, signed_at, context, payload)}
    return task_id, auth


def _rejected(result, match):
    with pytest.raises(Exception, match=match) as info:
        result.get(timeout=30, propagate=True)
    return info.value


def _still_serving(cluster, pid_before):
    node = _node(cluster)
    assert node.pid == pid_before, "the node restarted"
    search = ClusterGridSearchCV(
        DecisionTreeClassifier(random_state=0), GRID, cv=3, cluster=cluster
    ).fit(X, y)
    assert_same_results(search, GridSearchCV(DecisionTreeClassifier(random_state=0), GRID,
                                             cv=3).fit(X, y))  # fmt: skip
    assert_ran_on_workers(search, cluster, 9)


def test_bad_inputs_are_refused_and_the_node_keeps_serving(guarded, tmp_path):
    node = _node(guarded)
    marker = tmp_path / "pwned"
    evil = pickle.dumps(Evil(marker))
    ran = tmp_path / "ran"
    legit = dumps(Touch(ran))

    # 1. garbage bytes, 2. a content type Celery does not accept, 3. a pickle
    # in Celery's own pickle content type: refused before decoding. (Each
    # body is unique, to find its own refusal in the log.)
    garbage_id = _publish_raw(guarded, b"\x00\xffnot json at all", "application/json")
    yaml = f"!!python/object/apply:os.system ['touch {marker}-yaml'] # {uuid.uuid4()}"
    _publish_raw(guarded, yaml.encode(), "application/x-yaml")
    raw_pickle = pickle.dumps(Evil(f"{marker}-raw-pickle"))
    _publish_raw(guarded, raw_pickle, "application/x-python-serialize", "binary")
    # 4. a pickle that would run code, unsigned, 5. signed with another secret
    results = [_send(guarded, evil)]
    other = Signer(b"not-the-nodes-secret-at-all")
    task_id = str(uuid.uuid4())
    results.append(_send(guarded, evil, task_id=task_id,
                         auth=other.sign("task", task_id, evil, [None, []])))  # fmt: skip
    # 6. tampered: a legitimate signature over other bytes
    task_id, auth = _signed(guarded, legit)
    results.append(_send(guarded, evil, task_id=task_id, auth=auth))
    # 7. truncated
    task_id, auth = _signed(guarded, legit)
    results.append(_send(guarded, legit[: len(legit) // 2], task_id=task_id, auth=auth))
    # 8. oversized (over the node's 1 MiB limit), 9. not bytes at all
    big = legit + b"\x00" * (2 * 1024 * 1024)
    task_id, auth = _signed(guarded, big)
    results.append(_send(guarded, big, task_id=task_id, auth=auth))
    results.append(_send(guarded, "a string", auth={"t": time.time(), "mac": "00"}))
    # 10. signed an hour and a half ago (stale)
    task_id, auth = _signed(guarded, legit, signed_at=time.time() - 5400)
    results.append(_send(guarded, legit, task_id=task_id, auth=auth))
    # 11. a signature moved to another task id
    _, auth = _signed(guarded, legit)
    results.append(_send(guarded, legit, auth=auth))

    reasons = [
        "unsigned task refused",
        "wrong signature",
        "wrong signature",
        "wrong signature",
        "over the 1048576-byte limit",
        "not bytes",
        "outside the 3600 s window",
        "wrong signature",
    ]
    for result, reason in zip(results, reasons, strict=True):
        _rejected(result, reason)

    # 12. a replay: the same signed message twice runs once.
    task_id, auth = _signed(guarded, legit)
    first = _send(guarded, legit, task_id=task_id, auth=auth)
    assert first.get(timeout=30)["payload"]
    _send(guarded, legit, task_id=task_id, auth=auth)
    # The node runs its messages in order: once a later task is done, the
    # replay was handled. (A result backend keyed by task id, like file://,
    # still holds the first run's result under the replayed id.)
    later = tmp_path / "later"
    later_id, later_auth = _signed(guarded, dumps(Touch(later)))
    _send(guarded, dumps(Touch(later)), task_id=later_id, auth=later_auth).get(timeout=30)
    assert later.read_text() == "ran\n"

    assert not list(tmp_path.glob("pwned*")), "a refused message ran code"
    assert ran.read_text() == "ran\n"
    # Each attack was refused on its own: one refusal each in the node's log.
    entries = _log_entries(guarded.log(node.name))

    def refusals(*parts):
        return [e for e in entries if all(part in e for part in parts)]

    assert len(refusals("Can't decode message body", garbage_id)) == 1
    assert len(refusals("Refusing to deserialize untrusted content of type yaml", yaml)) == 1
    assert len(refusals("Refusing to deserialize untrusted content of type pickle",
                        f"{marker}-raw-pickle")) == 1  # fmt: skip
    for result in results:
        assert len(refusals(f"rejected task {result.id}, nothing in it was run")) == 1, result.id
    assert len(refusals(f"rejected task {task_id}", "already ran here")) == 1
    _still_serving(guarded, node.pid)


def _log_entries(log):
    """A node's log, one entry per record (its traceback included)."""
    return re.split(r"\n(?=\[\d{4}-\d\d-\d\d )", log)


def test_results_that_fail_verification_are_not_unpickled(guarded):
    from clustersearch.client.session import Session, Work
    from clustersearch.exceptions import MessageRejected

    # A session is a plain object until start(): no thread, no connection.
    session = Session(
        guarded.app, guarded.nodes(), signer=Signer(guarded.secret.encode())
    )
    open_result = session.dispatcher.open_result
    work = Work(b"", None, 1)
    work.task_id, work.node = "t1", "n1"
    payload = pickle.dumps(Evil("/nonexistent/should-not-run"))
    work.result = {"payload": payload, "auth": Signer(b"another-secret-entirely").sign(
        "result", "t1", payload)}  # fmt: skip
    with pytest.raises(MessageRejected, match="result of node 'n1' refused"):
        open_result(work)
    work.result = {"payload": payload}
    with pytest.raises(MessageRejected, match="unsigned result"):
        open_result(work)
    work.result = "not a result"
    with pytest.raises(MessageRejected, match="not a clustersearch result"):
        open_result(work)


# -- pre-flight ---------------------------------------------------------------


def test_a_client_with_another_secret_is_refused_before_dispatch(guarded):
    other = Cluster(guarded.broker_url, guarded.backend, secret="x" * 32)
    with pytest.raises(SecretMismatchError, match="holds a different secret"):
        ClusterGridSearchCV(DecisionTreeClassifier(), GRID, cluster=other).fit(X, y)
    other.close()


def test_a_client_without_a_secret_is_refused(guarded, monkeypatch):
    monkeypatch.delenv("CLUSTERSEARCH_SECRET", raising=False)
    bare = Cluster(guarded.broker_url, guarded.backend)
    with pytest.raises(SecretMismatchError, match="requires signed work"):
        ClusterGridSearchCV(DecisionTreeClassifier(), GRID, cluster=bare).fit(X, y)
    bare.close()


def test_the_secret_never_travels_with_the_search(guarded):
    search = ClusterGridSearchCV(DecisionTreeClassifier(), GRID, cluster=guarded)
    blob = dumps(search)
    assert guarded.secret.encode() not in blob
    assert guarded.secret not in repr(search)
    restored = pickle.loads(blob)
    assert restored.cluster._signer.secret is None


def _node_info(**versions):
    return NodeInfo(name="pine3", queue="clustersearch.pine3", concurrency=4,
                    hostname="pine3@pine3", host="pine3", cpu_count=4, pid=1,
                    versions={**local_versions(), **versions})  # fmt: skip


@pytest.mark.parametrize(
    "package, version",
    [("scikit-learn", "1.8.0"), ("python", "3.10.12"), ("numpy", "1.26.4"),
     ("clustersearch", "0.0.1"), ("cloudpickle", "2.2.1"), ("joblib", "1.3.0")],
)  # fmt: skip
def test_a_version_mismatch_names_the_node_and_both_versions(package, version):
    mine = local_versions()[package]
    with pytest.raises(VersionMismatchError) as info:
        check_nodes([_node_info(**{package: version})], Signer(None))
    message = str(info.value)
    assert "pine3" in message and version in message and mine in message
    assert "check_versions=False" in message
    check_nodes([_node_info(**{package: version})], Signer(None), check_versions=False)


def test_harmless_version_differences_pass():
    python = local_versions()["python"].rsplit(".", 1)[0] + ".99"
    check_nodes([_node_info(python=python, celery="5.6.0")], Signer(None))


def test_a_class_defined_in_main_runs_on_the_nodes(embedded_cluster, tmp_path):
    script = tmp_path / "script.py"
    script.write_text(
        "import numpy as np, sys\n"
        "from sklearn.base import BaseEstimator, ClassifierMixin\n"
        "from clustersearch import Cluster, ClusterGridSearchCV\n"
        "class Threshold(ClassifierMixin, BaseEstimator):\n"
        "    def __init__(self, t=0.0):\n"
        "        self.t = t\n"
        "    def fit(self, X, y):\n"
        "        self.classes_ = np.unique(y)\n"
        "        return self\n"
        "    def predict(self, X):\n"
        "        return (X[:, 0] > self.t).astype(int)\n"
        "X = np.random.RandomState(0).normal(size=(100, 2)); y = (X[:, 0] > 0).astype(int)\n"
        "c = Cluster(sys.argv[1], secret=sys.argv[2])\n"
        "s = ClusterGridSearchCV(Threshold(), {'t': [-1.0, 0.0, 1.0]}, cv=3, cluster=c).fit(X, y)\n"
        "print('best', s.best_params_, sum(s.fits_per_node_.values()))\n"
    )
    proc = subprocess.run(
        [sys.executable, str(script), embedded_cluster.broker_url, embedded_cluster.secret],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "best {'t': 0.0} 9" in proc.stdout


# -- the worker's own checks ----------------------------------------------------


def _kill_group(proc):
    """Kill a node started in a session of its own, its pool processes with it."""
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    if proc.stderr is not None:
        proc.stderr.close()


def _worker(*args, env=None):
    return [sys.executable, "-m", "clustersearch", "worker", "--allow-root", *args]


def test_worker_refuses_guest_on_a_remote_broker():
    proc = subprocess.run(
        _worker("--broker", "amqp://guest:guest@192.0.2.1:5672//"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "refusing RabbitMQ's default 'guest' account" in proc.stderr


def test_worker_warns_loudly_without_a_secret_on_a_remote_broker(monkeypatch):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUSTERSEARCH_SECRET")}
    proc = subprocess.Popen(
        _worker("--broker", "amqp://remote:pw@192.0.2.1:5672//"),
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        seen = ""
        deadline = time.monotonic() + 60
        while "README, Security" not in seen and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            seen += line
        assert "NO SECRET" in seen and "can run code on this node" in seen, seen
    finally:
        _kill_group(proc)


def test_worker_rejects_a_short_secret_file(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("short")
    proc = subprocess.run(
        _worker("--broker", f"filesystem://{tmp_path}", "--secret-file", str(secret)),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "too short" in proc.stderr


def test_a_node_started_with_a_secret_file_serves_a_client_with_that_secret(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s3cret-shared-by-the-whole-shelf\n")
    broker = f"filesystem://{tmp_path / 'broker'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUSTERSEARCH_SECRET")}
    log = open(tmp_path / "node.log", "wb")
    node = subprocess.Popen(
        _worker("--broker", broker, "--name", "filenode", "--concurrency", "1",
                "--secret-file", str(secret), "--cache-dir", str(tmp_path / "cache")),
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        cluster = Cluster(broker, secret="s3cret-shared-by-the-whole-shelf")
        deadline = time.monotonic() + 60
        while not cluster.nodes() and time.monotonic() < deadline:
            time.sleep(0.2)
        search = ClusterGridSearchCV(
            DecisionTreeClassifier(random_state=0), GRID, cv=3, cluster=cluster
        ).fit(X, y)
        assert search.fits_per_node_ == {"filenode": 9}
        assert_ran_on_workers(search, cluster, 9)
        cluster.close()
    finally:
        _kill_group(node)
        log.close()
    assert "NO SECRET" not in Path(tmp_path / "node.log").read_text()


def test_tls_urls_reach_kombu_and_celery_unchanged():
    # What the client and the nodes hand to kombu and Celery (both build
    # their app with create_app): the URLs as given, and TLS transports.
    import ssl

    from redis import SSLConnection

    from clustersearch.wire.config import create_app

    url = "amqps://u:p@broker:5671//"
    app = create_app(url, "rpc://")
    assert app.conf.broker_url == url
    with app.connection_for_write() as conn:
        assert conn.transport_cls == "amqps" and conn.port == 5671
        assert type(conn.transport).__name__ == "SSLTransport"
    url = "rediss://broker:6380/0?ssl_cert_reqs=required"
    app = create_app(url)
    assert app.conf.broker_url == app.conf.result_backend == url
    with app.connection_for_write() as conn:
        assert conn.ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert app.backend.connparams["connection_class"] is SSLConnection
    assert app.backend.connparams["ssl_cert_reqs"] == ssl.CERT_REQUIRED


@pytest.mark.broker
@pytest.mark.parametrize("scheme", ["rediss", "amqps"])
def test_a_search_over_tls(scheme, tmp_path, monkeypatch):
    # RabbitMQ and Redis run here without TLS: a TLS-terminating proxy with a
    # certificate of its own stands in front of one. The client and the
    # nodes must speak TLS to it and verify its certificate.
    from _tlsproxy import TLSProxy, self_signed_certificate
    from conftest import RABBITMQ, REDIS

    from clustersearch.exceptions import BrokerUnreachableError

    require_servers(REDIS if scheme == "rediss" else RABBITMQ)
    cert, key = self_signed_certificate(tmp_path)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    with TLSProxy(6379 if scheme == "rediss" else 5672, cert, key) as proxy:
        if scheme == "rediss":
            untrusting = f"rediss://127.0.0.1:{proxy.port}/10?ssl_cert_reqs=required"
            url, backend = f"{untrusting}&ssl_ca_certs={cert}", None
        else:
            untrusting = url = f"amqps://guest:guest@127.0.0.1:{proxy.port}//"
            backend = "rpc://"
        # Without the certificate's authority: refused, before any search.
        with pytest.raises(BrokerUnreachableError, match="certificate verify failed"):
            Cluster(untrusting, backend, connect_timeout=5).nodes()
        assert proxy.handshakes == 0
        if scheme == "amqps":
            # amqps:// takes its authorities from the default paths (OpenSSL
            # reads SSL_CERT_FILE), in the client and, inherited, the nodes.
            monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        with LocalCluster(n_workers=1, broker_url=url, backend=backend, allow_root=True) as nodes:
            tree = DecisionTreeClassifier(random_state=0)
            search = ClusterGridSearchCV(tree, GRID, cv=3, cluster=nodes).fit(X, y)
            assert_ran_on_workers(search, nodes, 9)
        assert_same_results(search, GridSearchCV(tree, GRID, cv=3).fit(X, y))
        # The client and the node connected through TLS.
        assert proxy.handshakes >= 2, proxy.handshakes


def test_task_messages_stay_small_whatever_the_data_size():
    # Data travels as blobs: even a 20 MB X leaves a small task message.
    from clustersearch.client.blobs import BlobTable
    from clustersearch.wire.serialization import dumps_with_blobs

    payload, refs = dumps_with_blobs((np.zeros((2500, 1000)), np.zeros(2500)), BlobTable())
    assert len(payload) < 1000 and len(refs) == 2



def test_check_versions_false_lets_a_mismatched_node_work(tmp_path, monkeypatch):
    # A real node that reports another joblib (its interpreter imports a
    # sitecustomize that rewrites joblib.__version__): refused by default,
    # served with Cluster(check_versions=False).
    fake = tmp_path / "fake-joblib"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text("import joblib\njoblib.__version__ = '1.3.0'\n")
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(fake), os.environ.get("PYTHONPATH")]))
    )
    with LocalCluster(n_workers=1) as nodes:
        (node,) = nodes.nodes()
        assert node.versions["joblib"] == "1.3.0"
        with Cluster(nodes.broker_url, secret=nodes.secret) as strict:
            with pytest.raises(VersionMismatchError, match=r"has joblib 1\.3\.0.*check_versions=False"):
                ClusterGridSearchCV(DecisionTreeClassifier(), GRID, cluster=strict).fit(X, y)
        tree = DecisionTreeClassifier(random_state=0)
        with Cluster(nodes.broker_url, secret=nodes.secret, check_versions=False) as lenient:
            search = ClusterGridSearchCV(tree, GRID, cv=3, cluster=lenient).fit(X, y)
            assert_ran_on_workers(search, lenient, 9)
        assert_same_results(search, GridSearchCV(tree, GRID, cv=3).fit(X, y))
