"""The result journal: every finished fit, on disk, by what it computed.

A search with ``journal=`` records each (candidate, split) result as it
arrives, in an SQLite file (WAL mode, written by the client only), under a
content key: the fitted function, the estimator's class and deep parameters
in canonical form, the digests of X, y, the fit parameters and the split's
train and test indices, the scorers and every other argument of the call
that changes its result (``error_score``, ``return_train_score``...). The
versions of Python, scikit-learn, numpy and clustersearch are kept next to
each result. Before a batch is sent, its calls are looked up: those found are
answered here, the rest are sent.

A batch sent to a node is noted (``inflight``: its task id and its calls'
keys) before it is sent. A client that died leaves these notes behind; its
successor, on a result backend that keeps results (Redis, the embedded
transport's ``file://``), polls the stored result of such a task instead of
sending the fit again, within a bound (:data:`COLLECT_FLOOR_S`, or twice the
longest fit the journal has seen). With ``rpc://`` a dead client's results
are gone with its reply queue: those fits run again.

Which results are reused is ``journal_reuse``:

- ``"seeded"`` (default): results of the same library versions, except fits
  of an estimator with ``random_state=None`` somewhere (scikit-learn would
  give a different result each run);
- ``"always"``: also those unseeded fits;
- ``"any-version"``: seeded fits recorded under other library versions too;
- ``"never"``: record only.

The journal holds pickles: open only journals you (or your own runs) wrote.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import os
import pickle
import platform
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.base import BaseEstimator

from .._compat import batch_calls, batch_with_calls, is_rpc_backend
from ..exceptions import JournalError
from ..wire.protocol import RemoteFailure
from ..wire.serialization import dumps_with_blobs, loads
from .dispatch import verified_payload
from .work import Local, Part, Whole, Work

if TYPE_CHECKING:
    from .session import Session

__all__ = [
    "COLLECT_FLOOR_S",
    "ENV_VAR",
    "REUSE",
    "Journal",
    "SearchJournal",
    "default_path",
    "open_journal",
]

logger = logging.getLogger(__name__)

ENV_VAR = "CLUSTERSEARCH_JOURNAL"
REUSE = ("seeded", "always", "any-version", "never")
SCHEMA_VERSION = 1
# PRAGMA application_id: "CSJ1". A SQLite file with another id is foreign.
APPLICATION_ID = 0x43534A31
_SQLITE_HEADER = b"SQLite format 3\x00"
# How long a resumed client waits, at least, for a dead client's batch.
COLLECT_FLOOR_S = 30.0
_POLL_S = 0.25
# Arguments of a fit that do not change its result.
_NOT_KEYED = {"verbose", "split_progress", "candidate_progress", "caller", "callback_ctx"}

_SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE searches (
    id TEXT PRIMARY KEY, estimator TEXT NOT NULL, params TEXT NOT NULL,
    total INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE fits (
    key TEXT NOT NULL, env TEXT NOT NULL, seeded INTEGER NOT NULL,
    output BLOB NOT NULL, checksum TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (key, env));
CREATE TABLE uses (
    search TEXT NOT NULL, key TEXT NOT NULL, used REAL NOT NULL,
    PRIMARY KEY (search, key));
CREATE TABLE inflight (
    key TEXT NOT NULL, task_id TEXT NOT NULL, position INTEGER NOT NULL,
    node TEXT NOT NULL, sent REAL NOT NULL, PRIMARY KEY (key, task_id));
"""


