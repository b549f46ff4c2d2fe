"""Matplotlib figures of what a run and its analysis produced. Each plot is titled and labelled;
the caption saying what to look for is placed by the caller. Nothing is computed here beyond
ordering rows for display."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def to_png_base64(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def save_png(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def learning_curves(rows: list[dict[str, Any]], title: str) -> Figure:
    """Loss and accuracy per epoch for the train, validation and test splits."""
    steps = [r["step"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for split, label in (("train", "train"), ("val", "validation"), ("test", "test")):
        if rows and f"{split}_loss" in rows[0]:
            ax_loss.plot(steps, [r[f"{split}_loss"] for r in rows], label=label)
            ax_acc.plot(steps, [100 * r[f"{split}_acc"] for r in rows], label=label)
    ax_loss.set(xlabel="step", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="step", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def exits_figure(report: dict[str, Any]) -> Figure:
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
    ax.set(xlabel="mean stages executed", ylabel="accuracy (%)", title="Early exit")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def correlation_heatmap(corr: np.ndarray, labels: np.ndarray, title: str) -> Figure:
    """Unit correlation with units ordered by community, community borders drawn."""
    order = np.argsort(labels, kind="stable")
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    image = ax.imshow(corr[np.ix_(order, order)], cmap="RdBu_r", vmin=-1, vmax=1)
    borders = np.flatnonzero(np.diff(labels[order])) + 0.5
    for b in borders:
        ax.axhline(b, color="k", lw=0.6)
        ax.axvline(b, color="k", lw=0.6)
    ax.set(title=title, xlabel="unit (ordered by community)", ylabel="unit")
    fig.colorbar(image, ax=ax, label="correlation")
    fig.tight_layout()
    return fig


def matrix_heatmap(
    matrix: np.ndarray, title: str, xlabel: str, ylabel: str, *, vmin: float = 0, vmax: float = 1
) -> Figure:
    """A small annotated matrix (CKA between stages, ensemble correlation)."""
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    image = ax.imshow(matrix, cmap="viridis", vmin=vmin, vmax=vmax)
    if matrix.size <= 100:
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8, color="w")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.set_xticks(range(matrix.shape[1]))
    ax.set_yticks(range(matrix.shape[0]))
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig
