"""The private upstream APIs clustersearch relies on (clustersearch._compat).

Each test names the API it checks: when an upgrade of scikit-learn, joblib,
Celery or kombu breaks one, the failure says which, and where it is used.
"""

import inspect

import numpy as np
import pytest
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.svm import SVC

from clustersearch import _compat


def test_every_private_api_is_listed_with_the_versions_it_was_checked_against():
    assert set(_compat.CHECKED_WITH) == {"scikit-learn", "joblib", "celery", "kombu", "billiard"}
    assert len(_compat.PRIVATE_APIS) >= 10


def test_sklearn_FuncWrapper_wraps_every_delayed_call():
    from sklearn.utils.parallel import delayed

    assert _compat.FuncWrapper is not None, "sklearn.utils.parallel._FuncWrapper is gone"
    func, args, kwargs = delayed(sum)([1, 2])
    assert type(func) is _compat.FuncWrapper, "sklearn.utils.parallel._FuncWrapper changed"
    assert "__doc__" in vars(func), "_FuncWrapper no longer copies the docstring"


def test_sklearn_CallbackContext_children_map():
    assert _compat.CallbackContext is not None, "sklearn.callback.CallbackContext is gone"
    search = GridSearchCV(SVC(), {"C": [1, 2]})
    root = _compat.CallbackContext._from_estimator(
        search, task_name="fit", task_id=0, max_subtasks=None, sequential_subtasks=False
    )
    child = root.subcontext(task_name="candidate-split-evaluation", task_id=0)
    assert child.parent is root
    assert "_children_map" in vars(root), "CallbackContext._children_map is gone"
    stripped = _compat.strip_callback_siblings(root)
    assert stripped is not None and stripped["_children_map"] == {}


def test_sklearn_fit_and_score_signature():
    params = inspect.signature(_compat.fit_and_score()).parameters
    for name in ("estimator", "X", "y", "scorer", "train", "test", "error_score",
                 "callback_ctx", "caller"):  # fmt: skip
        assert name in params, f"_fit_and_score lost its {name!r} parameter"


def test_joblib_backend_classes():
    jb = _compat.joblib_backends()
    for name in ("ParallelBackendBase", "AutoBatchingMixin", "FallbackToBackend",
                 "LokyBackend", "SequentialBackend", "ThreadingBackend"):  # fmt: skip
        assert hasattr(jb, name), f"joblib._parallel_backends.{name} is gone"
    base = jb.ParallelBackendBase
    for method in ("submit", "retrieve_result_callback", "configure", "abort_everything",
                   "get_nested_backend", "effective_n_jobs"):  # fmt: skip
        assert hasattr(base, method), f"ParallelBackendBase.{method} is gone"


def test_joblib_get_active_backend():
    from joblib import parallel_config

    with parallel_config(backend="threading", n_jobs=2):
        backend, n_jobs = _compat.get_active_backend()
    assert type(backend).__name__ == "ThreadingBackend" and n_jobs == 2


def test_joblib_BatchedCalls_items_and_size():
    from joblib.parallel import BatchedCalls

    batch = BatchedCalls(
        [(abs, (-1,), {}), (abs, (-2,), {})], ("sequential", 1), reducer_callback=None
    )
    calls = _compat.batch_calls(batch)
    assert calls is not None and len(calls) == 2, "BatchedCalls.items changed"
    part = _compat.batch_with_calls(batch, calls[1:])
    assert part() == [2] and len(part) == 1, "BatchedCalls._size changed"


def test_celery_maybe_set_cache_sets_a_polled_result():
    from celery import Celery

    app = Celery("compat-test", set_as_current=False)
    app.conf.update(result_backend="cache+memory://")
    result = app.AsyncResult("t1")
    _compat.set_result_from_meta(
        result, {"status": "SUCCESS", "result": 42, "traceback": None, "children": []}
    )
    assert result.state == "SUCCESS" and result.result == 42, "AsyncResult._maybe_set_cache changed"


