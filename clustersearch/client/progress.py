"""A progress bar for fits: done / total, rate and ETA.

In a terminal it is one line redrawn in place; in a Jupyter notebook it is a
live HTML bar in the cell's output (through IPython's display, which every
kernel has: no widget library needed).
"""

from __future__ import annotations

import html
import sys
import time
from typing import Any, TextIO

__all__ = ["Progress", "in_notebook", "progress_enabled"]


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel whose stderr is no terminal."""
    if "ipykernel" not in sys.modules:
        return False
    stream = sys.stderr
    return not bool(getattr(stream, "isatty", lambda: False)())


def progress_enabled(setting: bool | None) -> bool:
    """Resolve ``Cluster(progress=None)``: on for a terminal or a notebook."""
    if setting is not None:
        return bool(setting)
    stream = sys.stderr
    if stream is None:
        return False
    if "ipykernel" in sys.modules:
        return True
    return bool(getattr(stream, "isatty", lambda: False)())


class Progress:
    """Counts fits as their results come back and redraws at most 5 times a second."""

    _MIN_REDRAW_S = 0.2

    def __init__(
        self, enabled: bool, stream: TextIO | None = None, notebook: bool | None = None
    ) -> None:
        self.enabled = enabled
        self.stream = stream
        # In a notebook (and not told where to write): an HTML bar.
        self.notebook = in_notebook() if notebook is None and stream is None else bool(notebook)
        self._handle: Any = None
        self.total = 0
        self.done = 0
        self._started = time.monotonic()
        self._drawn_at = 0.0
        self._drawn = False

    def expect(self, n: int) -> None:
        self.total += n
        self._draw(force=True)

    def advance(self, n: int) -> None:
        self.done += n
        self._draw(force=self.done >= self.total)

    def line(self) -> str:
        elapsed = time.monotonic() - self._started
        total = max(self.total, self.done)
        text = f"clustersearch: {self.done}/{total} fits"
        if total:
            text += f" {100 * self.done / total:3.0f}%"
        text += f" | {_duration(elapsed)}"
        if 0 < self.done < total:
            eta = elapsed / self.done * (total - self.done)
            text += f" | ETA {_duration(eta)}"
        return text

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._drawn_at < self._MIN_REDRAW_S:
            return
        self._drawn_at = now
        if self.notebook:
            self._draw_html()
            return
        stream = self.stream or sys.stderr
        stream.write("\r" + self.line().ljust(60))
        stream.flush()
        self._drawn = True

    def html(self) -> str:
        """The bar as HTML (what a notebook shows)."""
        total = max(self.total, self.done, 1)
        text = html.escape(self.line().removeprefix("clustersearch: "))
        return (
            f'<div class="clustersearch-progress"><progress value="{self.done}" max="{total}" '
            f'style="width:24em;vertical-align:middle"></progress> '
            f"<code>clustersearch: {text}</code></div>"
        )

    def _draw_html(self) -> None:
        from IPython.display import HTML, display

        if self._handle is None:
            self._handle = display(HTML(self.html()), display_id=True)
        else:
            self._handle.update(HTML(self.html()))
        self._drawn = True

    def close(self) -> None:
        if self.enabled and self.notebook:
            if self._drawn:
                self._draw_html()
            return
        if self.enabled and self._drawn:
            self._draw(force=True)
            (self.stream or sys.stderr).write("\n")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
