#!/usr/bin/env bash
# CI: install clustersearch as a user would and run a real search with it.
#
# Builds the wheel, installs it into a bare virtual environment (no test
# dependencies), checks that without the redis extra a Redis URL gets an
# error naming `pip install 'clustersearch[redis]'`, installs the extra, starts
# two nodes per broker with the `clustersearch worker` CLI from that
# environment, and runs a 4-candidate grid search on iris over (a) RabbitMQ
# with Redis results and (b) Redis alone. Each search must run fits on both of
# its nodes and give scikit-learn's cv_results_.
#
# Needs RabbitMQ (guest on 127.0.0.1:5672) and Redis (127.0.0.1:6379; databases
# 10 and 11), and PyPI (or a mirror) for the dependencies. Where rabbitmqctl
# works, RabbitMQ's part runs in a private vhost, deleted at the end, so that
# nodes of other runs on "/" cannot join. Usage: .ci/install_smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
started=$SECONDS

# Nothing from the caller's environment may reach the venv: not this checkout
# (PYTHONPATH) and no clustersearch setting.
unset PYTHONPATH
for var in $(compgen -e); do
    case $var in CLUSTERSEARCH_*) unset "$var" ;; esac
done
export PIP_DISABLE_PIP_VERSION_CHECK=1

WORK=$(mktemp -d "${TMPDIR:-/tmp}/clustersearch-smoke.XXXXXX")
SUFFIX="$(hostname -s 2>/dev/null || echo host)-$$-$RANDOM"
NODE_PIDS=()
VHOST=""

