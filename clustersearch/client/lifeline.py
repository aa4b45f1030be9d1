"""The client's end of a LocalCluster's lifeline (see ``node.lifeline``).

The client holds the write end of a pipe and gives each node the read end
(``clustersearch worker --watch-fd N``); it never writes to it. The node
reads end-of-file when every copy of the write end is closed: when the
client closed the cluster, or died, however it died.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["Lifeline"]

# -- The client's side --------------------------------------------------------

# Write ends of lifelines held by this process.
_client_ends: set[int] = set()


def _close_in_forked_child() -> None:
    # A process forked from the client (multiprocessing's "fork") must not
    # keep the client's nodes alive after the client.
    for fd in list(_client_ends):
        with contextlib.suppress(OSError):
            os.close(fd)
    _client_ends.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_forked_child)


class Lifeline:
    """The client's end: a pipe whose read end each node watches."""

    def __init__(self) -> None:
        self._read_fd: int | None
        self._write_fd: int | None
        self._read_fd, self._write_fd = os.pipe()
        _client_ends.add(self._write_fd)

    @property
    def pass_fds(self) -> tuple[int, ...]:
        """For ``subprocess.Popen``: the read end, and nothing else."""
        return () if self._read_fd is None else (self._read_fd,)

    def node_args(self, folder: str | os.PathLike[str] | None = None) -> list[str]:
        """The node's command-line options: watch the lifeline and, once the
        client is gone, remove ``folder``."""
        if self._read_fd is None:
            raise RuntimeError("the lifeline's nodes have all been started")
        args = ["--watch-fd", str(self._read_fd)]
        if folder is not None:
            args += ["--watch-remove", str(folder)]
        return args

    def started(self) -> None:
        """Every node holds the read end now: close the client's copy."""
        fd, self._read_fd = self._read_fd, None
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        """Let go: the nodes read end-of-file and stop."""
        self.started()
        fd, self._write_fd = self._write_fd, None
        if fd is not None:
            _client_ends.discard(fd)
            os.close(fd)


