"""A fitted search as one self-contained HTML file: ``search.report(path)``.

The file opens offline, with no server and no network: every figure is an
SVG drawn by Matplotlib and written into the page, and the page runs no
script but a ten-line check that each figure has a size (the browser test
reads it). Why Matplotlib and not Plotly or Altair: a Plotly page carries
3.5 MB of JavaScript (or fetches it from a CDN, which breaks offline), an
Altair page needs vega from a CDN or a converter binary; Matplotlib is
the plotting library scikit-learn's own examples use, most users have it,
and its SVG is text the page holds. Install it with
``pip install 'clustersearch[report]'``.

What the page shows: a summary, score heatmaps for each pair of
parameters (best mean score over the others), one-parameter slices with
the spread across folds, the ranked table, fit time against score, a
per-node timeline of every task (backups, retries and lost nodes marked),
failures with their reasons, data and message bytes per node, and the
warnings the fits raised.
"""

from __future__ import annotations

import html
import io
import itertools
import math
import os
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .exceptions import MissingDependencyError

__all__ = ["write_report"]

_MAX_TABLE_ROWS = 200
_MAX_PAIRS = 15
_MAX_LEVELS = 30


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingDependencyError(
            "search.report() draws its figures with Matplotlib, which is not "
            "installed: pip install 'clustersearch[report]' (or matplotlib)"
        ) from exc
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _svg(fig: Any) -> str:
    plt = _pyplot()
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _label(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if hasattr(value, "get_params"):
        return type(value).__name__
    return str(value)


def _levels(values: Sequence[Any]) -> list[str]:
    """The distinct labels of a parameter's values, numbers in order, None last."""
    seen: dict[str, Any] = {}
    for v in values:
        seen.setdefault(_label(v), v)

    def key(item: tuple[str, Any]) -> tuple[int, float, str]:
        label, v = item
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return (2, 0.0, label)
        if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
            return (0, float(v), label)
        return (1, 0.0, label)

    return [label for label, _ in sorted(seen.items(), key=key)]


def _metric(search: Any) -> str:
    """The cv_results_ suffix of the score the search ranks by."""
    results = search.cv_results_
    refit = getattr(search, "refit", True)
    if isinstance(refit, str) and f"mean_test_{refit}" in results:
        return refit
    if "mean_test_score" in results:
        return "score"
    names = sorted(k[len("mean_test_") :] for k in results if k.startswith("mean_test_"))
    return names[0]


def _params(results: Mapping[str, Any]) -> dict[str, list[Any]]:
    """Each searched parameter's value per candidate (masked: absent)."""
    out = {}
    for key in sorted(k for k in results if k.startswith("param_")):
        column = results[key]
        mask = np.ma.getmaskarray(column)
        values = [None if m else v for v, m in zip(list(np.ma.getdata(column)), mask)]
        if len({_label(v) for v in values}) > 1:
            out[key[len("param_") :]] = values
    return out


def _heatmap(name_a: str, a: list[Any], name_b: str, b: list[Any], scores: np.ndarray) -> str:
    plt = _pyplot()
    rows, cols = _levels(a)[:_MAX_LEVELS], _levels(b)[:_MAX_LEVELS]
    grid = np.full((len(rows), len(cols)), np.nan)
    index_r = {v: i for i, v in enumerate(rows)}
    index_c = {v: i for i, v in enumerate(cols)}
    for va, vb, s in zip(a, b, scores):
        i, j = index_r.get(_label(va)), index_c.get(_label(vb))
        if i is None or j is None or not np.isfinite(s):
            continue
        grid[i, j] = s if np.isnan(grid[i, j]) else max(grid[i, j], s)
    fig, ax = plt.subplots(figsize=(0.6 * len(cols) + 2.4, 0.45 * len(rows) + 1.4))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(name_b)
    ax.set_ylabel(name_a)
    if grid.size <= 100:
        finite = grid[np.isfinite(grid)]
        middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
        for (i, j), s in np.ndenumerate(grid):
            if np.isfinite(s):
                ax.text(j, i, f"{s:.3f}", ha="center", va="center", fontsize=7,
                        color="white" if s < middle else "black")  # fmt: skip
    fig.colorbar(image, ax=ax, label="best mean test score")
    return _svg(fig)


def _slice(name: str, values: list[Any], scores: np.ndarray, folds: np.ndarray) -> str:
    plt = _pyplot()
    levels = _levels(values)[:_MAX_LEVELS]
    position = {v: i for i, v in enumerate(levels)}
    fig, ax = plt.subplots(figsize=(max(3.2, 0.5 * len(levels) + 1.6), 2.8))
    rng = np.random.default_rng(0)
    for level in levels:
        mine = [i for i, v in enumerate(values) if _label(v) == level]
        x = position[level]
        ok = [i for i in mine if np.isfinite(scores[i])]
        if not ok:
            continue
        ax.scatter(x + rng.uniform(-0.15, 0.15, len(ok)), scores[ok], s=8, alpha=0.5,
                   color="tab:blue", linewidths=0)  # fmt: skip
        best = max(ok, key=lambda i: scores[i])
        spread = folds[best][np.isfinite(folds[best])]
        if spread.size:
            ax.vlines(x + 0.3, spread.min(), spread.max(), color="tab:orange", linewidth=2)
            ax.plot([x + 0.3], [scores[best]], "o", color="tab:orange", markersize=4)
    ax.set_xticks(range(len(levels)), levels, rotation=45 if len(levels) > 6 else 0)
    ax.set_xlabel(name)
    ax.set_ylabel("mean test score")
    ax.set_title("dots: candidates; orange: the best one's folds (min to max)", fontsize=8)
    return _svg(fig)


def _time_vs_score(fit_time: np.ndarray, scores: np.ndarray) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.0))
    ok = np.isfinite(scores)
    ax.scatter(fit_time[ok], scores[ok], s=10, alpha=0.6, linewidths=0)
    ax.set_xlabel("mean fit time (s)")
    ax.set_ylabel("mean test score")
    return _svg(fig)


