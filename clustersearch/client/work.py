"""A batch of work and its copies, as the session tracks them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .schedule import Estimates

__all__ = ["Copy", "Local", "Part", "Whole", "Work"]


class Work:
    """One joblib batch: its payload, its future, and what happened to it."""

    __slots__ = (
        "payload", "refs", "callback", "future", "n_calls", "node", "result", "error",
        "task_id", "batch", "tries", "avoid", "backed_up", "rejected", "sent_at", "only",
        "verified", "journal", "costs", "guess",
    )  # fmt: skip

    def __init__(
        self,
        payload: bytes | None,
        callback: Callable[[Future], Any] | None,
        n_calls: int,
        error: BaseException | None = None,
        refs: Sequence[tuple[str, str, int]] = (),
        batch: Any = None,
        only: str | None = None,
    ) -> None:
        self.payload = payload
        self.refs = refs
        self.task_id: str | None = None
        self.callback = callback
        self.future: Future = Future()
        self.n_calls = n_calls
        self.node: str | None = None
        # The result envelope as it came from the broker, or a Local result.
        self.result: Any = None
        self.error: BaseException | None = error
        self.batch = batch  # the joblib batch itself (to split it, or fail it)
        self.tries: list[tuple[str | None, str]] | None = None  # (node, what happened)
        self.avoid: set[str] = set()  # nodes it should not go back to
        self.backed_up = False  # a second copy was sent
        self.rejected = 0  # results that failed verification (dropped)
        # The payload bytes whose signature _on_ready checked (not again).
        self.verified: bytes | memoryview | None = None
        self.sent_at: float | None = None  # when the copy that won was sent (monotonic)
        # Pinned work runs on this node or nowhere (it needs what the node
        # holds): when the node is lost it fails with NodeLostError.
        self.only = only
        # Its calls' journal keys and seeded flags (client/journal.py), or None.
        self.journal: tuple[list[str], list[bool]] | None = None
        # Its calls' features for the cost model (client/schedule.py), or
        # None (not a search's fits, or longest_first off); what the
        # scheduler worked out from them (schedule.Estimates).
        self.costs: list[dict[str, float]] | None = None
        self.guess: Estimates | None = None


@dataclass(eq=False)
class Copy:
    """One sending of a batch: a batch may have two copies in flight (a
    straggler's backup); the first result wins."""

    work: Work
    node: str
    sent_at: float
    result: Any  # Celery's AsyncResult
    # When a process of its node took it, as far as the client can tell:
    # when it was sent to a free process, or when the copy before it on
    # that node came back (client/schedule.py uses it); None: queued.
    running_since: float | None = None
    # False once its result is presumed lost (client/failures.py,
    # resend_in_flight): its node's room is given back, and a result that
    # still comes is taken without giving it back twice.
    holds_slot: bool = True

    def release(self, members: Any) -> None:
        """Give its node's room back (once)."""
        if self.holds_slot:
            self.holds_slot = False
            members.released(self.node)


class Local:
    """A result made in the client (a lost fit's error_score result, or a
    batch retried call by call, its calls' results put together). Only this
    class marks a result as local: nothing from the wire can be one."""

    __slots__ = ("output", "gave_up")

    def __init__(self, output: Any, gave_up: bool = False) -> None:
        self.output = output
        self.gave_up = gave_up


class Whole:
    """A batch retried call by call: its result once every call is back."""

    def __init__(self, finished: Any, work: Work, n_parts: int) -> None:
        self.finished = finished  # where the whole goes when done
        self.work = work
        self.outputs: list[Any] = [None] * n_parts
        self.left = n_parts
        self.error: BaseException | None = None

    def part_done(self, index: int, future: Future) -> None:
        if future.cancelled():
            return
        if future.exception() is not None:
            self.error = self.error or future.exception()
        else:
            self.outputs[index] = future.result()[0]
        self.left -= 1
        if self.left == 0:
            work = self.work
            if self.error is not None:
                work.error = self.error
            else:
                work.result = Local(self.outputs)
            self.finished.append(work)


class Part:
    """The callback of one call of a batch that is retried call by call."""

    def __init__(self, whole: Whole, index: int) -> None:
        self.whole = whole
        self.index = index

    @property
    def parent(self) -> Work:
        return self.whole.work

    def __call__(self, future: Future) -> None:
        self.whole.part_done(self.index, future)
