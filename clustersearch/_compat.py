"""Every private API of scikit-learn, joblib, Celery and kombu that
clustersearch uses, in one place.

Each entry says what it is, why we need it and the versions it was checked
against (:data:`CHECKED_WITH`). ``tests/test_compat.py`` checks each one on
the installed versions and fails naming the API when an upgrade breaks it.
Nothing here imports Celery's worker side (its pool, its worker state) until
a node asks for it: the client never loads them.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CHECKED_WITH",
    "PRIVATE_APIS",
    "CallbackContext",
    "FuncWrapper",
    "Interval",
    "StrOptions",
    "WorkerLostError",
    "batch_calls",
    "broadcast_until",
    "batch_with_calls",
    "build_forest_part",
    "search_cv",
    "safe_split",
    "response_method",
    "celery_revoke",
    "control_commands",
    "fit_and_score",
    "forest_part_sums",
    "forest_seeds",
    "get_active_backend",
    "hidden_settings_filtered",
    "is_rpc_backend",
    "joblib_backends",
    "pidbox_node",
    "prefork_pool_classes",
    "result_consumer_connection",
    "run_exit_handlers",
    "running_fits",
    "set_result_from_meta",
    "strip_callback_siblings",
    "validate_forest_X",
    "worker_pool_state",
    "worker_task_counts",
]

CHECKED_WITH = {
    "scikit-learn": "1.9.1",
    "joblib": "1.6.0",
    "celery": "5.7.0",
    "kombu": "5.7.0",
    "billiard": "4.3.2",
}

# name -> (what we use it for). tests/test_compat.py checks each.
PRIVATE_APIS = {
    "sklearn.utils.parallel._FuncWrapper": "the wrapper scikit-learn's delayed() puts "
    "around every call; its copied docstring is left out of task messages",
    "sklearn.callback.CallbackContext._children_map": "a call's callback context maps "
    "all its siblings; task messages carry only the path to the root",
    "sklearn.model_selection._validation._fit_and_score": "a fit lost on every try "
    "becomes scikit-learn's own error_score entry",
    "sklearn.model_selection._validation._fit_and_score(return_estimator=True)": "a "
    "search with keep_predictions predicts its test fold with the fitted estimator",
    "sklearn.utils.metaestimators._safe_split": "the test fold of a kept prediction, "
    "split as _fit_and_score splits it",
    "sklearn.utils.validation._check_response_method": "a kept prediction uses the "
    "method StackingClassifier's stack_method='auto' picks",
    "BaseSearchCV._checked_cv_orig, evaluate_candidates(candidate_params, cv)": "a "
    "search records the splits its fits used (for ensemble)",
    "joblib._parallel_backends (ParallelBackendBase, AutoBatchingMixin, "
    "FallbackToBackend, LokyBackend, SequentialBackend, ThreadingBackend)": "the "
    "joblib backend and its local fallbacks",
    "joblib.parallel.get_active_backend": "a search finds its cluster backend",
    "joblib.parallel.BatchedCalls.items/_size": "a batch whose worker died is retried "
    "call by call",
    "celery.result.AsyncResult._maybe_set_cache": "results of polled backends "
    "(file://) are set on their AsyncResult",
    "celery.backends.asynchronous.BaseResultConsumer._connection": "an rpc:// "
    "consumer that reconnected lost what was published meanwhile",
    "celery.concurrency.asynpool.AsynPool.timers/maintain_pool": "nodes look for "
    "dead pool processes every 0.5 s instead of 5 s",
    "celery.worker.state (reserved_requests, active_requests, all_total_count)": "a "
    "node reports a pool that starts nothing",
    "kombu.transport.filesystem.Channel._put": "the embedded transport writes "
    "messages atomically",
    "celery.backends.filesystem.FilesystemBackend.set/_filename": "file:// results "
    "are written atomically",
    "celery.backends.rpc.RPCBackend.on_task_call": "rpc:// declares its reply queue "
    "once per channel, not once per task",
    "atexit._run_exitfuncs": "a node that has shut down runs its exit handlers, "
    "then skips the interpreter's slow teardown",
    "celery.worker.state.active_requests (after SIGTERM)": "a node's bounded warm "
    "shutdown waits for the running fits first",
    "celery.worker.consumer Control step .box.node.handlers, "
    "celery.worker.control.Panel.meta": "nodes refuse Celery's state-changing remote "
    "control (shutdown, cancel_consumer...) unless the operator allows it",
    "celery.worker.control.revoke, celery.app.utils.filter_hidden_settings": "the "
    "signed clustersearch_revoke does what revoke does; inspect conf is masked",
    "sklearn.utils._param_validation.Interval, StrOptions": "the constraints of "
    "keep= and replicas= in scikit-learn's own parameter validation",
    "sklearn.ensemble BaseEnsemble._make_estimator, _forest._accumulate_prediction, "
    "BaseForest._validate_X_predict": "a forest kept on the nodes builds its parts "
    "from the client's seeds with scikit-learn's own fit, and sums their outputs "
    "as scikit-learn's predict does",
}

# -- scikit-learn ---------------------------------------------------------------

# Parameter constraints of our estimators' own parameters, in scikit-learn's
# validation (the same one its estimators use).
from sklearn.utils._param_validation import Interval, StrOptions  # noqa: E402

try:
    from sklearn.utils.parallel import _FuncWrapper as FuncWrapper
except ImportError:  # pragma: no cover - another scikit-learn
    FuncWrapper = None

try:  # scikit-learn >= 1.9: every _fit_and_score call gets a callback context
    from sklearn.callback import CallbackContext
except ImportError:  # pragma: no cover - scikit-learn < 1.9
    CallbackContext = None


def strip_callback_siblings(context: Any) -> dict[str, Any] | None:
    """The state of a callback context without its children map, or None
    when it has none to strip."""
    state = vars(context)
    if not state.get("_children_map"):
        return None
    return {**state, "_children_map": {}}


def fit_and_score() -> Any:
    """scikit-learn's ``_fit_and_score``."""
    from sklearn.model_selection._validation import _fit_and_score

    return _fit_and_score