def _gantt(timeline: Mapping[str, Any]) -> str:
    plt = _pyplot()
    tasks = timeline.get("tasks", [])
    lanes = sorted({(t["node"], t["pid"]) for t in tasks}, key=lambda k: (k[0], str(k[1])))
    row = {lane: i for i, lane in enumerate(lanes)}
    fig, ax = plt.subplots(figsize=(9, 0.32 * max(len(lanes), 2) + 1.4))
    for t in tasks:
        color = "tab:purple" if t["backup"] else ("tab:red" if t["tries"] else "tab:blue")
        ax.broken_barh([(t["start"], max(t["end"] - t["start"], 1e-3))],
                       (row[t["node"], t["pid"]] - 0.4, 0.8), facecolors=color)  # fmt: skip
    marked = {"lost", "worker-lost", "gave-up", "straggler", "broker-down", "joined"}
    for e in timeline.get("events", []):
        if e.get("event") in marked:
            ax.axvline(e["time"], color="tab:red", linestyle=":", linewidth=1)
            ax.text(e["time"], len(lanes) - 0.5, f" {e['event']} {e.get('node') or ''}",
                    rotation=90, va="top", fontsize=7, color="tab:red")  # fmt: skip
    ax.set_yticks(range(len(lanes)), [f"{n} pid {p}" for n, p in lanes])
    ax.set_xlabel("seconds since fit began (client clock)")
    ax.set_title("blue: tasks of fits; red: retried after a loss; purple: a straggler's backup",
                 fontsize=8)  # fmt: skip
    return _svg(fig)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _ranked(search: Any, metric: str) -> str:
    results = search.cv_results_
    ranks = np.asarray(results[f"rank_test_{metric}"])
    order = np.argsort(ranks, kind="stable")
    rows = [
        (
            int(ranks[i]),
            f"{results[f'mean_test_{metric}'][i]:.4f} ± {results[f'std_test_{metric}'][i]:.4f}",
            f"{results['mean_fit_time'][i]:.3f}",
            ", ".join(f"{k}={_label(v)}" for k, v in results["params"][i].items()),
        )
        for i in order[:_MAX_TABLE_ROWS]
    ]
    header = ("rank", f"mean test {metric} ± std", "mean fit time (s)", "parameters")
    shown = _table(header, rows[:25])
    if len(rows) > 25:
        more = len(order) - len(rows)
        shown += (
            f"<details><summary>the first {len(rows)} of {len(order)} candidates"
            + (f" ({more} more in cv_results_)" if more else "")
            + "</summary>" + _table(header, rows) + "</details>"
        )  # fmt: skip
    return shown


