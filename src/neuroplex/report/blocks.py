"""HTML building blocks of the report: sections, tables, embedded figures, number formats."""

from __future__ import annotations

import html
from typing import Any

from neuroplex.report import plots


def section(title: str, body: str, caption: str = "") -> str:
    note = f'<p class="caption">{html.escape(caption)}</p>' if caption else ""
    return f"<section><h2>{html.escape(title)}</h2>{note}{body}</section>"


def image(fig) -> str:
    return f'<img alt="" src="data:image/png;base64,{plots.to_png_base64(fig)}">'


def figure(fig, caption: str) -> str:
    """A plot with its one-line caption under it."""
    note = f'<figcaption class="caption">{html.escape(caption)}</figcaption>'
    return f"<figure>{image(fig)}{note}</figure>"


def table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def fmt(value: Any, percent: bool = False) -> str:
    if value is None:
        return "n/a"
    if percent:
        return f"{100 * value:.2f}%"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"
