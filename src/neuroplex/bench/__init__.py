"""Benchmarks: side-by-side measurements that write JSON and a markdown table."""

import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from neuroplex.files import atomic_write_json, atomic_write_text

METRIC_TITLES = (("fwd_bwd", "Forward + backward"), ("fwd", "Forward (no_grad)"))


def machine() -> str:
    """One line naming the machine the figures come from."""
    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def write(result: dict[str, Any], out: Path, table: Callable[[dict[str, Any]], str]) -> None:
    """``result`` as JSON at ``out`` and ``table(result)`` beside it (``.md``), atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    atomic_write_text(out.with_suffix(".md"), table(result))


def metric_sections(head: str, render: Callable[[str], str]) -> str:
    """Markdown: ``head``, then a forward + backward and a forward-only table (``render``
    turns a metric name into its table)."""
    parts = [head]
    for metric, title in METRIC_TITLES:
        parts += ["", f"**{title}**", "", render(metric)]
    return "\n".join(parts)
