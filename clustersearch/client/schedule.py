"""Longest expected fits first: which waiting batch goes next, and where.

A search's makespan is at least its longest fit and at least its total fit
time over the slots; a long fit that starts last holds the whole search.
:class:`CostModel` learns, online, how long a fit takes from the fits that
finished: a ridge regression of log(seconds) on the fit's parameters
(one-hot per (name, value) and per pair of them, log of numeric values), the
size of its training set and the node it ran on (the node's speed).
:class:`Scheduler` ranks the waiting batches by expected time, longest first,
after the batches holding parameter values never tried yet (they are
learned early: ``max_depth=None`` may be the longest of all); and before a
node takes a batch it checks that the batch would not end later there than
on another node that frees up soon (a slow node must not take a long fit at
the end). Plain objects, no threads and no I/O: the dispatcher calls them
with the session's lock held.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy.linalg import cho_factor, cho_solve

from .._compat import batch_calls

__all__ = ["CostModel", "Estimates", "Scheduler", "batch_features", "call_features", "candidate_key"]

# Feature vectors are sparse: {name: value}.
Features = dict[str, float]

# Ridge penalty on every coefficient but the intercept (log-seconds scale).
_RIDGE = 0.3


def _value_key(value: Any) -> str:
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    text = repr(value)
    return f"{type(value).__name__}:{text[:80]}"


def call_features(kwargs: Mapping[str, Any]) -> Features | None:
    """The features of one ``_fit_and_score`` call (its keyword arguments),
    or None when it is not one (no ``parameters``)."""
    params = kwargs.get("parameters")
    if not isinstance(params, Mapping):
        return None
    feats: Features = {}
    items = sorted((str(k), _value_key(v), v) for k, v in params.items())
    for name, key, value in items:
        feats[f"{name}={key}"] = 1.0
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            feats[f"{name}#log"] = math.log1p(abs(float(value)))
    for i, (a, ka, _) in enumerate(items):
        for b, kb, _ in items[i + 1 :]:
            feats[f"{a}={ka}&{b}={kb}"] = 1.0
    train = kwargs.get("train")
    if train is not None and hasattr(train, "__len__"):
        feats["n_train#log"] = math.log1p(len(train))
    return feats


def candidate_key(feats: Features) -> frozenset[str]:
    """The parameter values of a call: the same for every split of a candidate."""
    return frozenset(name for name in feats if "#" not in name and "&" not in name)


def batch_features(batch: Any) -> list[Features] | None:
    """The features of each call of a joblib batch, or None if any call is
    not a search's fit."""
    items = batch_calls(batch)
    if not items:
        return None
    out = []
    for item in items:
        try:
            _, _, kwargs = item
        except (TypeError, ValueError):
            return None
        feats = call_features(kwargs) if isinstance(kwargs, Mapping) else None
        if feats is None:
            return None
        out.append(feats)
    return out


def output_seconds(output: Any) -> list[float] | None:
    """Each call's fit and score time, from a batch's output list."""
    if not isinstance(output, list):
        return None
    out = []
    for item in output:
        item = getattr(item, "result", item)  # a Kept (keep_predictions)
        if not isinstance(item, Mapping):
            return None
        try:
            seconds = float(item["fit_time"]) + float(item.get("score_time", 0.0))
        except (KeyError, TypeError, ValueError):
            return None
        out.append(seconds)
    return out


