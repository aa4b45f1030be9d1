"""The ``clustersearch`` command: start a node, list or watch the nodes."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from ._optional import check_url
from .exceptions import ClusterSearchError, JournalError, MissingDependencyError

if TYPE_CHECKING:
    from .client.cluster import NodeInfo

__all__ = ["main"]

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clustersearch",
        description="Run scikit-learn searches on a Celery cluster.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    env_broker = os.environ.get("CLUSTERSEARCH_BROKER_URL")
    env_backend = os.environ.get("CLUSTERSEARCH_RESULT_BACKEND")

    worker = sub.add_parser("worker", help="start a node: a worker on its own queue")
    worker.add_argument("--broker", default=env_broker, required=env_broker is None,
                        help="broker URL (default: $CLUSTERSEARCH_BROKER_URL)")
    worker.add_argument("--backend", default=env_backend,
                        help="result backend URL (default: rpc:// for RabbitMQ, "
                        "the broker for Redis)")
    worker.add_argument("--name", default=socket.gethostname().split(".")[0],
                        help="node name; its queue is clustersearch.<name> "
                        "(default: the host name)")
    worker.add_argument("--concurrency", type=int, default=None,
                        help="worker processes, one fit each (default: CPU cores)")
    worker.add_argument("--loglevel", default="INFO")
    worker.add_argument("--cache-dir", default=os.environ.get("CLUSTERSEARCH_CACHE_DIR"),
                        help="folder of the node's data cache, shared by its processes "
                        "(default: $CLUSTERSEARCH_CACHE_DIR or ~/.cache/clustersearch/blobs)")
    worker.add_argument("--cache-size", default=os.environ.get("CLUSTERSEARCH_CACHE_BYTES"),
                        help="bound of the data cache, least recently used out "
                        "(e.g. 2GB, 512MiB; default 2GiB)")
    worker.add_argument("--secret-file", default=None,
                        help="file holding the secret shared with the clients "
                        "(default: $CLUSTERSEARCH_SECRET or $CLUSTERSEARCH_SECRET_FILE); "
                        "with it, the node runs only work signed with that secret")
    worker.add_argument("--threads-per-process", type=int, default=None,
                        help="BLAS/OpenMP threads per fit (default: CPU cores / concurrency)")
    worker.add_argument("--max-payload", default=os.environ.get("CLUSTERSEARCH_MAX_PAYLOAD"),
                        help="refuse task payloads larger than this, unread (default 64MiB)")
    worker.add_argument("--store-size", default=os.environ.get("CLUSTERSEARCH_STORE_BYTES"),
                        help="bound of the node's store of forest parts kept on the "
                        "nodes (keep='nodes'); a part beyond it is refused (default 2GiB)")
    worker.add_argument("--preload", default=os.environ.get("CLUSTERSEARCH_PRELOAD"),
                        help="modules to import before the worker processes start, "
                        "comma-separated (e.g. sklearn.svm,xgboost), so that they share "
                        "them instead of each importing its own copy; scikit-learn's "
                        "search, metrics and ensembles always are "
                        "(default: $CLUSTERSEARCH_PRELOAD)")
    worker.add_argument("--allow-root", action="store_true",
                        help="run as root although tasks carry pickles (see README)")
    # For LocalCluster (see _lifeline): stop when this pipe's write end, held
    # by the client, closes; then remove the cluster's folder.
    worker.add_argument("--watch-fd", type=int, default=None, help=argparse.SUPPRESS)
    worker.add_argument("--watch-remove", default=None, help=argparse.SUPPRESS)
    worker.add_argument("--allow-remote-control", action="store_true",
                        help="obey Celery's state-changing remote control (shutdown, "
                        "cancel_consumer, pool_shrink, unsigned revoke...) from anyone "
                        "who can publish to the broker; inspection works without it")

    nodes = sub.add_parser("nodes", help="list the live nodes")
    nodes.add_argument("--broker", default=env_broker, required=env_broker is None)
    nodes.add_argument("--backend", default=env_backend)
    nodes.add_argument("--timeout", type=float, default=1.0,
                       help="seconds to wait for answers (default: 1)")
    top = sub.add_parser(
        "top", help="watch the nodes: a live table, refreshed every second (Ctrl-C quits)"
    )
    top.add_argument("--broker", default=env_broker, required=env_broker is None)
    top.add_argument("--backend", default=env_backend)
    top.add_argument("--interval", type=float, default=1.0,
                     help="seconds between refreshes (default: 1)")
    top.add_argument("--timeout", type=float, default=1.0,
                     help="seconds to wait for the nodes' answers at each refresh "
                     "(default: 1)")
    top.add_argument("--count", type=int, default=None, help=argparse.SUPPRESS)
    report = sub.add_parser(
        "report", help="write the HTML report of a fitted search saved with joblib.dump"
    )
    report.add_argument("search", help="a fitted search saved with joblib.dump (a pickle: "
                        "load only files you trust)")
    report.add_argument("-o", "--output", default=None,
                        help="the HTML file (default: the search file's name, .html)")

    journal = sub.add_parser("journal", help="list (or prune) the searches in a result journal")
    journal.add_argument("path", help="the journal file (a search's journal=)")
    journal.add_argument("--prune", action="append", default=[], metavar="SEARCH_ID",
                         help="delete this search and the fits no other search uses "
                         "(repeatable)")
    journal.add_argument("--prune-older-than", type=float, default=None, metavar="DAYS",
                         help="delete the searches not used for DAYS days")
    return parser


_LOOPBACK = ("localhost", "::1")


def _is_loopback(url: str) -> bool:
    from urllib.parse import urlparse

    parsed = urlparse(url)
    if parsed.scheme in ("filesystem", "memory"):
        return True
    host = parsed.hostname or "localhost"
    return host in _LOOPBACK or host.startswith("127.")


def _check_security(args: argparse.Namespace) -> bytes | None:
    """Load the secret; refuse or warn where the broker is open to others."""
    from urllib.parse import urlparse

    from .wire.signing import load_secret

    if args.secret_file:
        path = os.path.abspath(args.secret_file)
        try:
            secret = load_secret(secret_file=path)
        except (OSError, ValueError) as exc:
            sys.exit(f"clustersearch worker: --secret-file {path}: {exc}")
    else:
        try:
            secret = load_secret()
        except (OSError, ValueError) as exc:
            sys.exit(f"clustersearch worker: {exc}")
    if _is_loopback(args.broker):
        return secret
    parsed = urlparse(args.broker)
    if parsed.scheme.startswith("amqp") and (parsed.username or "guest") == "guest":
        sys.exit(
            "clustersearch worker: refusing RabbitMQ's default 'guest' account on a "
            f"broker that is not on this machine ({parsed.hostname}). Create a user "
            "and a vhost for clustersearch (README, 'A real cluster') and put them "
            "in the URL."
        )
    if secret is None:
        bar = "!" * 78
        print(
            f"{bar}\n"
            "clustersearch worker: NO SECRET. Work arrives as pickles: anyone who can\n"
            f"publish to {parsed.hostname} can run code on this node as this user.\n"
            "Give every node and client the same secret: --secret-file FILE here,\n"
            "Cluster(secret=...) or CLUSTERSEARCH_SECRET in the client (README, Security).\n"
            f"{bar}",
            file=sys.stderr,
        )
    return secret


def _run_worker(args: argparse.Namespace) -> None:
    from .node.lifeline import bound_shutdown, exit_now, watch

    if args.watch_fd is not None:
        watch(args.watch_fd, args.watch_remove)
    bound_shutdown()
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        if not (args.allow_root or os.environ.get("C_FORCE_ROOT")):
            sys.exit(
                "clustersearch worker: refusing to run as root. Tasks carry "
                "pickles, so whoever can publish to the broker runs code as this "
                "user: start the node as an unprivileged user, or pass "
                "--allow-root (or set C_FORCE_ROOT=1) if you accept that."
            )
    secret = _check_security(args)
    check_url(args.broker, "broker")  # a MissingDependencyError says what to install
    check_url(args.backend, "result backend")
    concurrency = args.concurrency if args.concurrency is not None else os.cpu_count() or 1
    if concurrency < 1:
        sys.exit(f"clustersearch worker: --concurrency must be >= 1, got {concurrency}")
    from .node.settings import NodeSettings
    from .wire.blobs import DEFAULT_CACHE_BYTES, default_cache_dir, parse_size

    try:
        cache_bytes = parse_size(args.cache_size) if args.cache_size else DEFAULT_CACHE_BYTES
    except ValueError as exc:
        sys.exit(f"clustersearch worker: --cache-size: {exc}")
    cache_dir = os.path.abspath(args.cache_dir or default_cache_dir())
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as exc:
        sys.exit(f"clustersearch worker: cannot use --cache-dir {cache_dir}: {exc}")
    threads = args.threads_per_process or max(1, (os.cpu_count() or 1) // concurrency)
    # Native thread pools read these when they load (threadpoolctl caps them
    # again in each fit).
    for var in _THREAD_VARS:
        os.environ.setdefault(var, str(threads))
    if args.preload:
        os.environ["CLUSTERSEARCH_PRELOAD"] = args.preload  # node/memory.py
    try:
        defaults = NodeSettings.from_environ()
        max_payload = parse_size(args.max_payload) if args.max_payload else defaults.max_payload
        store_bytes = parse_size(args.store_size) if args.store_size else defaults.store_bytes
    except (OSError, ValueError) as exc:
        sys.exit(f"clustersearch worker: {exc}")
    settings = NodeSettings(
        cache_dir=Path(cache_dir),
        cache_bytes=cache_bytes,
        threads_per_process=threads,
        max_payload=max_payload,
        max_age_s=defaults.max_age_s,
        secret=secret,
        allow_remote_control=args.allow_remote_control or defaults.allow_remote_control,
        store_bytes=store_bytes,
    )

    from .node.app import create_node_app
    from .wire.protocol import queue_for

    app = create_node_app(args.broker, args.backend, settings)
    app.worker_main([
        "worker",
        "--queues", queue_for(args.name),
        "--hostname", f"{args.name}@%h",
        "--concurrency", str(concurrency),
        "--loglevel", args.loglevel,
        "--pool", "prefork",
        # Nodes do not talk to each other: the client schedules. Without
        # these, every node syncs with all others at start (mingle) and
        # publishes an event every 2 s that no one reads (gossip, worker
        # heartbeats: an extra broker connection each); with many nodes that
        # chatter floods the broker (Celery issues 4618, 5079). The client's
        # heartbeat is its own broadcast (client/recovery.py).
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ])  # fmt: skip
    exit_now(0)


def _run_nodes(args: argparse.Namespace) -> int:
    from .client.cluster import Cluster

    with Cluster(args.broker, args.backend, discovery_timeout=args.timeout) as cluster:
        nodes = cluster.nodes(memory=True)
    if not nodes:
        print(f"no node answered within {args.timeout} s", file=sys.stderr)
        return 1
    # MEMORY: what the node's processes hold together (PSS), its cached data
    # (memory-mapped, shared by them) apart.
    rows = [("NODE", "QUEUE", "CONCURRENCY", "HOST", "PYTHON", "SKLEARN", "NUMPY", "CLUSTERSEARCH",
             "STORE", "MEMORY")]  # fmt: skip
    for n in nodes:
        v = n.versions
        memory = (f"{_size(n.memory_pss - n.memory_data)} + {_size(n.memory_data)} data"
                  if n.memory_pss else "?")  # fmt: skip
        rows.append((n.name, n.queue, str(n.concurrency), n.host, v.get("python", "?"),
                     v.get("scikit-learn", "?"), v.get("numpy", "?"), v.get("clustersearch", "?"),
                     f"{n.store_bytes}/{n.store_limit}", memory))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print(f"{len(nodes)} nodes, {sum(n.concurrency for n in nodes)} worker processes")
    return 0


def _size(nbytes: int) -> str:
    """``nbytes`` for people: 0, 812B, 3.4kB, 27.0MB, 1.9GB."""
    if nbytes < 1000:
        return f"{nbytes}B" if nbytes else "0"
    size = float(nbytes)
    for unit in ("kB", "MB", "GB", "TB"):
        size /= 1000
        if size < 1000 or unit == "TB":
            return f"{size:.1f}{unit}"
    raise AssertionError("unreachable")


def _top_rows(nodes: Sequence[NodeInfo], seen: dict[str, float], now: float) -> list[str]:
    """The lines of one ``clustersearch top`` table (header first)."""
    rows = [("NODE", "HOST", "PROCS", "RUNNING", "QUEUED", "FITS DONE", "MEAN FIT", "CACHE",
             "STORE", "PYTHON", "SKLEARN", "CLUSTERSEARCH", "HEARTBEAT")]  # fmt: skip
    for n in nodes:
        v = n.versions
        mean = f"{n.mean_fit_s:.2f}s" if n.fits_done else "-"
        rows.append((
            n.name, n.host, str(n.concurrency), str(n.running), str(n.queued),
            str(n.fits_done), mean, _size(n.cache_bytes), _size(n.store_bytes),
            v.get("python") or "?", v.get("scikit-learn") or "?",
            v.get("clustersearch") or "?", f"{max(0.0, now - seen[n.name]):.0f}s ago",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


class _Screen:
    """Where ``clustersearch top`` draws: in place on a terminal (plain ANSI
    escapes), a table after another on a dumb terminal, a pipe or a file."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.ansi = out.isatty() and os.environ.get("TERM", "dumb") not in ("dumb", "")
        self.drawn = False

    def draw(self, lines: list[str]) -> None:
        if self.ansi:
            # Home, each line over the last frame's (erase its rest), then
            # erase below: no flicker, no scrolling.
            start = "\x1b[?25l\x1b[H\x1b[2J" if not self.drawn else "\x1b[H"
            self.out.write(start + "".join(f"{line}\x1b[K\n" for line in lines) + "\x1b[J")
        else:
            self.out.write("\n".join(lines) + "\n\n")
        self.out.flush()
        self.drawn = True

    def restore(self) -> None:
        if self.ansi and self.drawn:
            self.out.write("\x1b[?25h")  # the cursor, shown again
            self.out.flush()


