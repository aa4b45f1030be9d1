"""How work and results are pickled.

Batches and results are pickled with cloudpickle, which sends classes and
functions defined in ``__main__`` or a notebook by value (plain pickle sends
only their name, which the nodes cannot import). The pickles travel as bytes
inside JSON (tasks) and binary (results, :mod:`.codec`) messages: Celery
never unpickles anything; clustersearch does, after verifying the signature
when a secret is set (``_signing``).
"""

from __future__ import annotations

import copyreg
import io
import os
import pickle
import site
import sys
import sysconfig
import zlib
from typing import IO, TYPE_CHECKING, Any, Protocol

import cloudpickle

__all__ = ["COMPRESS_OVER", "dumps", "dumps_chunks", "dumps_with_blobs", "loads"]

from .._compat import CallbackContext, FuncWrapper, strip_callback_siblings
from .codec import Chunks

if TYPE_CHECKING:

    class BlobTable(Protocol):
        """What the pickler needs of the client's blob table
        (``client.blobs.BlobTable``; the wire does not import the client)."""

        def persistent_id(self, obj: Any) -> tuple[str, str, str] | None: ...

        def get(self, digest: str) -> Any: ...


def _installed_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    roots.update(site.getsitepackages())
    roots.add(site.getusersitepackages())
    return tuple(os.path.realpath(root) + os.sep for root in roots)


_INSTALLED = _installed_roots()
_modules_seen = 0
# Module names already looked at (by value or not): each is looked at once,
# not on every pickle (a process that keeps importing, as a node's does
# between tasks, would otherwise resolve every module's path each time).
_checked: set[str] = set()


def _send_user_modules_by_value() -> None:
    """Pickle the user's own modules by value, like ``__main__``.

    A script's helper module or a test file lives outside the Python
    installation, so the nodes cannot import it by name. Modules loaded from
    site-packages or the standard library (scikit-learn, numpy, installed
    packages) still travel by reference: nodes must have them installed.
    """
    global _modules_seen
    if len(sys.modules) == _modules_seen:
        return
    _modules_seen = len(sys.modules)
    # A copy, not list(items()): building the list can run other threads
    # (a heartbeat, a result callback) that import, and the dict must not
    # change size while it is read.
    for name, module in sys.modules.copy().items():
        if name in _checked:
            continue
        _checked.add(name)
        if name == "__main__" or name.partition(".")[0] == "clustersearch":
            continue
        path = getattr(module, "__file__", None)
        if not path or os.path.realpath(path).startswith(_INSTALLED):
            continue
        try:
            cloudpickle.register_pickle_by_value(module)
        except ValueError:  # not in sys.modules under that name any more
            pass


class _Pickler(cloudpickle.CloudPickler):
    """cloudpickle, with large arrays replaced by references to blobs."""

    def __init__(self, file: IO[bytes], table: BlobTable, drop: object = None) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.table = table
        self.drop = drop
        self.refs: dict[str, tuple[str, int]] = {}

    def reducer_override(self, obj: Any) -> Any:
        # What the nodes do not use, sent as None: scikit-learn passes the
        # search itself (``caller=self``) to every fit, for callbacks only.
        if self.drop is not None and obj is self.drop:
            return type(None), ()
        # scikit-learn's call wrapper copies its function's attributes onto
        # itself (functools.update_wrapper), docstring included: 3.4 kB of
        # _fit_and_score's documentation in every task, 40% of a typical
        # message. The nodes do not need it.
        if FuncWrapper is not None and type(obj) is FuncWrapper:
            state: dict[str, Any] | None = {k: v for k, v in vars(obj).items() if k != "__doc__"}
            # typeshed does not declare copyreg.__newobj__ (pickle's own reducer).
            return copyreg.__newobj__, (FuncWrapper,), state  # type: ignore[attr-defined]
        # Each call's callback context links to its parent, the search's
        # context, which maps every (candidate, split) context of the search:
        # pickled whole, every task carried all of them (85 bytes per fit of
        # the search: 116 kB per message for 1,200 fits, about 860 kB for the
        # 10,080 of the original Adult grid). A node needs the path from its
        # call's context to the root, not the siblings.
        if CallbackContext is not None and type(obj) is CallbackContext:
            state = strip_callback_siblings(obj)
            if state is not None:
                return copyreg.__newobj__, (CallbackContext,), state  # type: ignore[attr-defined]
        return super().reducer_override(obj)

    def persistent_id(self, obj: Any) -> tuple[str, str, str] | None:
        ref = self.table.persistent_id(obj)
        if ref is not None:
            self.refs[ref[1]] = (ref[2], self.table.get(ref[1]).nbytes)
        return ref


# A pickle larger than this is compressed when the caller asks (a node's
# result over a network: a batch of fitted trees is 1 MB per Adult tree, and
# a result is one broker message). zlib level 1 shrinks Adult trees 5x at
# about 100 MB/s (benchmarks/bench_forest.py); over the embedded transport's
# files nodes do not ask (wire/config.py compresses_results).
COMPRESS_OVER = 64 * 1024
# Compressed pickles start with this byte; a pickle (protocol 2 or later)
# starts with 0x80. The marker is inside the signed bytes.
_ZLIB = b"Z"


class _Collector:
    """A file for the pickler that keeps what it writes, uncopied: its
    frames, and a large array's buffer as a view of the array's memory."""

    def __init__(self) -> None:
        self.parts: list[memoryview] = []

    def write(self, data: Any) -> int:
        view = data.raw() if isinstance(data, pickle.PickleBuffer) else memoryview(data)
        self.parts.append(view)
        return view.nbytes


def dumps(obj: Any, *, compress_over: int | None = None) -> bytes:
    """Serialize ``obj`` for a node (protocol 5, by value for user code).

    With ``compress_over``, a pickle of more bytes than that is
    zlib-compressed (:func:`loads` reads both).
    """
    return bytes(dumps_chunks(obj, compress_over=compress_over))


def dumps_chunks(obj: Any, *, compress_over: int | None = None) -> bytes | Chunks:
    """:func:`dumps`, the pickle left as :class:`~.codec.Chunks`: the
    pieces the pickler wrote, ``obj``'s large arrays as views of their
    memory, not copied (they must not change until the chunks are sent).
    A node's result: a batch of fitted trees is tens of MB. A compressed
    pickle is ``bytes``.
    """
    _send_user_modules_by_value()
    collector = _Collector()
    cloudpickle.CloudPickler(collector, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    data = Chunks(collector.parts)
    if compress_over is not None and data.nbytes > compress_over:
        compressor = zlib.compressobj(1)
        return b"".join([_ZLIB, *map(compressor.compress, data.parts), compressor.flush()])
    return data


def dumps_with_blobs(
    obj: Any, table: BlobTable, drop: object = None
) -> tuple[bytes, list[tuple[str, str, int]]]:
    """Serialize ``obj`` with its large arrays left in ``table``.

    ``drop``, wherever it occurs in ``obj``, is sent as None. Returns the
    payload and the ``(digest, kind, nbytes)`` of the blobs it references.
    """
    _send_user_modules_by_value()
    buffer = io.BytesIO()
    pickler = _Pickler(buffer, table, drop)
    pickler.dump(obj)
    return buffer.getvalue(), sorted((d, k, n) for d, (k, n) in pickler.refs.items())


def loads(data: bytes | memoryview) -> Any:
    """Inverse of :func:`dumps`."""
    if data[:1] == _ZLIB:
        data = zlib.decompress(data[1:])
    return pickle.loads(data)