def default_path() -> Path:
    """The journal ``journal=True`` uses: in the user's cache folder
    (``$XDG_CACHE_HOME`` or ``~/.cache``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "clustersearch" / "journal.sqlite"


def environment() -> str:
    """The versions a result is recorded under."""
    import sklearn

    from .. import __version__

    return (
        f"python {platform.python_version()}; scikit-learn {sklearn.__version__}; "
        f"numpy {np.__version__}; clustersearch {__version__}"
    )


def _checksum(key: str, env: str, output: bytes) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in (key.encode(), env.encode(), output):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


class Journal:
    """One journal file (thread-safe: one connection under a lock).

    Parameters
    ----------
    path : str or Path
        The SQLite file; created (with its folder) when missing.

    Raises
    ------
    JournalError
        The file is not a clustersearch journal (another file, another
        schema version), or SQLite finds it damaged (truncated, overwritten).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        self.env = environment()
        self._lock = threading.Lock()
        self._touched: dict[str, float] = {}
        self._check_header()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(
                self.path, timeout=60, check_same_thread=False, isolation_level=None
            )
            self._setup()
        except sqlite3.DatabaseError as exc:
            with contextlib.suppress(Exception):
                self._db.close()
            raise self._damaged(str(exc)) from exc

    def _damaged(self, what: str) -> JournalError:
        return JournalError(
            f"the journal {str(self.path)!r} is damaged ({what}): none of it is used. "
            "Move or delete the file (a search then starts a new journal there), or "
            "pass another journal= path"
        )

    def _check_header(self) -> None:
        try:
            with open(self.path, "rb") as f:
                head = f.read(len(_SQLITE_HEADER))
        except FileNotFoundError:
            return
        except OSError as exc:
            raise JournalError(f"cannot read the journal {str(self.path)!r}: {exc}") from exc
        if head and head != _SQLITE_HEADER:
            raise JournalError(
                f"{str(self.path)!r} is not a clustersearch journal (not an SQLite file): "
                "pass the path of a journal, or a new path"
            )

    def _setup(self) -> None:
        db = self._db
        db.execute("PRAGMA busy_timeout = 60000")
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        if app_id == 0:
            tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if tables:
                raise JournalError(
                    f"{str(self.path)!r} is an SQLite database but not a clustersearch "
                    "journal: pass the path of a journal, or a new path"
                )
            self._create()
        elif app_id != APPLICATION_ID:
            raise JournalError(
                f"{str(self.path)!r} is an SQLite database but not a clustersearch "
                f"journal (application id {app_id:#x}): pass the path of a journal, or a new path"
            )
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            raise JournalError(
                f"the journal {str(self.path)!r} has format {version}, this clustersearch "
                f"reads format {SCHEMA_VERSION}: use the version that wrote it, or start "
                "a new journal (another path)"
            )
        db.execute("PRAGMA journal_mode = WAL")
        # In WAL mode, NORMAL loses no commit when the process dies (only
        # when the machine does), at a fraction of FULL's cost per commit.
        db.execute("PRAGMA synchronous = NORMAL")
        check = db.execute("PRAGMA quick_check").fetchall()
        if check != [("ok",)]:
            raise self._damaged("; ".join(str(r[0]) for r in check[:3]))
        self.journal_id = db.execute("SELECT value FROM meta WHERE name = 'id'").fetchone()[0]

    def _create(self) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            # Another client may have created it meanwhile.
            if db.execute("PRAGMA application_id").fetchone()[0] == 0:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute("INSERT INTO meta VALUES ('id', ?)", (uuid.uuid4().hex,))
                db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o600)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- fits

    def lookup(self, keys: list[str], reuse: str, search: str | None) -> dict[str, Any]:
        """The recorded outputs of ``keys`` that ``reuse`` allows (key -> output).

        A record whose checksum fails is deleted, never used.
        """
        if reuse == "never" or not keys:
            return {}
        found: dict[str, Any] = {}
        bad: list[tuple[str, str]] = []
        marks = ",".join("?" * len(keys))
        rows = self._read(
            f"SELECT key, env, seeded, output, checksum FROM fits WHERE key IN ({marks})",
            tuple(keys),
        )
        for key, env, seeded, output, checksum in rows:
            if key in found:
                continue
            if env != self.env and reuse != "any-version":
                continue
            if not seeded and reuse != "always":
                continue
            if _checksum(key, env, output) != checksum:
                bad.append((key, env))
                continue
            try:
                found[key] = pickle.loads(output)
            except Exception:
                bad.append((key, env))
        if bad:
            logger.warning(
                "journal %s: %d damaged records dropped (their fits run again)", self.path, len(bad)
            )
            with self._write() as db:
                db.executemany("DELETE FROM fits WHERE key = ? AND env = ?", bad)
        if found and search is not None:
            self.used(search, list(found))
        return found

    def used(self, search: str, keys: list[str]) -> None:
        now = time.time()
        with self._write() as db:
            db.executemany(
                "INSERT OR REPLACE INTO uses VALUES (?, ?, ?)", [(search, k, now) for k in keys]
            )
            self._touch(db, search, now)

    def _touch(self, db: sqlite3.Connection, search: str, now: float) -> None:
        # The search's date, at most once a second (one write less per fit).
        if now - self._touched.get(search, 0.0) >= 1.0:
            self._touched[search] = now
            db.execute("UPDATE searches SET updated = ? WHERE id = ?", (now, search))

    def record(
        self, search: str | None, keys: list[str], seeded: list[bool], outputs: list[Any],
        task_id: str | None = None,
    ) -> None:  # fmt: skip
        """Record finished fits (and forget the batch ``task_id`` in flight)."""
        now = time.time()
        rows = []
        for key, ok, output in zip(keys, seeded, outputs):
            data = pickle.dumps(output, protocol=pickle.HIGHEST_PROTOCOL)
            rows.append((key, self.env, int(ok), data, _checksum(key, self.env, data), now))
        with self._write() as db:
            db.executemany("INSERT OR REPLACE INTO fits VALUES (?, ?, ?, ?, ?, ?)", rows)
            if search is not None:
                db.executemany(
                    "INSERT OR REPLACE INTO uses VALUES (?, ?, ?)", [(search, k, now) for k in keys]
                )
                self._touch(db, search, now)
            # Every batch noted in flight for these fits (this one and an
            # earlier sending's) is done.
            db.executemany("DELETE FROM inflight WHERE key = ?", [(k,) for k in keys])

    # -- batches in flight

    def sending(self, task_id: str, keys: list[str], node: str) -> None:
        now = time.time()
        with self._write() as db:
            db.executemany(
                "INSERT OR REPLACE INTO inflight VALUES (?, ?, ?, ?, ?)",
                [(k, task_id, i, node, now) for i, k in enumerate(keys)],
            )

    def in_flight(self, keys: list[str]) -> dict[str, tuple[str, int, str, float]]:
        """key -> (task id, position, node, sent) of batches noted as sent."""
        if not keys:
            return {}
        marks = ",".join("?" * len(keys))
        rows = self._read(
            f"SELECT key, task_id, position, node, sent FROM inflight WHERE key IN ({marks}) "
            "ORDER BY sent DESC",
            tuple(keys),
        )
        found: dict[str, tuple[str, int, str, float]] = {}
        for key, task_id, position, node, sent in rows:
            found.setdefault(key, (task_id, position, node, sent))
        return found

    def batch_keys(self, task_id: str) -> list[str]:
        rows = self._read(
            "SELECT key FROM inflight WHERE task_id = ? ORDER BY position", (task_id,)
        )
        return [r[0] for r in rows]

    def forget_batch(self, task_id: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM inflight WHERE task_id = ?", (task_id,))

    def longest_fit_s(self) -> float:
        """The longest fit + score time recorded (0 when none)."""
        rows = self._read("SELECT output FROM fits ORDER BY created DESC LIMIT 200")
        longest = 0.0
        for (data,) in rows:
            with contextlib.suppress(Exception):
                out = pickle.loads(data)
                longest = max(longest, float(out.get("fit_time", 0)) + float(out.get("score_time", 0)))
        return longest

    # -- searches

    def begin_search(self, search_id: str, estimator: str, params: str) -> None:
        now = time.time()
        with self._write() as db:
            db.execute(
                "INSERT OR IGNORE INTO searches VALUES (?, ?, ?, 0, ?, ?)",
                (search_id, estimator, params, now, now),
            )

    def expect(self, search_id: str, total: int) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE searches SET total = max(total, ?) WHERE id = ?", (total, search_id)
            )

    def searches(self) -> list[dict[str, Any]]:
        """Every search of the journal: id, estimator, params, done, total,
        bytes, created, updated."""
        rows = self._read(
            "SELECT s.id, s.estimator, s.params, s.total, s.created, s.updated, "
            "count(f.key), coalesce(sum(length(f.output)), 0) FROM searches s "
            "LEFT JOIN uses u ON u.search = s.id "
            "LEFT JOIN fits f ON f.key = u.key AND f.env = ? "
            "GROUP BY s.id ORDER BY s.updated",
            (self.env,),
        )
        names = ("id", "estimator", "params", "total", "created", "updated", "done", "bytes")
        return [dict(zip(names, row)) for row in rows]

    def prune(self, search_ids: list[str] | None = None, older_than_s: float | None = None) -> int:
        """Delete searches (by id, or not used for ``older_than_s``) and the
        fits no remaining search uses. Returns the searches deleted."""
        with self._write() as db:
            ids = list(search_ids or [])
            if older_than_s is not None:
                cutoff = time.time() - older_than_s
                ids += [r[0] for r in db.execute("SELECT id FROM searches WHERE updated < ?", (cutoff,))]
            ids = sorted(set(ids))
            db.executemany("DELETE FROM searches WHERE id = ?", [(i,) for i in ids])
            db.executemany("DELETE FROM uses WHERE search = ?", [(i,) for i in ids])
            db.execute("DELETE FROM fits WHERE key NOT IN (SELECT key FROM uses)")
            if older_than_s is not None:
                db.execute("DELETE FROM inflight WHERE sent < ?", (time.time() - older_than_s,))
        with self._lock:
            self._db.execute("VACUUM")
        return len(ids)