def forest_seeds(random_state: Any, n_trees: int) -> list[int]:
    """The seeds scikit-learn's ``BaseForest.fit`` gives its ``n_trees``
    trees: one ``randint(MAX_INT)`` per tree from ``check_random_state``, in
    order (``BaseEnsemble._make_estimator`` through ``_set_random_states``)."""
    import numpy as np
    from sklearn.utils import check_random_state

    rng = check_random_state(random_state)
    return [int(rng.randint(np.iinfo(np.int32).max)) for _ in range(n_trees)]


def build_forest_part(
    estimator: Any,
    seeds: list[int],
    X: Any,
    y: Any,
    sample_weight: Any = None,
    fit_params: dict[str, Any] | None = None,
) -> Any:
    """A fitted copy of forest ``estimator`` whose trees are those that
    scikit-learn's ``fit`` builds with ``seeds``, in order.

    scikit-learn's own ``fit`` runs, unchanged, on a clone with
    ``n_estimators=len(seeds)``; only ``_make_estimator`` is replaced, on the
    instance, so that the i-th tree gets ``seeds[i]`` (instead of a draw from
    the forest's ``random_state``), as ``_set_random_states`` sets it.
    """
    from sklearn.base import clone

    part = clone(estimator).set_params(
        n_estimators=len(seeds), warm_start=False, oob_score=False, n_jobs=None
    )
    make = part._make_estimator
    left = iter(seeds)

    def seeded(append: bool = True, random_state: Any = None) -> Any:
        tree = make(append=False, random_state=None)
        keys = [k for k in tree.get_params(deep=True) if k.endswith("random_state")]
        if len(keys) != 1:  # pragma: no cover - not a scikit-learn tree
            raise TypeError(f"cannot seed {type(tree).__name__}: random_state params {keys}")
        tree.set_params(**{keys[0]: next(left)})
        if append:  # pragma: no cover - BaseForest.fit asks with append=False
            part.estimators_.append(tree)
        return tree

    part._make_estimator = seeded
    try:
        part.fit(X, y, sample_weight=sample_weight, **(fit_params or {}))
    finally:
        del part._make_estimator
    if len(part.estimators_) != len(seeds):  # pragma: no cover - another scikit-learn
        raise RuntimeError("scikit-learn's forest fit did not build one tree per seed")
    return part


