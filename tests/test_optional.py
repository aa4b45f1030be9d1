"""A missing optional dependency gets an error that says what to install.

Each case runs in a fresh interpreter where ``redis`` or ``packaging`` cannot
be imported (``sys.modules[name] = None`` makes ``import name`` fail, as in a
virtual environment without ``clustersearch[redis]``; kombu 5.7's Redis
transport imports ``packaging``). ``.ci/install_smoke.sh`` checks the same in a
real bare virtual environment.
"""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import RABBITMQ, REDIS, require_servers

import clustersearch
from clustersearch.exceptions import ClusterSearchError, MissingDependencyError

# Database 9: no other test uses it.
REDIS_URL = REDIS + "/9"
ROOT = Path(clustersearch.__file__).resolve().parents[1]
INSTALL = "pip install 'clustersearch[redis]'"

_CLIENT = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # import fails, as where it is not installed
from clustersearch import Cluster
from clustersearch.exceptions import ClusterSearchError, MissingDependencyError
for broker, backend in {cases!r}:
    try:
        with Cluster(broker, backend) as cluster:
            cluster.check_connection()
    except MissingDependencyError as exc:
        assert isinstance(exc, ImportError) and isinstance(exc, ClusterSearchError)
        print("MISSING", exc)
    else:
        print("CONNECTED")
"""


def _python(code, *args, timeout=120):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUSTERSEARCH_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _client(blocked, *cases):
    """One line per (broker, backend) case, in one fresh interpreter."""
    proc = _python(_CLIENT.format(blocked=blocked, cases=cases))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == len(cases), proc.stdout
    return lines


@pytest.mark.parametrize("module", ["redis", "packaging"])
def test_client_names_what_to_install(module):
    broker, backend, secret = (
        _client([module], (REDIS_URL, None), (RABBITMQ, REDIS_URL),
                ("redis://:hunter2@127.0.0.1:6379/9", None))
    )  # fmt: skip
    for out, role in ((broker, "broker"), (backend, "result backend")):
        assert out.startswith("MISSING"), out
        assert INSTALL in out
        assert f"the Redis {role} " in out
        assert f"package {module!r}" in out
        assert "Check that" not in out  # not a connection problem
    assert secret.startswith("MISSING"), secret
    assert "hunter2" not in secret
    assert "'redis://127.0.0.1:6379/9'" in secret


@pytest.mark.broker
def test_positive_controls():
    """Without Redis's packages RabbitMQ alone still works; with them the
    same Redis URLs connect, so the failures above come from the block."""
    require_servers(RABBITMQ, REDIS_URL)
    assert _client(["redis", "packaging"], (RABBITMQ, "rpc://")) == ["CONNECTED"]
    assert _client([], (REDIS_URL, None), (RABBITMQ, REDIS_URL)) == ["CONNECTED"] * 2


_WORKER = """
import sys
sys.modules[sys.argv[1]] = None
from clustersearch.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("module", ["redis", "packaging"])
@pytest.mark.parametrize(
    "urls",
    [["--broker", REDIS_URL], ["--broker", RABBITMQ, "--backend", REDIS_URL]],
    ids=["redis-broker", "redis-backend"],
)
def test_worker_names_what_to_install(module, urls, tmp_path):
    proc = _python(
        _WORKER,
        module,
        "worker",
        *urls,
        "--name",
        f"missing{os.getpid()}",
        "--concurrency",
        "1",
        "--allow-root",
        "--cache-dir",
        str(tmp_path),
        timeout=60,
    )
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith("clustersearch worker: the Redis "), proc.stderr
    assert INSTALL in proc.stderr
    assert f"package {module!r}" in proc.stderr
    assert "Traceback" not in proc.stderr


_CHAIN = """
import sys
sys.modules["packaging"] = None
from kombu import Connection
from clustersearch._optional import missing_dependency
url = sys.argv[1]
try:
    Connection(url, connect_timeout=5).ensure_connection(max_retries=1, timeout=5)
except Exception as exc:
    error = missing_dependency(exc, url, "broker")
    print(type(error).__name__, error)
    # Another URL scheme or an unrelated error is not a missing dependency.
    assert missing_dependency(exc, "amqp://127.0.0.1//", "broker") is None
    assert missing_dependency(ValueError("x"), url, "broker") is None
else:
    print("CONNECTED")
"""


def test_import_error_in_a_connection_attempt_is_recognised():
    """The fallback for an ImportError raised by kombu itself, however deep."""
    proc = _python(_CHAIN, REDIS_URL)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.strip()
    assert out.startswith("MissingDependencyError "), out
    assert INSTALL in out


def test_error_pickles_with_its_message():
    error = MissingDependencyError(f"needs 'redis': {INSTALL}")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is MissingDependencyError
    assert str(copy) == str(error)
    assert isinstance(copy, ImportError) and isinstance(copy, ClusterSearchError)