# -- keys


class _Unkeyable(Exception):
    """A call whose result cannot be keyed: it is not journaled."""


def _user_code_digest(obj: Any) -> str:
    """The source of a class or function defined outside the installed
    packages (a script, a notebook): a changed class is a new key."""
    module = sys.modules.get(getattr(obj, "__module__", "") or "")
    path = getattr(module, "__file__", None) if module is not None else None
    if module is not None and path and ("site-packages" in path or "dist-packages" in path):
        return ""
    try:
        source = inspect.getsource(obj)
    except (OSError, TypeError):
        return ""
    return hashlib.blake2b(source.encode(), digest_size=16).hexdigest()


def _digest(form: Any) -> str:
    return hashlib.blake2b(repr(form).encode(), digest_size=16).hexdigest()


def _init_params(cls: type) -> list[str]:
    """The parameters of ``cls.__init__`` (scikit-learn's convention: they
    are the estimator's parameters, stored as attributes of the same name)."""
    init: Any = cls.__dict__.get("__init__") or getattr(cls, "__init__")  # noqa: B009
    init = getattr(init, "deprecated_original", init)
    if init is object.__init__:
        return []
    params = inspect.signature(init).parameters.values()
    return sorted(
        p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    )


@dataclass
class _Keyer:
    """Canonical forms of a search's arguments, cached by identity (the
    objects are held, so an id is not reused while the search runs)."""

    blobs: Any  # client.blobs.BlobTable
    cache: dict[int, tuple[Any, Any]] = field(default_factory=dict)
    code: dict[Any, str] = field(default_factory=dict)
    names: dict[type, list[str]] = field(default_factory=dict)
    estimators: dict[Any, tuple[Any, Any, list[str]]] = field(default_factory=dict)

    def cached(self, obj: Any) -> Any:
        hit = self.cache.get(id(obj))
        if hit is not None and hit[0] is obj:
            return hit[1]
        form = ("d", _digest(self.canon(obj, [])))
        self.cache[id(obj)] = (obj, form)
        return form

    def array(self, a: np.ndarray) -> Any:
        ref = self.blobs.persistent_id(a) if self.blobs is not None else None
        if ref is not None:
            return ("arr", ref[1])
        if a.dtype.hasobject:
            raise _Unkeyable("object array")
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).data)
        return ("arr", h.hexdigest())

    def estimator(self, est: Any, unseeded: list[str], path: str, depth: int) -> Any:
        # Every call holds a fresh clone of the same estimator, whose
        # parameter values are mostly the very same objects (ints, strings,
        # None): memoized by the identity of its values, held alive here.
        t = type(est)
        params = self.params(est)
        names = sorted(params)
        values = tuple(params[n] for n in names)
        memo_key = (t, path, tuple(map(id, values)))
        hit = self.estimators.get(memo_key)
        if hit is not None and all(a is b for a, b in zip(hit[0], values)):
            unseeded.extend(hit[2])
            return hit[1]
        inner: list[str] = []
        items = []
        for name, value in zip(names, values):
            sub = f"{path}__{name}" if path else name
            if name == "random_state" and value is None:
                inner.append(sub)
            items.append((name, self.canon(value, inner, sub, depth + 1)))
        form = ("est", _digest(("est", self.kind(t), tuple(items))))
        if len(self.estimators) > 10_000:
            self.estimators.clear()
        self.estimators[memo_key] = (values, form, inner)
        unseeded.extend(inner)
        return form

    def params(self, est: Any) -> dict[str, Any]:
        """``est.get_params(deep=False)``, without its signature inspection
        per call (0.1 ms each) where the class does not override it."""
        t = type(est)
        if getattr(t, "get_params", None) is not BaseEstimator.get_params:
            return dict(est.get_params(deep=False))
        names = self.names.get(t)
        if names is None:
            names = self.names[t] = _init_params(t)
        return {name: getattr(est, name) for name in names}

    def kind(self, t: Any) -> Any:
        if t not in self.code:
            self.code[t] = _user_code_digest(t)
        return (t.__module__, t.__qualname__, self.code[t])

    def canon(self, obj: Any, unseeded: list[str], path: str = "", depth: int = 0) -> Any:
        if depth > 40:
            raise _Unkeyable("too deep")
        t = type(obj)
        if obj is None or t in (bool, int, float, str, bytes, complex):
            return (t.__name__, repr(obj))
        if isinstance(obj, np.ndarray):
            return self.array(obj)
        if isinstance(obj, np.generic):
            return ("np", t.__name__, repr(obj.item()))
        if isinstance(obj, type) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
            return ("code",) + self.kind(obj)
        if hasattr(obj, "get_params") and hasattr(obj, "fit"):
            return self.estimator(obj, unseeded, path, depth)
        if isinstance(obj, Mapping):
            items = [(self.canon(k, [], "", depth + 1), self.canon(v, unseeded, f"{path}__{k}" if path else str(k), depth + 1))
                     for k, v in obj.items()]  # fmt: skip
            return ("map", t.__name__, tuple(sorted(items, key=repr)))
        if isinstance(obj, (list, tuple)):
            return (t.__name__, tuple(self.canon(v, unseeded, path, depth + 1) for v in obj))
        if isinstance(obj, (set, frozenset)):
            return (t.__name__, tuple(sorted((self.canon(v, [], "", depth + 1) for v in obj), key=repr)))
        if hasattr(obj, "__dict__") and not inspect.isroutine(obj) and not inspect.ismodule(obj):
            return ("obj", self.kind(t), self.canon(vars(obj), unseeded, path, depth + 1))
        # Anything else (a RandomState, a pandas frame...): its pickle, with
        # large arrays by digest.
        try:
            payload, _ = dumps_with_blobs(obj, self.blobs)
        except Exception as exc:
            raise _Unkeyable(str(exc)) from exc
        return ("pickle", hashlib.blake2b(payload, digest_size=16).hexdigest())