def forest_part_sums(part: Any, X: Any, method: str) -> list[Any]:
    """The sum of the trees' ``method`` ("predict_proba" or "predict")
    outputs on validated ``X``, one float64 array per output, added tree by
    tree with scikit-learn's ``_accumulate_prediction`` (what its forests'
    predict methods do before dividing by the number of trees)."""
    import threading

    import numpy as np
    from sklearn.ensemble._forest import _accumulate_prediction

    n = X.shape[0]
    if method == "predict_proba":
        out = [np.zeros((n, j), dtype=np.float64) for j in np.atleast_1d(part.n_classes_)]
    elif part.n_outputs_ > 1:
        out = [np.zeros((n, part.n_outputs_), dtype=np.float64)]
    else:
        out = [np.zeros(n, dtype=np.float64)]
    lock = threading.Lock()
    for tree in part.estimators_:
        _accumulate_prediction(getattr(tree, method), X, out, lock)
    return out


def validate_forest_X(shell: Any, X: Any) -> Any:
    """``X`` as forest ``shell`` (fitted, without its trees) predicts on it:
    scikit-learn's ``BaseForest._validate_X_predict``, which looks at the
    first tree only for its tags (an unfitted copy stands in)."""
    import copy

    view = copy.copy(shell)
    view.estimators_ = [shell._make_estimator(append=False)]
    return view._validate_X_predict(X)
def safe_split(estimator: Any, X: Any, y: Any, indices: Any, train_indices: Any = None) -> Any:
    """scikit-learn's ``_safe_split``: rows ``indices`` of X and y, as a fit
    and score call splits them (pairwise kernels included)."""
    from sklearn.utils.metaestimators import _safe_split

    return _safe_split(estimator, X, y, indices, train_indices)


def response_method(estimator: Any, methods: list[str]) -> Any:
    """The first of ``methods`` that ``estimator`` has, as a bound method
    (``_check_response_method``; AttributeError when none)."""
    from sklearn.utils.validation import _check_response_method

    return _check_response_method(estimator, methods)


def search_cv(search: Any) -> Any:
    """The splitter a fitting search checked (``_checked_cv_orig``): what its
    ``evaluate_candidates`` splits with when given no ``cv``."""
    return search._checked_cv_orig


# -- joblib -----------------------------------------------------------------------


def joblib_backends() -> Any:
    """joblib's backend base classes and its local backends, as a namespace."""
    from joblib import _parallel_backends

    return _parallel_backends


def get_active_backend() -> Any:
    """The joblib backend active in this thread, and its n_jobs."""
    from joblib.parallel import get_active_backend as active

    return active()


def batch_calls(batch: Any) -> list[Any] | None:
    """The ``(func, args, kwargs)`` calls of a joblib batch, or None."""
    items = getattr(batch, "items", None)
    return items if isinstance(items, list) else None


def batch_with_calls(batch: Any, items: list[Any]) -> Any:
    """A copy of joblib batch ``batch`` holding ``items`` only."""
    import copy

    part = copy.copy(batch)
    part.items = list(items)
    part._size = len(items)
    return part


# -- Celery -----------------------------------------------------------------------

from billiard.exceptions import WorkerLostError  # noqa: E402


def is_rpc_backend(backend: Any) -> bool:
    """Whether ``backend`` is Celery's rpc:// backend (or ours)."""
    from celery.backends.rpc import RPCBackend

    return isinstance(backend, RPCBackend)