def _failures(errors: Sequence[Mapping[str, Any]]) -> str:
    if not errors:
        return "<p>No fit failed.</p>"
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for e in errors:
        lines = [line for line in str(e["error"]).strip().splitlines() if line.strip()]
        groups[lines[-1] if lines else "?"].append(e)
    parts = []
    for reason, items in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        nodes = ", ".join(sorted({str(i["node"]) for i in items}))
        parts.append(
            f"<details><summary>{len(items)} fit{'s' if len(items) > 1 else ''} on {html.escape(nodes)}: "
            f"<code>{html.escape(reason)}</code></summary><pre>{html.escape(str(items[0]['error']))}</pre></details>"
        )  # fmt: skip
    return "".join(parts)


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
td,th{border:1px solid #ddd;padding:.2em .5em;text-align:left}
th{background:#f4f4f4}.figs{display:flex;flex-wrap:wrap;gap:1em}
figure{margin:0}figure svg{max-width:100%;height:auto}pre{font-size:.8em;overflow:auto}
"""

# Marks on <body> how many figures have a size once laid out: what the
# browser test reads. The page needs no script otherwise.
_CHECK = """<script>
window.addEventListener("load", function () {
  var figs = document.querySelectorAll("figure svg"), ok = 0;
  figs.forEach(function (f) { var r = f.getBoundingClientRect(); if (r.width > 0 && r.height > 0) ok++; });
  document.body.setAttribute("data-figures", String(figs.length));
  document.body.setAttribute("data-rendered", String(ok));
});
</script>"""


def _figure(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{html.escape(caption)}</figcaption></figure>"


def write_report(search: Any, path: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """Write the HTML report of a fitted cluster search to ``path``.

    Parameters
    ----------
    search : fitted ClusterGridSearchCV, ClusterRandomizedSearchCV, ...
        Also a fitted scikit-learn search (no timeline, traffic or warnings).
    path : str or path-like
        The HTML file to write.
    title : str, default=None
        The page's title; default: the estimator and the search's class.

    Returns
    -------
    path : pathlib.Path
    """
    if not hasattr(search, "cv_results_"):
        raise ValueError("report() needs a fitted search: call fit first")
    results = search.cv_results_
    metric = _metric(search)
    scores = np.asarray(results[f"mean_test_{metric}"], dtype=float)
    split_keys = sorted(
        (k for k in results if k.startswith("split") and k.endswith(f"_test_{metric}")),
        key=lambda k: int(k[5 : k.index("_")]),
    )
    folds = np.column_stack([np.asarray(results[k], dtype=float) for k in split_keys])
    params = _params(results)
    estimator = type(getattr(search, "estimator", search)).__name__
    title = title or f"{type(search).__name__}({estimator})"

    sections = []
    n_candidates = len(results["params"])
    best = getattr(search, "best_params_", None)
    summary = [
        ("search", type(search).__name__),
        ("estimator", estimator),
        ("candidates", n_candidates),
        ("splits", getattr(search, "n_splits_", len(split_keys))),
        (f"best mean test {metric}", f"{np.nanmax(scores):.4f}" if np.isfinite(scores).any() else "-"),
        ("best parameters", ", ".join(f"{k}={_label(v)}" for k, v in (best or {}).items()) or "-"),
        ("fits per node", ", ".join(f"{n}: {c}" for n, c in getattr(search, "fits_per_node_", {}).items()) or "-"),
        ("written", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
    ]  # fmt: skip
    sections.append(("Summary", _table(("", ""), summary)))

    pairs = list(itertools.combinations(params, 2))[:_MAX_PAIRS]
    if pairs:
        figs = "".join(
            _figure(_heatmap(a, params[a], b, params[b], scores), f"{a} × {b}") for a, b in pairs
        )
        sections.append(("Scores for each pair of parameters", f'<div class="figs">{figs}</div>'))
    if params:
        figs = "".join(_figure(_slice(n, v, scores, folds), n) for n, v in params.items())
        sections.append(("One parameter at a time", f'<div class="figs">{figs}</div>'))
    sections.append(("Ranked candidates", _ranked(search, metric)))
    fit_time = np.asarray(results["mean_fit_time"], dtype=float)
    sections.append(("Fit time and score", _figure(_time_vs_score(fit_time, scores), "per candidate")))

    timeline = getattr(search, "fit_timeline_", None)
    if timeline and timeline.get("tasks"):
        events = Counter(e["event"] for e in timeline.get("events", []))
        note = ", ".join(f"{n} {e}" for e, n in sorted(events.items())) or "no node events"
        sections.append((
            "Where and when each fit ran",
            _figure(_gantt(timeline), f"{len(timeline['tasks'])} tasks; events: {note}"),
        ))  # fmt: skip
    sections.append(("Failures", _failures(getattr(search, "fit_failures_", []))))
    data = getattr(search, "data_bytes_per_node_", {})
    messages = getattr(search, "message_bytes_per_node_", {})
    if data or messages:
        rows = [
            (n, f"{data.get(n, 0) / 1e6:.2f}", f"{messages.get(n, 0) / 1e3:.1f}",
             getattr(search, "fits_per_node_", {}).get(n, 0))
            for n in sorted(set(data) | set(messages))
        ]  # fmt: skip
        sections.append((
            "Data and messages per node",
            _table(("node", "data sent (MB)", "task messages (kB)", "fits"), rows),
        ))  # fmt: skip
    raised = getattr(search, "fit_warnings_", [])
    sections.append((
        "Warnings the fits raised",
        _table(("category", "message", "fits", "nodes"),
               [(w["category"], w["message"], w["count"], ", ".join(w["nodes"])) for w in raised])
        if raised else "<p>None.</p>",
    ))  # fmt: skip

    body = "".join(f"<h2>{html.escape(h)}</h2>{content}" for h, content in sections)
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}{_CHECK}</body></html>"
    )
    out = Path(path)
    out.write_text(page, encoding="utf-8")
    return out