def _call_key(keyer: _Keyer, call: Any) -> tuple[str, bool] | None:
    """The key of one ``(func, args, kwargs)`` of a joblib batch and whether
    its fit is seeded; None for a call that is not journaled."""
    func, args, kwargs = call
    inner = getattr(func, "function", func)
    module = getattr(inner, "__module__", "") or ""
    if not module.startswith(("sklearn.", "clustersearch.")):
        return None
    unseeded: list[str] = []
    try:
        parts: list[Any] = [keyer.kind(inner)]
        for i, arg in enumerate(args):
            # X, y: the same objects in every call, canonical once.
            if i in (1, 2):
                parts.append(keyer.cached(arg))
            else:
                parts.append(keyer.canon(arg, unseeded))
        params = kwargs.get("parameters") or {}
        for name in sorted(kwargs):
            if name in _NOT_KEYED:
                continue
            value = kwargs[name]
            if name in ("train", "test", "scorer", "fit_params", "score_params"):
                parts.append((name, keyer.cached(value)))
            else:
                parts.append((name, keyer.canon(value, unseeded if name == "parameters" else [])))
    except _Unkeyable:
        return None
    # A random_state=None the candidate's parameters set (or left): unseeded.
    seeded = not any(p not in params or params[p] is None for p in unseeded)
    seeded = seeded and not any(
        (k == "random_state" or k.endswith("__random_state")) and v is None
        for k, v in params.items()
    )
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=20).hexdigest()
    return digest, seeded