def broadcast_until(
    app: Any,
    command: str,
    arguments: dict[str, Any],
    timeout: float,
    on_reply: Any,
    destination: list[str] | None = None,
) -> None:
    """Broadcast a remote-control ``command`` and hand each reply to
    ``on_reply(body)``, until ``timeout`` seconds have passed or the time
    (``time.monotonic()``) that ``on_reply`` last returned.

    Celery's ``broadcast(reply=True)`` waits ``timeout`` after the last reply
    unless told how many to expect (``limit``), and then takes the first
    ``limit`` whatever they are; a reply that comes later (or one of an
    earlier broadcast) is kept in the mailbox's ``unclaimed`` forever. Here
    the caller decides when it has heard enough (every node it expects), and
    replies of other broadcasts are dropped. Uses kombu's ``Mailbox``
    internals (``_publish``, ``reply_queue``), as Celery does.
    """
    import time

    from kombu import Consumer
    from kombu.utils.uuid import uuid

    stop = float("inf")
    ticket = uuid()
    with app.connection_or_acquire() as conn:
        mailbox = app.control.mailbox(conn)
        channel = conn.default_channel

        def received(body: Any, message: Any) -> None:
            nonlocal stop
            headers = message.headers or {}
            expires = headers.get("expires")
            if headers.get("ticket") != ticket or (expires and time.time() > expires):
                return  # another broadcast's reply, or a stale one: dropped
            until = on_reply(body)
            if until is not None:
                stop = min(stop, until)

        consumer = Consumer(channel, [mailbox.reply_queue], accept=mailbox.accept, no_ack=True)
        consumer.register_callback(received)
        with consumer:
            mailbox._publish(command, arguments, destination=destination, reply_ticket=ticket,
                             channel=channel, timeout=timeout)  # fmt: skip
            # Counted from the request's departure, as Celery counts it.
            stop = min(stop, time.monotonic() + timeout)
            while True:
                left = stop - time.monotonic()
                if left <= 0:
                    return
                try:
                    conn.drain_events(timeout=left)
                except TimeoutError:  # socket.timeout
                    return


def set_result_from_meta(result: Any, meta: dict[str, Any]) -> None:
    """Give a polled AsyncResult the state and value of ``meta``."""
    result._maybe_set_cache(meta)


def result_consumer_connection(backend: Any) -> Any:
    """The connection an async result consumer (rpc://) reads from, or None."""
    return getattr(backend.result_consumer, "_connection", None)


def prefork_pool_classes() -> tuple[Any, Any]:
    """Celery's event-loop pool and prefork TaskPool (node side only)."""
    from celery.concurrency import asynpool, prefork

    return asynpool.AsynPool, prefork.TaskPool


def worker_pool_state() -> tuple[bool, int, int]:
    """In a node's main process: whether a reserved task waits to start, how
    many run, and how many have started since the node began."""
    from celery.worker import state

    waiting = any(r.time_start is None for r in list(state.reserved_requests))
    return waiting, len(state.active_requests), state.all_total_count[0]


def worker_task_counts() -> tuple[int, int]:
    """In a node's main process: how many tasks its pool runs, and how many
    it holds that have not started."""
    from celery.worker import state

    active = list(state.active_requests)
    waiting = sum(1 for r in list(state.reserved_requests) if r not in active)
    return len(active), waiting


def running_fits() -> int:
    """In a node's main process: how many tasks its pool runs."""
    from celery.worker import state

    return len(state.active_requests)


def run_exit_handlers() -> None:
    """Run the interpreter's exit handlers now (before ``os._exit``)."""
    import atexit

    atexit._run_exitfuncs()
# -- Celery's remote control (node side only) ---------------------------------------


def pidbox_node(consumer: Any) -> Any:
    """The kombu mailbox Node that dispatches a worker consumer's remote
    control commands (its ``handlers`` dict, name -> function(state, **kw)),
    or None when remote control is off."""
    for step in getattr(consumer.blueprint, "order", ()):
        box = getattr(step, "box", None)
        if box is not None and hasattr(getattr(box, "node", None), "handlers"):
            return box.node
    return None


def control_commands() -> dict[str, str]:
    """Every remote-control command Celery registered: name -> 'control' or
    'inspect' (``celery.worker.control.Panel.meta``)."""
    from celery.worker.control import Panel

    return {name: meta.type for name, meta in Panel.meta.items()}


def celery_revoke(state: Any, task_ids: list[str], signal: str) -> Any:
    """What Celery's own ``revoke(terminate=True)`` does on a node: mark the
    tasks revoked in ``celery.worker.state`` and terminate those running."""
    from celery.worker.control import revoke

    return revoke(state, task_ids, terminate=True, signal=signal)


def hidden_settings_filtered(conf: Any) -> Any:
    """A configuration mapping with passwords, keys and URL credentials
    masked (``celery.app.utils.filter_hidden_settings``)."""
    from celery.app.utils import filter_hidden_settings

    return filter_hidden_settings(conf)