class CostModel:
    """Seconds a fit takes, from the fits that finished (see the module).

    Keeps the ridge regression's sufficient statistics (X'X and X'y, grown
    as features appear), so an observation costs O(its features^2) and a
    refit one solve, whatever the number of fits (10,080 near-instant fits
    refitted from all rows took the client's CPU from the nodes).

    The features are bounded (:attr:`MAX_VALUES` one-hot values per
    parameter, :attr:`MAX_FEATURES` in all; a value past either counts 0,
    its numeric ``#log`` feature still counts): a randomized search over
    continuous distributions draws a new value for every candidate, and a
    one-hot feature per value (and per pair of them) grew X'X past a
    gigabyte and each refit's solve past seconds. Refits are spaced so that
    they take at most about 1/:attr:`REFIT_SHARE` of the client's time.
    """

    MAX_VALUES = 64  # one-hot values of one parameter
    MAX_FEATURES = 1024  # in all (X'X: 8 MiB; a refit about 10 ms)
    REFIT_SHARE = 100  # a refit at most every 100 times the last one's duration

    def __init__(self, ridge: float = _RIDGE) -> None:
        self.ridge = ridge
        self.index: dict[str, int] = {}  # feature -> its row in _xtx (0: intercept)
        self.seen: set[str] = set()  # one-hot features with a finished fit
        self._values: dict[str, int] = {}  # parameter -> its one-hot values indexed
        self._refused: set[str] = set()  # features over a bound (count 0)
        self._xtx = np.zeros((64, 64))
        self._xty = np.zeros(64)
        self._coef: np.ndarray | None = None
        self.observed = 0
        self._fitted_rows = 0
        self._fitted_at = 0.0
        self._fit_seconds = 0.0  # how long the last refit took
        self.version = 0  # changes with each refit (cached predictions expire)

    @property
    def ready(self) -> bool:
        return self.observed > 0

    def column(self, name: str) -> int | None:
        """The row of feature ``name`` in the model (indexed on first
        sight), or None for a feature over the bounds (it counts 0)."""
        j = self.index.get(name)
        if j is not None or name in self._refused:
            return j
        if not name.startswith("node=") and "#" not in name:
            over = len(self.index) >= self.MAX_FEATURES
            if "&" in name:  # a pair: only of values both indexed
                over = over or any(part not in self.index for part in name.split("&"))
            else:
                param = name.split("=", 1)[0]
                over = over or self._values.get(param, 0) >= self.MAX_VALUES
                if not over:
                    self._values[param] = self._values.get(param, 0) + 1
            if over:
                self._refused.add(name)
                return None
        j = self.index[name] = len(self.index) + 1
        return j

    def _grow(self, d: int) -> None:
        if d > len(self._xty):
            size = max(d, 2 * len(self._xty))
            xtx, xty = np.zeros((size, size)), np.zeros(size)
            n = len(self._xty)
            xtx[:n, :n], xty[:n] = self._xtx, self._xty
            self._xtx, self._xty = xtx, xty

    def observe(self, feats: Features, node: str, seconds: float) -> None:
        if not (seconds > 0 and math.isfinite(seconds)):
            return
        cols, vals = [0], [1.0]
        for name, value in (*feats.items(), (f"node={node}", 1.0)):
            j = self.column(name)
            if j is None:
                continue
            cols.append(j)
            vals.append(value)
            if "#" not in name:
                self.seen.add(name)
        self._grow(len(self.index) + 1)
        idx, val = np.array(cols), np.array(vals)
        self._xtx[np.ix_(idx, idx)] += np.outer(val, val)
        self._xty[idx] += val * math.log(seconds)
        self.observed += 1

    def _fit(self) -> np.ndarray:
        if self._coef is not None and (
            self._fitted_rows == self.observed or not self._refit_due()
        ):
            return self._coef
        began = time.perf_counter()
        d = len(self.index) + 1
        self._grow(d)
        penalty = np.full(d, self.ridge)
        penalty[0] = 1e-9  # the intercept
        A = self._xtx[:d, :d] + np.diag(penalty)
        # X'X + a positive diagonal: symmetric positive definite, so a
        # Cholesky solve (half an LU solve's work).
        self._coef = cho_solve(cho_factor(A, check_finite=False), self._xty[:d], check_finite=False)
        self._fitted_rows = self.observed
        self._fitted_at = time.monotonic()
        self._fit_seconds = time.perf_counter() - began
        self.version += 1
        return self._coef

    def _refit_due(self) -> bool:
        # Refit after each of the first fits, then after every tenth more
        # (or every 2 s), never more often than REFIT_SHARE times the last
        # refit's duration: the dispatcher ranks every waiting batch again
        # after each refit.
        since = time.monotonic() - self._fitted_at
        if since < self.REFIT_SHARE * self._fit_seconds:
            return False
        new = self.observed - self._fitted_rows
        return new >= max(1, self.observed // 10) or since > 2.0

    def refresh(self) -> None:
        """Refit now if due (changes ``version``)."""
        if self.observed:
            self._fit()

    def coefficients(self) -> np.ndarray:
        """The model's coefficients, one per indexed feature (0 for those
        indexed since the last refit); refits first if due."""
        coef = self._fit()
        d = len(self.index) + 1
        if len(coef) < d:
            coef = np.concatenate([coef, np.zeros(d - len(coef))])
        return coef

    def log_seconds(self, feats: Features, node: str | None = None) -> float | None:
        """Expected log-seconds of a call with ``feats`` on ``node`` (None:
        a node of average speed); None before any fit finished."""
        if not self.observed:
            return None
        coef = self._fit()
        known = len(coef)  # features added since the last refit count 0
        total = float(coef[0])
        for name, value in feats.items():
            j = self.index.get(name)
            if j is not None and j < known:
                total += coef[j] * value
        if node is not None:
            j = self.index.get(f"node={node}")
            if j is not None and j < known:
                total += coef[j]
        return total

    def speed(self, node: str) -> float:
        """How many times longer than an average node ``node`` takes (1.0
        when unknown)."""
        return self.speeds((node,))[node]

    def speeds(self, nodes: Iterable[str]) -> dict[str, float]:
        """:meth:`speed` of each of ``nodes``, the model refitted (if due)
        once for all of them."""
        if not self.observed:
            return dict.fromkeys(nodes, 1.0)
        coef = self._fit()
        out = {}
        for node in nodes:
            j = self.index.get(f"node={node}")
            out[node] = 1.0 if j is None or j >= len(coef) else float(math.exp(coef[j]))
        return out

    def seconds(self, calls: Sequence[Features], node: str | None = None) -> float | None:
        """Expected seconds of a batch of calls on an average node (times
        :meth:`speed` for a given one)."""
        if not self.observed:
            return None
        total = 0.0
        for feats in calls:
            log = self.log_seconds(feats)
            assert log is not None
            total += math.exp(min(log, 50.0))
        return total * (self.speed(node) if node is not None else 1.0)


class Estimates:
    """What the scheduler needs of one batch, worked out once from its
    calls' features (kept on its work): each call's candidate and model
    columns, the batch's one-hot names, and each call's expected seconds
    for the model version they were computed with. Ranking 66 batches of
    10,080 near-instant fits call by call took the client 3.5 s of CPU."""

    __slots__ = ("costs", "names", "keys", "rows", "cols", "vals", "version", "each", "total")

    def __init__(self, costs: Sequence[Features], model: CostModel) -> None:
        self.costs = costs
        self.names = frozenset(
            name for feats in costs for name in feats if "#" not in name and "&" not in name
        )
        self.keys: dict[frozenset[str], list[int]] = {}
        rows: list[int] = []
        cols: list[int] = []
        vals: list[float] = []
        for i, feats in enumerate(costs):
            self.keys.setdefault(candidate_key(feats), []).append(i)
            for name, value in feats.items():
                j = model.column(name)
                if j is not None:
                    rows.append(i)
                    cols.append(j)
                    vals.append(value)
        self.rows = np.array(rows, dtype=np.int32)
        self.cols = np.array(cols, dtype=np.int32)
        self.vals = np.array(vals, dtype=float)
        self.version = -1
        self.each = np.zeros(len(costs))
        self.total = 0.0

    def update(self, model: CostModel) -> None:
        """Each call's expected seconds on an average node, for the model's
        current version (as :meth:`CostModel.seconds`, call by call)."""
        if self.version == model.version:
            return
        coef = model.coefficients()
        logs = coef[0] + np.bincount(
            self.rows, weights=coef[self.cols] * self.vals, minlength=len(self.each)
        )
        self.each = np.exp(np.minimum(logs, 50.0))
        self.total = float(self.each.sum())
        self.version = model.version


class Scheduler:
    """Ranks waiting batches (longest expected first) and checks where they
    go (see the module). ``costs`` of a batch: its calls' features, or None
    for work the scheduler does not rank (it keeps its place in front)."""

    def __init__(self) -> None:
        self.model = CostModel()
        self.tried: set[str] = set()  # one-hot features dispatched at least once
        self.decisions = 0  # batches placed out of the given order (for tests)

    # -- learning

    def learn(self, costs: Sequence[Features] | None, node: str, output: Any) -> None:
        """A batch with ``costs`` finished on ``node`` with ``output``."""
        seconds = output_seconds(output)
        if costs is None or seconds is None or len(seconds) != len(costs):
            return
        for feats, s in zip(costs, seconds):
            self.model.observe(feats, node, s)

    def dispatched(self, costs: Sequence[Features] | None) -> None:
        for feats in costs or ():
            self.tried.update(name for name in feats if "#" not in name)

    # -- ranking

    def novelty(self, costs: Sequence[Features] | Estimates) -> int:
        """How many of the batch's (name, value) features no batch sent so
        far had: such batches go first, so their cost is learned early."""
        if isinstance(costs, Estimates):
            names: Iterable[str] = costs.names
        else:
            names = {name for feats in costs for name in feats if "#" not in name and "&" not in name}
        return sum(1 for name in names if name not in self.tried)

    def expected(self, costs: Sequence[Features], node: str | None = None) -> float | None:
        return self.model.seconds(costs, node)

    def estimates(self, work: Any) -> Estimates:
        """``work``'s :class:`Estimates` (made on first use, kept on it)."""
        cached = work.guess
        if not isinstance(cached, Estimates) or cached.costs is not work.costs:
            cached = work.guess = Estimates(work.costs or [], self.model)
        return cached

    def guess(self, work: Any, floors: Mapping[frozenset[str], float] | None = None) -> float:
        """Expected seconds of ``work`` (its ``costs``) on an average node:
        each call's model estimate (kept on the work until the model
        changes), at least as long as a fit of the same candidate has run
        so far (``floors``, see :func:`candidate_key`)."""
        est = self.estimates(work)
        if self.model.ready:
            self.model.refresh()
            est.update(self.model)
            each, total = est.each, est.total
        else:
            each, total = np.zeros(len(est.each)), 0.0
        if floors:
            keys = est.keys
            for key, floor in floors.items():
                for i in keys.get(key, ()):
                    if floor > each[i]:
                        total += floor - float(each[i])
        return float(total)

    def order(
        self,
        waiting: Iterable[Any],
        ranked_costs: Any,
        floors: Mapping[frozenset[str], float] | None = None,
    ) -> list[Any]:
        """``waiting`` works, in the order they should go: unranked work
        (``ranked_costs(work)`` is None: retries, backups, pinned work)
        first, as given; then batches with untried parameter values (most
        untried first); then the others by expected time, longest first
        (a fit of a candidate that has run for long already makes its other
        fits long, see :meth:`guess`). Ties keep the given order."""
        front, ranked = [], []
        for position, work in enumerate(waiting):
            costs = ranked_costs(work)
            if costs is None:
                front.append(work)
                continue
            novel = self.novelty(self.estimates(work))
            guess = self.guess(work, floors)
            ranked.append(((-novel, -guess, position), work))
        ranked.sort(key=lambda entry: entry[0])
        return front + [work for _, work in ranked]

    # -- placement

    def ready_at(
        self, held: Sequence[tuple[float, float | None]], concurrency: int, now: float
    ) -> float:
        """When a node next has a process free for new work: ``held`` lists
        its batches as ``(sent_at, expected seconds or None)``, oldest first
        (the first ``concurrency`` run, the rest wait in its queue)."""
        if len(held) < concurrency:
            return now
        ends = []
        for sent_at, expected in held[:concurrency]:
            elapsed = now - sent_at
            if expected is None:
                expected = elapsed
            # Overdue work is expected to take as long again as it is late.
            ends.append(now + abs(expected - elapsed))
        ends.sort()
        for _, expected in held[concurrency:]:
            first = ends.pop(0)
            ends.append(first + (expected if expected is not None else 0.0))
            ends.sort()
        return ends[0]

    def fits_on(
        self,
        costs: Sequence[Features],
        node: str,
        ready: Mapping[str, float],
        horizon: float,
        expected: float | None = None,
        speeds: Mapping[str, float] | None = None,
    ) -> bool:
        """Whether ``node`` should take a batch with ``costs`` now: it ends
        there no later than on any other node (each from when it is ready),
        or before the search's expected end ``horizon`` anyway. ``expected``:
        its seconds on an average node, if known (else from ``costs``);
        ``speeds``: :meth:`CostModel.speeds` of the nodes in ``ready``, if
        the caller has them."""
        base = self.expected(costs) if expected is None else expected
        if base is None:
            return True
        if speeds is None:
            speeds = self.model.speeds(ready)
        here = ready[node] + base * speeds[node]
        if here <= horizon:
            return True
        best = min(ready[m] + base * speeds[m] for m in ready)
        return here <= best * (1 + 1e-9) + 1e-6

    def horizon(
        self,
        waiting: Iterable[float],
        in_flight: Iterable[tuple[str, float, float | None]],
        concurrency: Mapping[str, int],
        now: float,
    ) -> float:
        """The search's expected end if its work were spread evenly: what
        waits (expected seconds on an average node) and what is left of the
        work in flight, over the nodes' speeds (``in_flight``: ``(node,
        sent_at, expected seconds there)``)."""
        in_flight = list(in_flight)
        speeds = self.model.speeds({*concurrency, *(node for node, _, _ in in_flight)})
        rate = sum(c / speeds[n] for n, c in concurrency.items())
        if rate <= 0:
            return now
        work = float(sum(waiting))
        for node, sent_at, expected in in_flight:
            if expected is not None:
                left = max(expected - (now - sent_at), 0.0)
                work += left / speeds[node]
        return now + work / rate
