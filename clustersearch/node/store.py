"""A node's store of forest parts: forests that stay on the nodes.

A client that fits a forest with ``keep="nodes"`` asks each of a few nodes
to build some parts of it (a part: a batch of trees, from the seeds the
client drew) and to keep them here. Later requests compute a part's summed
tree outputs on the X the client sends, send a part back, or drop parts.
Each request arrives as a :class:`~clustersearch.wire.protocol.StoreCall`,
the payload of an ordinary signed task pinned to this node.

The parts live on disk, in a folder of the node's cache folder of their own
(``<cache>/.store/<node>/``, so that nodes sharing a cache folder keep
separate stores, and the blob cache's eviction never touches them), one
pickle per part, written atomically. They are loaded on demand, one part at
a time, by the process that needs them. The store is bounded
(:attr:`~clustersearch.node.settings.NodeSettings.store_bytes`): a part that
would take it over its bound is refused with
:class:`~clustersearch.exceptions.StoreFullError`; nothing is evicted, since
a part dropped here could be the last copy of a part of someone's forest.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .._compat import build_forest_part, forest_part_sums
from ..exceptions import ConfigurationError, PartLostError, StoreFullError
from ..wire.protocol import STORE_OPS, StoreCall
from .cache import folder_lock

__all__ = ["PartStore", "fingerprint", "store_folder"]

_FOREST_ID = re.compile(r"[0-9a-f]{8,64}")
_SUFFIX = ".part"


def store_folder(cache_dir: str | os.PathLike[str], node: str) -> Path:
    """The folder of node ``node``'s store, in its cache folder."""
    return Path(cache_dir) / ".store" / node


def fingerprint(trees: list[Any]) -> str:
    """A digest of fitted trees' structure and values: two copies of a part
    built from the same seeds on the same data have the same one."""
    hasher = hashlib.sha256()
    for tree in trees:
        state = tree.tree_.__getstate__()
        hasher.update(state["nodes"].tobytes())
        hasher.update(state["values"].tobytes())
    return hasher.hexdigest()


class PartStore:
    """The forest parts node ``node`` keeps, under ``max_bytes`` in all.

    Parameters
    ----------
    cache_dir : path
        The node's cache folder; the store is a folder inside it.
    max_bytes : int
        The bound of the store (the sum of its parts' file sizes).
    node : str
        The node's name, for the folder and for messages.
    """

    def __init__(self, cache_dir: str | os.PathLike[str], max_bytes: int, node: str) -> None:
        self.directory = store_folder(cache_dir, node)
        self.max_bytes = max_bytes
        self.node = node

    # -- files

    def path(self, forest: str, part: int) -> Path:
        return self.directory / f"{forest}.{part}{_SUFFIX}"

    def nbytes(self) -> int:
        """Bytes the store's parts take on disk."""
        return sum(size for _, size in self._entries())

    def parts(self) -> int:
        return sum(1 for _ in self._entries())

    def _entries(self) -> Iterator[tuple[str, int]]:
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.name.endswith(_SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    yield entry.name, entry.stat().st_size

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        # One process of the node at a time checks the bound and writes.
        self.directory.mkdir(parents=True, exist_ok=True)
        return folder_lock(self.directory)

    def put(self, forest: str, part: int, obj: Any) -> int:
        """Keep ``obj`` as part ``part`` of ``forest``; its size in bytes.

        Raises StoreFullError, naming this node and its bound, when the part
        would take the store over it.
        """
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        path = self.path(forest, part)
        with self._locked():
            used = self.nbytes()
            with contextlib.suppress(FileNotFoundError):
                used -= path.stat().st_size  # a part built again replaces itself
            if used + len(data) > self.max_bytes:
                raise StoreFullError(
                    f"node {self.node!r} cannot keep part {part} of forest {forest} "
                    f"({len(data)} bytes): its store holds {used} bytes and its limit is "
                    f"{self.max_bytes} bytes. Start the node with a larger "
                    "'clustersearch worker --store-size', delete() forests it no "
                    "longer needs, or spread the forest over more nodes"
                )
            tmp = self.directory / f".{uuid.uuid4().hex}.tmp"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        return len(data)

    def get(self, forest: str, part: int) -> Any:
        """Part ``part`` of ``forest``, loaded from disk (PartLostError if
        this node does not hold it)."""
        try:
            with open(self.path(forest, part), "rb") as f:
                return pickle.load(f)
        except FileNotFoundError:
            raise PartLostError(
                f"node {self.node!r} holds no part {part} of forest {forest} (deleted, "
                "or its store folder was wiped)"
            ) from None

    def drop(self, forest: str, parts: tuple[int, ...] = ()) -> int:
        """Remove ``parts`` of ``forest`` (all of them if empty); the bytes freed."""
        freed = 0
        prefix = f"{forest}."
        with self._locked():
            for name, size in list(self._entries()):
                if not name.startswith(prefix):
                    continue
                index = name[len(prefix) : -len(_SUFFIX)]
                if parts and (not index.isdigit() or int(index) not in parts):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.directory / name)
                    freed += size
        return freed

    # -- the operations a client may ask for

    def run(self, call: StoreCall) -> Any:
        """Carry out ``call``; what goes back to the client."""
        if call.op not in STORE_OPS:
            raise ConfigurationError(f"unknown store operation {call.op!r}; known: {STORE_OPS}")
        if not isinstance(call.forest, str) or not _FOREST_ID.fullmatch(call.forest):
            raise ConfigurationError(f"malformed forest id {call.forest!r}")
        parts = tuple(int(p) for p in call.parts)
        if any(p < 0 for p in parts):
            raise ConfigurationError(f"malformed part numbers {call.parts!r}")
        return getattr(self, "_" + call.op)(call.forest, parts, **call.args)

    def _build(
        self,
        forest: str,
        parts: tuple[int, ...],
        *,
        estimator: Any,
        seeds: list[list[int]],
        X: Any,
        y: Any,
        sample_weight: Any = None,
        fit_params: dict[str, Any] | None = None,
    ) -> dict[int, dict[str, Any]]:
        """Build each part from its seeds with scikit-learn's own ``fit``,
        keep it; per part its size, its trees' fingerprint and the fitted
        forest without its trees (its classes, outputs, features)."""
        built = {}
        for part, part_seeds in zip(parts, seeds, strict=True):
            fitted = build_forest_part(estimator, part_seeds, X, y, sample_weight, fit_params)
            nbytes = self.put(forest, part, fitted)
            shell = fitted.__dict__.copy()
            shell["estimators_"] = []
            shell.pop("_sample_weight", None)
            built[part] = {
                "nbytes": nbytes,
                "fingerprint": fingerprint(fitted.estimators_),
                "n_trees": len(fitted.estimators_),
                "shell": shell,
            }
        return built

    def _outputs(
        self, forest: str, parts: tuple[int, ...], *, X: Any, method: str
    ) -> dict[int, list[Any]]:
        """Per part, the sum of its trees' ``method`` outputs on ``X`` (one
        array per output)."""
        if method not in ("predict", "predict_proba"):
            raise ConfigurationError(f"unknown output {method!r}")
        return {part: forest_part_sums(self.get(forest, part), X, method) for part in parts}

    def _fetch(self, forest: str, parts: tuple[int, ...]) -> dict[int, list[Any]]:
        """Per part, its fitted trees."""
        return {part: self.get(forest, part).estimators_ for part in parts}

    def _drop(self, forest: str, parts: tuple[int, ...]) -> int:
        return self.drop(forest, parts)