def _watch_nodes(args: argparse.Namespace, cluster: object, screen: _Screen,
                 sleep: Callable[[float], None] = time.sleep) -> None:
    from .client.cluster import Cluster, redact

    assert isinstance(cluster, Cluster)
    known: dict[str, NodeInfo] = {}
    seen: dict[str, float] = {}
    refreshes = 0
    while args.count is None or refreshes < args.count:
        began = time.monotonic()
        problem = ""
        try:
            for node in cluster.nodes(timeout=args.timeout):
                known[node.name] = node
                seen[node.name] = time.monotonic()
        except (ClusterSearchError, OSError) as exc:
            problem = f"  ! {exc}"
        now = time.monotonic()
        nodes = [known[name] for name in sorted(known)]
        live = [n for n in nodes if now - seen[n.name] < args.timeout + 2 * args.interval + 1]
        title = (
            f"clustersearch top  {redact(args.broker)}  {time.strftime('%H:%M:%S')}  "
            f"{len(live)}/{len(nodes)} nodes answering, "
            f"{sum(n.running for n in live)} running, {sum(n.queued for n in live)} queued, "
            f"{sum(n.fits_done for n in nodes)} fits done  (Ctrl-C quits)"
        )
        lines = [title + problem, ""]
        lines += _top_rows(nodes, seen, now) if nodes else ["no node has answered yet"]
        screen.draw(lines)
        refreshes += 1
        if args.count is None or refreshes < args.count:
            sleep(max(0.0, args.interval - (time.monotonic() - began)))


