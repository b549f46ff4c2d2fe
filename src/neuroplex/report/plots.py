"""Matplotlib figures written as PNG files. Each plot is titled, labelled and captioned."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_exits(report: dict[str, Any], path: Path) -> None:
    """Accuracy against mean stages executed for both early-exit policies."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, label, marker in (
        ("confidence", "confidence threshold", "o"),
        ("gate", "learned gate", "s"),
    ):
        points = sorted(report[key], key=lambda p: p["mean_stages"])
        ax.plot(
            [p["mean_stages"] for p in points],
            [100 * p["acc"] for p in points],
            marker=marker,
            label=label,
        )
    full = report["full"]
    ax.axhline(100 * full["acc"], color="grey", ls="--", lw=1, label="all stages")
    ax.axhline(100 * full["acc"] - 1, color="grey", ls=":", lw=1, label="all stages - 1 point")
    ax.set(
        xlabel="mean stages executed",
        ylabel="test accuracy (%)",
        title="Early exit: accuracy vs compute",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.text(0.01, 0.01, "Up and to the left is better.", fontsize=8, color="grey")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
