"""Reporting: human units, rich tables for the terminal, matplotlib PNGs and one self-contained HTML page."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from memopt.core.atomic import save_figure

__all__ = [
    "CATEGORY_COLORS",
    "dumps",
    "format_bytes",
    "html_page",
    "html_table",
    "plot_breakdown_timeline",
    "rich_table",
]

CATEGORY_COLORS = {
    "params": "#4C72B0",
    "buffers": "#8172B2",
    "grads": "#DD8452",
    "optimizer": "#C44E52",
    "activations": "#55A868",
}


def format_bytes(n: int | float | None) -> str:
    """Binary units, three significant digits: 16793600 -> '16.0 MiB'."""
    if n is None:
        return "–"
    n = float(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            if unit == "B":
                return f"{sign}{int(n)} B"
            return f"{sign}{n:.3g} {unit}" if n < 100 else f"{sign}{n:.0f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def rich_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Any:
    """A rich Table; numeric-looking columns (all but the first) are right-aligned."""
    from rich.table import Table

    table = Table(title=title, title_justify="left", header_style="bold", min_width=len(title) + 2)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    return table


def plot_breakdown_timeline(result: dict, path: str | Path, title: str = "") -> None:
    """Two panels: the category split at the peak (one stacked bar) and the timeline (stacked area).

    ``result`` is a tracker/profile dict with ``breakdown`` and ``timeline`` (points with ``index``,
    ``phase`` and ``bytes`` by category).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mib = 1024 * 1024
    fig, (ax_bar, ax_line) = plt.subplots(
        1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 4]}, constrained_layout=True
    )
    bottom = 0.0
    for cat, color in CATEGORY_COLORS.items():
        v = result.get("breakdown", {}).get(cat, 0) / mib
        ax_bar.bar(0, v, bottom=bottom, color=color, label=f"{cat} {v:.1f} MiB", width=0.6)
        bottom += v
    ax_bar.set_xticks([])
    ax_bar.set_ylabel("MiB at peak")
    ax_bar.set_title("at the peak")
    ax_bar.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.02))

    timeline = result.get("timeline") or []
    # Params and buffers are flat over a step and would flatten the rest: the timeline shows the
    # working memory above them (grads, optimizer state, activations) and states the constant.
    working = ("grads", "optimizer", "activations")
    if timeline:
        xs = [p["index"] for p in timeline]
        stacks = [[p["bytes"].get(c, 0) / mib for p in timeline] for c in working]
        ax_line.stackplot(
            xs, stacks, colors=[CATEGORY_COLORS[c] for c in working], step="post", labels=working
        )
        const = max(p["bytes"].get("params", 0) + p["bytes"].get("buffers", 0) for p in timeline)
        ax_line.text(
            0.01,
            0.97,
            f"+ params and buffers: {const / mib:.1f} MiB throughout",
            transform=ax_line.transAxes,
            va="top",
            fontsize=8,
        )
        last = None
        for p in timeline:  # a dotted line where forward / backward / optimizer begins
            if p["phase"] != last and p["phase"] != "start":
                ax_line.axvline(p["index"], color="grey", lw=0.6, ls=":")
                ax_line.text(
                    p["index"],
                    ax_line.get_ylim()[1] * 0.5,
                    f" {p['phase']}",
                    fontsize=7,
                    rotation=90,
                    va="center",
                )
            last = p["phase"]
        ax_line.legend(fontsize=8, loc="upper right")
    ax_line.set_xlabel("allocation / free event")
    ax_line.set_ylabel("live MiB above params + buffers")
    ax_line.set_title(title or "memory over the step")
    save_figure(fig, path, dpi=110)


def html_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in row)
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_page(title: str, sections: Sequence[tuple[str, str]], images: Sequence[Path] = ()) -> str:
    """One self-contained page: sections are (heading, HTML body); PNGs are inlined as data URIs."""
    parts = [f"<h2>{html.escape(h)}</h2>\n{body}" for h, body in sections]
    for img in images:
        data = base64.b64encode(Path(img).read_bytes()).decode("ascii")
        parts.append(
            f'<figure><img alt="{html.escape(img.name)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(img.name)}</figcaption></figure>"
        )
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 10px}"
        "td{text-align:right}td:first-child{text-align:left}th{background:#f3f3f3}"
        "img{max-width:100%}pre{background:#f6f6f6;padding:1em;overflow:auto}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>\n"
        + "\n".join(parts)
        + "</body></html>\n"
    )


def dumps(obj: Any) -> str:
    """JSON for reports and ``--json``: stable key order, no NaN."""
    return json.dumps(obj, indent=2, allow_nan=False, default=str)