def _run_top(args: argparse.Namespace) -> int:
    from .client.cluster import Cluster

    if not args.interval > 0 or not args.timeout > 0:
        sys.exit("clustersearch top: --interval and --timeout must be positive")
    screen = _Screen(sys.stdout)
    cluster = None
    try:
        cluster = Cluster(args.broker, args.backend, discovery_timeout=args.timeout)
        _watch_nodes(args, cluster, screen)
    except KeyboardInterrupt:
        pass  # Ctrl-C: the way to quit
    finally:
        # A second Ctrl-C does not interrupt the cleanup.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            screen.restore()
            if cluster is not None:
                cluster.close()
        finally:
            signal.signal(signal.SIGINT, previous)
    return 0


def _run_report(args: argparse.Namespace) -> int:
    import joblib

    from .report import write_report

    # A pickle runs code when loaded: only files you made yourself.
    search = joblib.load(args.search)
    if not hasattr(search, "cv_results_"):
        print(f"{args.search} holds a {type(search).__name__}, not a fitted search",
              file=sys.stderr)  # fmt: skip
        return 1
    out = Path(args.output or Path(args.search).with_suffix(".html"))
    write_report(search, out)
    print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB)")
    return 0


def _run_journal(args: argparse.Namespace) -> int:
    import time

    from .client.journal import Journal

    if not Path(args.path).exists():
        print(f"clustersearch journal: no file {args.path!r}", file=sys.stderr)
        return 1
    journal = Journal(args.path)
    try:
        if args.prune or args.prune_older_than is not None:
            older = args.prune_older_than * 86400 if args.prune_older_than is not None else None
            known = {s["id"] for s in journal.searches()}
            unknown = [i for i in args.prune if i not in known]
            if unknown:
                print(f"clustersearch journal: no search {unknown[0]!r} in {args.path!r} "
                      f"(ids: {sorted(known)})", file=sys.stderr)  # fmt: skip
                return 1
            print(f"pruned {journal.prune(args.prune, older)} searches")
        searches = journal.searches()
    finally:
        journal.close()

    def day(t: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))

    rows = [("SEARCH", "ESTIMATOR", "FITS", "SIZE", "CREATED", "UPDATED", "PARAMETERS")]
    for s in searches:
        rows.append((s["id"], s["estimator"], f"{s['done']}/{s['total']}",
                     f"{s['bytes'] / 1e3:.1f} kB", day(s["created"]), day(s["updated"]),
                     s["params"]))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    size = Path(args.path).stat().st_size
    print(f"{len(searches)} searches, {size / 1e6:.1f} MB on disk ({args.path})")
    return 0


def main(argv: Sequence[str] | None = None) -> int | None:
    args = _parser().parse_args(argv)
    try:
        if args.command == "worker":
            _run_worker(args)
            return None
        if args.command == "report":
            return _run_report(args)
        if args.command == "top":
            return _run_top(args)
        if args.command == "journal":
            return _run_journal(args)
        return _run_nodes(args)
    except (JournalError, MissingDependencyError) as exc:
        sys.exit(f"clustersearch {args.command}: {exc}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