# -- one search's use of a journal


@dataclass
class _Collect:
    """A dead client's batch, whose stored result is awaited instead of
    sending its fits again."""

    task_id: str
    keys: list[str]
    deadline: float
    waiters: list[tuple[Work, int]] = field(default_factory=list)


class SearchJournal:
    """What a session asks of the journal for one search.

    Parameters
    ----------
    journal : Journal
    reuse : str
        One of :data:`REUSE`.
    """

    def __init__(self, journal: Journal, reuse: str) -> None:
        self.journal = journal
        self.reuse = reuse
        self.search_id: str | None = None
        self.keyer = _Keyer(None)
        self.hits = 0  # fits answered from the journal
        self.collected = 0  # fits of a dead client's batches, collected
        self.collects: dict[str, _Collect] = {}
        self._waiting: dict[int, _Collect] = {}  # id(work) -> its collect
        self._next_poll = 0.0
        self._collect_s: float | None = None
        self.collectable = False
        self.sent: set[str] = set()  # task ids this search sent

    # -- the search

    def begin(self, search: Any, X: Any, y: Any, params: Mapping[str, Any], session: Session) -> None:
        """Name the search (for ``clustersearch journal``); the keys use the
        digests of ``session``'s blob table."""
        self.keyer = _Keyer(session.blobs)
        self.collectable = not is_rpc_backend(session.app.backend)
        skip = {"cluster", "journal", "journal_reuse", "verbose", "n_jobs", "pre_dispatch"}
        kept = {k: v for k, v in search.get_params(deep=False).items() if k not in skip}
        try:
            form = self.keyer.canon(
                (type(search).__qualname__, kept, self.keyer.cached(X), self.keyer.cached(y),
                 self.keyer.canon(dict(params), [])),
                [],
            )  # fmt: skip
        except _Unkeyable:
            form = uuid.uuid4().hex
        self.search_id = hashlib.blake2b(repr(form).encode(), digest_size=6).hexdigest()
        estimator = search.estimator
        self.journal.begin_search(
            self.search_id,
            f"{type(search).__name__}({type(estimator).__name__})",
            _describe(search),
        )

    def expect(self, n_fits: int, so_far: list[int]) -> None:
        so_far[0] += n_fits
        if self.search_id is not None:
            self.journal.expect(self.search_id, so_far[0])

    def close(self) -> None:
        self.journal.close()

    # -- the session (any thread)

    def keys(self, batch: Any) -> tuple[list[str], list[bool]] | None:
        calls = batch_calls(batch)
        if not calls:
            return None
        keys, seeded = [], []
        for call in calls:
            found = _call_key(self.keyer, call)
            if found is None:
                return None
            keys.append(found[0])
            seeded.append(found[1])
        return keys, seeded

    def submit(
        self, session: Session, func: Any, callback: Any
    ) -> tuple[Future | None, tuple[list[str], list[bool]] | None]:
        """Answer what the journal holds of batch ``func``: ``(future,
        None)``; or ``(None, keys)`` when the whole batch goes the usual way
        (``keys``: its calls' keys and seeded flags, None if not journaled).
        A journal that cannot be read now (a disk error, a lock held for
        a minute) sends the batch: the search goes on without it."""
        try:
            return self._submit(session, func, callback)
        except sqlite3.Error as exc:
            logger.warning("journal %s: %s; the batch is sent", self.journal.path, exc)
            return None, None

    def _submit(
        self, session: Session, func: Any, callback: Any
    ) -> tuple[Future | None, tuple[list[str], list[bool]] | None]:
        keyed = self.keys(func)
        if keyed is None:
            return None, None
        keys, _ = keyed
        found = self.journal.lookup(keys, self.reuse, self.search_id)
        missing = [k for k in keys if k not in found]
        flying = self.journal.in_flight(missing) if self.collectable and len(keys) > 1 else {}
        if not found and not flying:
            return None, keyed
        calls = batch_calls(func) or []
        outputs = [self._answer(found[k], calls[i]) if k in found else None for i, k in enumerate(keys)]
        self.hits += len(found)
        if found:
            session.progress.advance(len(found))
        if len(found) == len(keys):
            work = Work(None, callback, len(keys), batch=func)
            work.result = Local(outputs)
            with session.lock:
                session.finished.append(work)
            session.wake.set()
            return work.future, None
        # Some found, or a batch part of which a dead client sent: the rest
        # goes call by call.
        parent = Work(None, callback, len(keys), batch=func)
        whole = Whole(session.finished, parent, len(keys))
        for i, output in enumerate(outputs):
            if output is not None:
                whole.outputs[i] = output
                whole.left -= 1
        for i, call in enumerate(calls):
            if outputs[i] is None:
                session.submit(batch_with_calls(func, [call]), Part(whole, i))
        return parent.future, None

    def _answer(self, output: Any, call: Any) -> Any:
        # The caller's own objects in cv_results_, not the journal's copies.
        if isinstance(output, dict) and "parameters" in output:
            output = {**output, "parameters": call[2].get("parameters")}
        return output

    def waits(self, session: Session, work: Work) -> bool:
        """True when ``work`` (one call) waits for the stored result of a
        dead client's batch instead of being sent."""
        keyed = work.journal
        if keyed is None or len(keyed[0]) != 1 or not self.collectable:
            return False
        try:
            flying = self.journal.in_flight(keyed[0])
        except sqlite3.Error as exc:
            logger.warning("journal %s: %s; the fit is sent", self.journal.path, exc)
            return False
        if not flying:
            return False
        task_id, position, _node, sent = flying[keyed[0][0]]
        if task_id in self.sent:
            # This search's own batch (a candidate sampled twice): sent
            # again, as without a journal.
            return False
        with session.lock:
            collect = self.collects.get(task_id)
            if collect is None:
                if self._collect_s is None:
                    self._collect_s = max(COLLECT_FLOOR_S, 2 * self.journal.longest_fit_s())
                collect = _Collect(task_id, self.journal.batch_keys(task_id),
                                   sent + self._collect_s)  # fmt: skip
                self.collects[task_id] = collect
            collect.waiters.append((work, position))
        session.wake.set()
        return True

    # -- the dispatcher thread

    def sending(self, work: Work, node: str) -> None:
        """Called just before ``work`` is sent as ``work.task_id``."""
        if work.journal is not None and work.task_id is not None and self.collectable:
            self.sent.add(work.task_id)
            try:
                self.journal.sending(work.task_id, work.journal[0], node)
            except Exception:
                logger.exception("could not write to the journal %s", self.journal.path)

    def finished(self, work: Work, outputs: Any) -> None:
        """A node's result for ``work``: recorded."""
        if work.journal is None or not isinstance(outputs, list):
            return
        keys, seeded = work.journal
        if len(outputs) != len(keys):
            return
        try:
            self.journal.record(self.search_id, keys, seeded, outputs, work.task_id)
        except Exception:
            logger.exception("could not write to the journal %s", self.journal.path)

    def poll(self, session: Session) -> None:
        """Look for the stored results of a dead client's batches."""
        if not self.collects or time.monotonic() < self._next_poll:
            return
        self._next_poll = time.monotonic() + _POLL_S
        backend = session.app.backend
        for task_id, collect in list(self.collects.items()):
            outputs = None
            try:
                meta = backend.get_task_meta(task_id)
            except Exception:
                logger.debug("could not read the result of %s", task_id, exc_info=True)
                meta = {"status": "PENDING"}
            status = meta.get("status")
            if status == "SUCCESS":
                outputs = self._open(session, task_id, meta.get("result"), len(collect.keys))
            elif status == "PENDING" and time.time() < collect.deadline:
                continue
            with session.lock:
                # Waiters that come later start a new collect of this task.
                del self.collects[task_id]
                waiters = list(collect.waiters)
            if outputs is None:
                # Failed, lost, unreadable or too late: the fits run here.
                self.journal.forget_batch(task_id)
                with session.lock:
                    for work, _ in waiters:
                        if not work.future.done():
                            session.pending.append(work)
                session.wake.set()
                continue
            seeded = [True] * len(collect.keys)
            try:
                # Seeded or not, it was this batch's one run: recorded as
                # such only if every waiter's call says so.
                seeded_of = {w.journal[0][0]: w.journal[1][0] for w, _ in waiters if w.journal}
                seeded = [seeded_of.get(k, True) for k in collect.keys]
                self.journal.record(self.search_id, collect.keys, seeded, outputs, task_id)
            except Exception:
                logger.exception("could not write to the journal %s", self.journal.path)
            with session.lock:
                for work, position in waiters:
                    if work.future.done():  # cancelled meanwhile
                        continue
                    work.result = Local([outputs[position]])
                    session.finished.append(work)
                    self.collected += 1
            session.progress.advance(len(waiters))

    def _open(self, session: Session, task_id: str, envelope: Any, n: int) -> list[Any] | None:
        try:
            value = loads(verified_payload(session.signer, task_id, envelope))
        except Exception:
            logger.warning("the stored result of batch %s was refused", task_id)
            return None
        output = value.get("output") if isinstance(value, dict) else None
        if isinstance(output, RemoteFailure) or not isinstance(output, list) or len(output) != n:
            return None
        return output


def _describe(search: Any) -> str:
    """The candidates of a search, briefly, for ``clustersearch journal``."""
    for name in ("param_grid", "param_distributions"):
        if hasattr(search, name):
            text = repr(getattr(search, name))
            return text if len(text) <= 200 else text[:197] + "..."
    return ""


def open_journal(journal: Any, reuse: Any) -> SearchJournal | None:
    """The search's journal from its ``journal`` and ``journal_reuse``
    parameters (and ``CLUSTERSEARCH_JOURNAL``); None when off."""
    if reuse not in REUSE:
        raise JournalError(f"journal_reuse={reuse!r} is not one of {list(REUSE)}")
    if journal is None:
        env = os.environ.get(ENV_VAR, "").strip()
        if env.lower() in ("", "0", "false", "no", "off"):
            return None
        journal = True if env.lower() in ("1", "true", "yes", "on") else env
    if journal is False:
        return None
    if journal is True:
        journal = default_path()
    if not isinstance(journal, (str, os.PathLike)):
        raise JournalError(
            f"journal={journal!r} is not a path: pass a file path, True (the user "
            "cache folder) or None"
        )
    return SearchJournal(Journal(journal), reuse)