def test_celery_result_consumer_connection():
    from celery.backends.asynchronous import BaseResultConsumer

    source = inspect.getsource(BaseResultConsumer) + inspect.getsource(
        __import__("celery.backends.rpc", fromlist=["ResultConsumer"]).ResultConsumer
    )
    assert "_connection" in source, "rpc:// ResultConsumer._connection is gone"


def test_celery_worker_lost_error_is_billiards():
    from celery.exceptions import WorkerLostError

    assert WorkerLostError is _compat.WorkerLostError


def test_celery_rpc_backend_check():
    from celery import Celery

    app = Celery("compat-test", set_as_current=False)
    app.conf.update(broker_url="memory://", result_backend="rpc://")
    assert _compat.is_rpc_backend(app.backend)
    other = Celery("compat-test2", set_as_current=False)
    other.conf.update(result_backend="cache+memory://")
    assert not _compat.is_rpc_backend(other.backend)


def test_celery_asynpool_timers_and_maintain_pool():
    AsynPool, TaskPool = _compat.prefork_pool_classes()
    assert isinstance(inspect.getattr_static(AsynPool, "timers"), property), (
        "celery.concurrency.asynpool.AsynPool.timers is no longer a property"
    )
    assert hasattr(AsynPool, "maintain_pool"), "AsynPool.maintain_pool is gone"
    assert hasattr(TaskPool, "Pool"), "celery.concurrency.prefork.TaskPool.Pool is gone"


def test_celery_worker_state():
    waiting, running, started = _compat.worker_pool_state()
    assert (waiting, running) == (False, 0) and isinstance(started, int)


def test_kombu_filesystem_put_and_celery_filesystem_backend():
    from celery.backends.filesystem import FilesystemBackend
    from celery.backends.rpc import RPCBackend
    from kombu.transport import filesystem

    assert hasattr(filesystem.Channel, "_put"), "kombu filesystem Channel._put is gone"
    assert hasattr(FilesystemBackend, "_filename"), "FilesystemBackend._filename is gone"
    assert hasattr(FilesystemBackend, "set"), "FilesystemBackend.set is gone"
    assert hasattr(RPCBackend, "on_task_call"), "RPCBackend.on_task_call is gone"


@pytest.mark.parametrize("n_splits", [2])
def test_search_passes_caller_to_every_fit(n_splits):
    """clustersearch sends ``caller`` as None: scikit-learn must pass the
    search as ``caller=`` by keyword (checked by capturing the calls)."""
    from joblib import parallel_config

    seen = []

    class Capture(_compat.joblib_backends().ThreadingBackend):
        def submit(self, func, callback=None):
            for _func, _args, kwargs in _compat.batch_calls(func):
                seen.append(kwargs.get("caller"))
            return super().submit(func, callback)

    X = np.random.RandomState(0).normal(size=(20, 2))
    y = np.arange(20) % 2
    search = GridSearchCV(SVC(), {"C": [1, 2]}, cv=KFold(n_splits), n_jobs=2)
    with parallel_config(backend=Capture()):
        search.fit(X, y)
    assert seen and all(c is search for c in seen), "scikit-learn no longer passes caller="


