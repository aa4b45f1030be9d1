"""The joblib backend: every ``Parallel`` batch it accepts runs on the cluster.

joblib's ``Parallel`` owns batching and pre-dispatch; this backend only says
where a batch runs (a :class:`~clustersearch.client.session.Session`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._compat import joblib_backends

if TYPE_CHECKING:
    from concurrent.futures import Future

    from .session import Session

_jb = joblib_backends()
AutoBatchingMixin = _jb.AutoBatchingMixin
FallbackToBackend = _jb.FallbackToBackend
LokyBackend = _jb.LokyBackend
ParallelBackendBase = _jb.ParallelBackendBase
SequentialBackend = _jb.SequentialBackend
ThreadingBackend = _jb.ThreadingBackend

__all__ = ["ClusterBackend"]

# scikit-learn's (and joblib's) default pre_dispatch of a search's Parallel.
_DEFAULT_PRE_DISPATCH = "2*n_jobs"
# With longest_first, a search's fits go in batches such that each process
# gets about this many (see ClusterBackend.expect_calls).
_BATCHES_PER_PROCESS = 32


class ClusterBackend(AutoBatchingMixin, ParallelBackendBase):  # type: ignore[misc,valid-type]
    """Runs joblib batches on the nodes of a session.

    Parameters
    ----------
    session : Session
    first_only : bool, default=False
        Accept only the first ``Parallel`` configured with this backend (a
        search's own), and hand every later one (the refit's, which
        scikit-learn runs in the client) to joblib's local backends.
    accept_threads : bool, default=False
        Accept a ``Parallel`` that says ``prefer="threads"`` (a forest's
        tree building) instead of running it locally in threads. One that
        says ``require="sharedmem"`` (a forest's predict) still stays local.
    max_result_bytes : int, default=None
        Once results have come back, batch at most as many calls as keep a
        batch's result under this many bytes (at the largest bytes per call
        seen): results travel as one message each, and brokers cap message
        sizes (RabbitMQ 4: 16 MiB). None: joblib's auto-batching alone.
    later : callable, default=None
        With ``first_only``: ``later()`` gives the backend for each later
        ``Parallel`` (None: joblib's local backends, as without it). The
        stacking estimators use it to run a ``Parallel`` in the client whose
        calls' own ``Parallel`` calls run on the nodes.

    Notes
    -----
    ``n_jobs`` does not limit the cluster: a call's parallelism is the
    nodes' total concurrency, and it never drops to joblib's in-client
    sequential path, which would bypass the backend. ``Parallel`` calls that
    ask for threads or shared memory run locally in threads: they hold
    fine-grained work on shared objects that cannot cross hosts.
    """

    supports_retrieve_callback = True
    # joblib aims at batches that take 0.2 to 2 s from dispatch to result
    # (loky's per-batch cost is well under a millisecond). A batch here costs
    # a node 10 to 30 ms besides its fits (the gap between two tasks: Celery
    # hands over the next message, the result is signed and published), and
    # the client a message each way; and a batch waits in the node's queue
    # behind the one running (queued_per_node), which the timing includes.
    # With 0.2 s, 10,080 near-instant fits went as 207 to 357 batches of 16
    # to 50 fits (more under load, which slows every batch) and 6 to 10% of
    # the nodes' time went to the gaps; aiming at 1 s made them 87 batches
    # and cut the search's CPU time by a fifth (benchmarks/bench_big_grid.py).
    # joblib still splits the grid's last slice into small batches so that
    # the nodes finish together.
    MIN_IDEAL_BATCH_DURATION = 1.0
    MAX_IDEAL_BATCH_DURATION = 10.0
    supports_timeout = True
    # Honoured by running such calls locally in threads (see configure).
    supports_sharedmem = True
    default_n_jobs = -1

    def __init__(
        self,
        session: Session,
        *,
        first_only: bool = False,
        accept_threads: bool = False,
        max_result_bytes: int | None = None,
        later: Callable[[], Any] | None = None,
        nesting_level: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(nesting_level=nesting_level, **kwargs)
        self.session = session
        self.first_only = first_only
        self.accept_threads = accept_threads
        self.max_result_bytes = max_result_bytes
        self.later = later
        self._claimed: Any = None  # the Parallel this backend accepted
        self._fixed_batch: int | None = None  # see expect_calls

    def configure(
        self,
        n_jobs: int | None = 1,
        parallel: Any = None,
        prefer: str | None = None,
        require: str | None = None,
        **kwargs: Any,
    ) -> int:
        threads = (prefer == "threads" and not self.accept_threads) or require == "sharedmem"
        foreign = self.first_only and self._claimed is not None and parallel is not self._claimed
        if threads or foreign:
            chosen = self.later() if foreign and not threads and self.later else None
            if chosen is None:
                chosen = (ThreadingBackend if threads else LokyBackend)(nesting_level=0)
            raise FallbackToBackend(chosen)
        self._claimed = parallel
        self.parallel = parallel
        return self.effective_n_jobs(n_jobs)

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        # At least 2: joblib runs n_jobs == 1 in the client without asking us.
        return max(2, self.session.capacity)

    def expect_calls(self, n_calls: int, pre_dispatch: Any) -> None:
        """The claimed ``Parallel``'s next call sends ``n_calls`` calls (a
        search's fits). With ``longest_first``, and ``pre_dispatch`` left at
        joblib's default, the call hands every batch over at once, so that
        the session can send the longest first (client/schedule.py), in
        batches of at most ``n_calls / (32 x capacity)`` calls: joblib's
        auto-batching learns from batches that finished, which a call that
        dispatches everything at once has none of, and near-instant fits
        still need batches (a 10,080-fit grid). 32 batches a process keep
        the end of the search even."""
        parallel = self.parallel if self._claimed is not None else None
        if (
            self.session.scheduler is None
            or parallel is None
            or pre_dispatch != _DEFAULT_PRE_DISPATCH
            or getattr(parallel, "batch_size", "auto") != "auto"
        ):
            self._fixed_batch = None
            return
        parallel.pre_dispatch = "all"
        per_slot = _BATCHES_PER_PROCESS * max(1, self.session.capacity)
        self._fixed_batch = max(1, n_calls // per_slot)
        self.session.gather(n_calls)

    def compute_batch_size(self) -> int:
        if self._fixed_batch is not None:
            return self._fixed_batch
        size = int(super().compute_batch_size())
        per_call = self.session.stats.result_bytes_per_call
        if self.max_result_bytes is not None and per_call > 0:
            size = max(1, min(size, int(self.max_result_bytes // per_call)))
        return size

    def submit(self, func: Any, callback: Callable[[Future], Any] | None = None) -> Future:
        return self.session.submit(func, callback)

    def retrieve_result_callback(self, future: Future) -> Any:
        return future.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        self.session.cancel_pending()

    def get_nested_backend(self) -> tuple[Any, None]:
        # Inside a fit on a node: the node's processes already fill its cores.
        return SequentialBackend(nesting_level=(self.nesting_level or 0) + 1), None
