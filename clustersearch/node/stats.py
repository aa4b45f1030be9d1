"""What a node has done since it started: fits and their time.

The fits run in the node's pool processes; the node's main process answers
the client's info command. They share a small counter file in the cache
folder, named after the node and its main process (so a restarted node
starts from zero), updated under a lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
from pathlib import Path

__all__ = ["FitCounter"]

# fits done (unsigned 64-bit), seconds they took (double)
_RECORD = struct.Struct("<Qd")


class FitCounter:
    """The fits node ``node`` (main process ``main_pid``) has run.

    Parameters
    ----------
    cache_dir : path
        The node's cache folder (shared by its processes).
    node : str
        The node's name.
    main_pid : int
        The pid of the node's main worker process.
    """

    def __init__(self, cache_dir: str | os.PathLike[str], node: str, main_pid: int) -> None:
        self.folder = Path(cache_dir) / ".fits"
        self.node = node
        self.path = self.folder / f"{node}.{main_pid}"

    def add(self, fits: int, seconds: float) -> None:
        """Count ``fits`` more fits that took ``seconds`` together."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            done, total = self._unpack(os.pread(fd, _RECORD.size, 0))
            os.pwrite(fd, _RECORD.pack(done + fits, total + seconds), 0)
        finally:
            os.close(fd)

    def read(self) -> tuple[int, float]:
        """``(fits done, mean seconds per fit)``; ``(0, 0.0)`` before the first."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return 0, 0.0
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            done, total = self._unpack(os.pread(fd, _RECORD.size, 0))
        finally:
            os.close(fd)
        return done, (total / done if done else 0.0)

    def forget_others(self) -> None:
        """Remove the counters of this node's earlier runs."""
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.folder):
                name, _, pid = entry.name.rpartition(".")
                if name == self.node and entry.path != str(self.path) and pid.isdigit():
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)

    @staticmethod
    def _unpack(data: bytes) -> tuple[int, float]:
        if len(data) != _RECORD.size:
            return 0, 0.0
        done, total = _RECORD.unpack(data)
        return done, total