def test_atexit_run_exitfuncs_runs_the_handlers():
    import subprocess
    import sys

    code = (
        "import atexit, os\n"
        "from clustersearch._compat import run_exit_handlers\n"
        "atexit.register(print, 'handler ran')\n"
        "run_exit_handlers()\n"
        "os._exit(0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout == "handler ran\n", "atexit._run_exitfuncs changed"


def test_celery_active_requests_counts():
    assert _compat.running_fits() == 0
def test_celery_pidbox_handlers_of_a_worker_consumer():
    # A real (unstarted) worker of a node app: its mailbox gets the guarded
    # handler table; Celery's global table is left alone.
    import celery._state
    from celery.worker.control import Panel

    from clustersearch.node.app import create_node_app
    from clustersearch.node.settings import NodeSettings

    app = create_node_app("memory://", settings=NodeSettings(secret=b"s" * 32))
    blocks = celery._state.task_join_will_block()
    try:
        worker = app.WorkController(pool_cls="solo", hostname="compat@test", concurrency=1)
    finally:
        # Building a worker tells Celery this process runs tasks, and every
        # later AsyncResult.get() in the test session would refuse to wait.
        celery._state._set_task_join_will_block(blocks)
    node = _compat.pidbox_node(worker.consumer)
    assert node is not None, "the consumer's Control step no longer has .box.node"
    assert isinstance(node.handlers, dict), "kombu.pidbox.Node.handlers is no longer a dict"
    for name in ("shutdown", "cancel_consumer", "revoke", "terminate"):
        assert node.handlers[name] is not Panel.data[name], name
        assert Panel.data[name].__module__ == "celery.worker.control", name
    for name in ("ping", "stats", "active", "active_queues", "registered", "clustersearch_info"):
        assert node.handlers[name] is Panel.data[name], name
    kinds = _compat.control_commands()
    assert kinds["shutdown"] == "control" and kinds["ping"] == "inspect", (
        "celery.worker.control.Panel.meta no longer gives each command's type"
    )


def test_celery_revoke_and_filter_hidden_settings():
    from celery.worker.control import revoke

    params = inspect.signature(revoke).parameters
    for name in ("state", "task_id", "terminate", "signal"):
        assert name in params, f"celery.worker.control.revoke lost its {name!r} parameter"
    masked = _compat.hidden_settings_filtered(
        {"broker_url": "amqp://user:pw@host//", "clustersearch_secret": "x"}
    )
    assert "pw" not in masked["broker_url"] and masked["clustersearch_secret"] != "x"


def test_sklearn_param_validation_constraints_reject_what_they_exclude():
    from sklearn.utils._param_validation import InvalidParameterError

    from clustersearch import ClusterRandomForestClassifier

    for bad in ({"keep": "disk"}, {"replicas": 0}):
        with pytest.raises(InvalidParameterError, match=next(iter(bad))):
            ClusterRandomForestClassifier(**bad).fit([[0.0], [1.0]], [0, 1])


def test_sklearn_safe_split_and_check_response_method():
    from sklearn.linear_model import LogisticRegression
    from sklearn.tree import DecisionTreeRegressor

    X = np.arange(20.0).reshape(10, 2)
    Xs, ys = _compat.safe_split(SVC(), X, None, np.array([1, 3]), np.array([0, 2]))
    np.testing.assert_array_equal(Xs, X[[1, 3]])
    assert ys is None
    order = ["predict_proba", "decision_function", "predict"]
    lr = LogisticRegression()
    assert _compat.response_method(lr, order).__name__ == "predict_proba"
    assert _compat.response_method(SVC(), order).__name__ == "decision_function"
    assert _compat.response_method(DecisionTreeRegressor(), ["predict"]).__name__ == "predict"
    with pytest.raises(AttributeError):
        _compat.response_method(DecisionTreeRegressor(), ["predict_proba"])


def test_sklearn_fit_and_score_returns_the_estimator_when_asked():
    X = np.random.RandomState(0).normal(size=(20, 2))
    y = np.arange(20) % 2
    from sklearn.metrics import check_scoring

    estimator = SVC()
    result = _compat.fit_and_score()(
        estimator, X, y, scorer=check_scoring(estimator), train=np.arange(10),
        test=np.arange(10, 20), verbose=0, parameters=None, fit_params=None,
        score_params=None, return_estimator=True,
    )  # fmt: skip
    assert "estimator" in result and hasattr(result["estimator"], "support_")


def test_search_checked_cv_and_evaluate_candidates_cv_argument():
    """ensemble() records a search's splits by passing a recording splitter
    as evaluate_candidates' ``cv``, defaulting to ``_checked_cv_orig``."""
    seen = {}

    class Recording(GridSearchCV):
        def _run_search(self, evaluate_candidates, *, callback_ctx=None):
            seen["cv"] = _compat.search_cv(self)
            assert "cv" in inspect.signature(evaluate_candidates).parameters
            return super()._run_search(evaluate_candidates, callback_ctx=callback_ctx)

    X = np.random.RandomState(0).normal(size=(20, 2))
    y = np.arange(20) % 2
    Recording(SVC(), {"C": [1]}, cv=KFold(2)).fit(X, y)
    assert isinstance(seen["cv"], KFold), "BaseSearchCV._checked_cv_orig is gone"