cleanup() {
    local rc=$?
    set +e
    for pid in "${NODE_PIDS[@]}"; do
        kill -TERM -- "-$pid" 2>/dev/null
    done
    for pid in "${NODE_PIDS[@]}"; do
        for _ in $(seq 100); do
            kill -0 -- "-$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL -- "-$pid" 2>/dev/null
    done
    if [ "$rc" -ne 0 ] && [ -d "$WORK/logs" ]; then
        for log in "$WORK"/logs/*.log; do
            echo "---- last lines of $log"
            tail -n 30 "$log"
        done
    fi
    if [ -n "$VHOST" ]; then
        rabbitmqctl -q delete_vhost "$VHOST" >/dev/null 2>&1
    fi
    rm -rf "$WORK"
    echo "install smoke: $([ "$rc" -eq 0 ] && echo passed || echo FAILED) in $((SECONDS - started)) s"
}
trap cleanup EXIT

step() { echo "install smoke [$((SECONDS - started)) s]: $*"; }

step "building the wheel"
"$PYTHON" -m pip wheel --no-deps -q -w "$WORK/dist" "$ROOT"
WHEEL=$(ls "$WORK"/dist/clustersearch-*.whl)

step "installing $(basename "$WHEEL") into a bare virtual environment"
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
# --no-compile: byte-compiling all of scipy and scikit-learn takes longer
# than the rest of the install; imports compile what they use.
"$VPY" -m pip install -q --no-compile "$WHEEL"
# From here on, run from an empty folder: the checkout must not be importable.
mkdir "$WORK/run" "$WORK/logs"
cd "$WORK/run"
"$VPY" - <<'EOF'
import importlib.util
import sys

import clustersearch

assert clustersearch.__file__.startswith(sys.prefix), clustersearch.__file__
for name in ("pytest", "pandas", "redis"):
    assert importlib.util.find_spec(name) is None, f"{name} is installed in the bare venv"
EOF

step "without the redis extra, Redis URLs name what to install"
"$VPY" - <<'EOF'
from clustersearch import Cluster
from clustersearch.exceptions import MissingDependencyError

for broker, backend in [
    ("redis://127.0.0.1:6379/11", None),
    ("amqp://guest:guest@127.0.0.1:5672//", "redis://127.0.0.1:6379/10"),
]:
    try:
        Cluster(broker, backend).check_connection()
    except MissingDependencyError as exc:
        assert "pip install 'clustersearch[redis]'" in str(exc), exc
    else:
        raise SystemExit(f"{broker} {backend}: no MissingDependencyError")
EOF
if "$WORK/venv/bin/clustersearch" worker --broker redis://127.0.0.1:6379/11 \
    --name "missing-$SUFFIX" --concurrency 1 --allow-root 2>"$WORK/missing.err"; then
    echo "clustersearch worker started without the redis extra" >&2
    exit 1
fi
grep -F "pip install 'clustersearch[redis]'" "$WORK/missing.err"

step "installing clustersearch[redis]"
"$VPY" -m pip install -q --no-compile "clustersearch[redis] @ file://$WHEEL"
"$VPY" -c "import packaging, redis, kombu.transport.redis"
if "$VPY" -c "import pytest" 2>/dev/null; then
    echo "pytest is installed in the bare venv: the install pulled in test dependencies" >&2
    exit 1
fi

AMQP="amqp://guest:guest@127.0.0.1:5672//"
if command -v rabbitmqctl >/dev/null && rabbitmqctl -q add_vhost "cs-smoke-$SUFFIX" >/dev/null 2>&1; then
    VHOST="cs-smoke-$SUFFIX"
    rabbitmqctl -q set_permissions -p "$VHOST" guest ".*" ".*" ".*" >/dev/null
    AMQP="amqp://guest:guest@127.0.0.1:5672/$VHOST"
else
    echo "install smoke: rabbitmqctl unavailable, using the default vhost '/'"
fi
REDIS_RESULTS="redis://127.0.0.1:6379/10"
REDIS_ALONE="redis://127.0.0.1:6379/11"

"$VPY" -c "import secrets; print(secrets.token_hex(32))" >"$WORK/secret"
chmod 600 "$WORK/secret"

start_node() { # name broker [backend]
    local name=$1 broker=$2 backend=${3:-}
    setsid "$WORK/venv/bin/clustersearch" worker --broker "$broker" \
        ${backend:+--backend "$backend"} --name "$name" --concurrency 1 \
        --allow-root --secret-file "$WORK/secret" --cache-dir "$WORK/cache-$name" \
        >"$WORK/logs/$name.log" 2>&1 &
    NODE_PIDS+=("$!")
}

step "starting 4 nodes with the CLI"
start_node "amqp-a-$SUFFIX" "$AMQP" "$REDIS_RESULTS"
start_node "amqp-b-$SUFFIX" "$AMQP" "$REDIS_RESULTS"
start_node "redis-a-$SUFFIX" "$REDIS_ALONE"
start_node "redis-b-$SUFFIX" "$REDIS_ALONE"

step "searching over RabbitMQ with Redis results, and over Redis alone"
CLUSTERSEARCH_SECRET_FILE="$WORK/secret" "$VPY" - "$SUFFIX" "$AMQP" "$REDIS_RESULTS" "$REDIS_ALONE" <<'EOF'
import sys
import time

import numpy as np
from sklearn.datasets import load_iris
from sklearn.model_selection import GridSearchCV
from sklearn.svm import SVC

from clustersearch import Cluster, ClusterGridSearchCV
from clustersearch.datasets import load_adult

suffix, amqp, redis_results, redis_alone = sys.argv[1:]
X, y = load_iris(return_X_y=True)
grid = {"C": [0.1, 1.0], "gamma": ["scale", 0.1]}  # 4 candidates, 12 fits
ref = GridSearchCV(SVC(), grid, cv=3).fit(X, y)
TIMES = {"mean_fit_time", "std_fit_time", "mean_score_time", "std_score_time"}

for label, broker, backend in [
    ("amqp", amqp, redis_results),
    ("redis", redis_alone, None),
]:
    names = {f"{label}-a-{suffix}", f"{label}-b-{suffix}"}
    with Cluster(broker, backend, progress=False) as cluster:
        deadline = time.monotonic() + 120
        while not names <= {n.name for n in cluster.nodes()}:
            if time.monotonic() > deadline:
                raise SystemExit(f"{label}: nodes {sorted(names)} did not answer in 120 s")
            time.sleep(0.5)
        search = ClusterGridSearchCV(SVC(), grid, cv=3, cluster=cluster).fit(X, y)
    fits = search.fits_per_node_
    assert set(fits) == names and min(fits.values()) > 0, (label, fits)
    assert sum(fits.values()) == 12, (label, fits)
    ours, theirs = search.cv_results_, ref.cv_results_
    assert set(ours) == set(theirs), label
    for key in set(theirs) - TIMES:
        if key == "params":
            assert ours[key] == theirs[key], (label, key)
        else:
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=f"{label} {key}")
    assert search.best_params_ == ref.best_params_, label
    print(f"  {label}: fits per node {fits}, cv_results_ equal to GridSearchCV's")

X, y = load_adult()  # the copy shipped in the wheel
assert X.shape == (32561, 105) and int(y.sum()) == 7841, (X.shape, int(y.sum()))
print("  load_adult(): the packaged UCI Adult copy, 32561 x 105")
EOF
