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
    """Loss and accuracy of the train, validation and test splits at the end of each epoch,
    against the optimizer step (x axis in steps)."""
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
    """Accuracy against mean stages executed for every early-exit policy; the settings chosen
    on the validation split circled."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, label, marker in (
        ("confidence", "confidence threshold", "o"),
        ("jei", "JEI-DNN gates (λ)", "s"),
        ("correctness", "correctness predictor", "^"),
    ):
        points = sorted(report[key], key=lambda p: p["mean_stages"])
        (line,) = ax.plot(
            [p["mean_stages"] for p in points],
            [100 * p["acc"] for p in points],
            marker=marker,
            ms=4,
            label=label,
        )
        chosen = report["selected_on_val"][key]
        if chosen is not None:
            point = chosen["test"]
            ax.plot(
                point["mean_stages"],
                100 * point["acc"],
                "o",
                ms=11,
                mfc="none",
                color=line.get_color(),
            )
    full = report["full"]
    ax.axhline(100 * full["acc"], color="grey", ls="--", lw=1, label="all stages")
    ax.axhline(100 * full["acc"] - 1, color="grey", ls=":", lw=1, label="all stages - 1 point")
    ax.set(
        xlabel="mean stages executed",
        ylabel=f"{report['split']} accuracy (%)",
        title="Early exit (circled: chosen on val)",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def correlation_heatmap(
    corr: np.ndarray, labels: np.ndarray, title: str, grouping: str = "community"
) -> Figure:
    """Unit correlation with units ordered by ``labels`` (a community or a designed ensemble
    per unit, named by ``grouping``), group borders drawn."""
    order = np.argsort(labels, kind="stable")
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    image = ax.imshow(corr[np.ix_(order, order)], cmap="RdBu_r", vmin=-1, vmax=1)
    borders = np.flatnonzero(np.diff(labels[order])) + 0.5
    for b in borders:
        ax.axhline(b, color="k", lw=0.6)
        ax.axvline(b, color="k", lw=0.6)
    ax.set(title=title, xlabel=f"unit (ordered by {grouping})", ylabel="unit")
    fig.colorbar(image, ax=ax, label="correlation")
    fig.tight_layout()
    return fig


def matrix_heatmap(
    matrix: np.ndarray,
    title: str,
    xlabel: str,
    ylabel: str,
    *,
    vmin: float = 0,
    vmax: float = 1,
    value_label: str = "",
) -> Figure:
    """A small annotated matrix (CKA between stages, ensemble correlation, routing)."""
    rows, cols = matrix.shape
    fig, ax = plt.subplots(figsize=(max(4.2, 2.0 + 0.55 * cols), max(3.0, 1.6 + 0.45 * rows)))
    image = ax.imshow(matrix, cmap="viridis", vmin=vmin, vmax=vmax)
    if matrix.size <= 100:
        for (i, j), value in np.ndenumerate(matrix):
            dark = value < (vmin + vmax) / 2  # white text on the dark half of viridis
            color = "w" if dark else "k"
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8, color=color)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.set_xticks(range(matrix.shape[1]))
    ax.set_yticks(range(matrix.shape[0]))
    fig.colorbar(image, ax=ax, label=value_label)
    fig.tight_layout()
    return fig


def wiring_drawing(links: list[np.ndarray], mass: list[np.ndarray], title: str) -> Figure:
    """Ensembles of a sparse stage as dots in columns (input, then each layer's output) and
    one line per connected block; ``links[l]`` / ``mass[l]`` ``[g_out, g_in]`` of layer ``l``
    set the line's opacity (fraction of links present) and width (mean |weight|)."""
    fig, ax = plt.subplots(figsize=(2.2 + 1.8 * len(links), 4.0))
    top = max(float(m.max()) for m in mass) or 1.0
    for col, (lk, ms) in enumerate(zip(links, mass, strict=True)):
        y_in, y_out = _spread(lk.shape[1]), _spread(lk.shape[0])
        for j, i in zip(*np.nonzero(lk), strict=True):
            ax.plot(
                [col, col + 1],
                [y_in[i], y_out[j]],
                color="tab:blue",
                lw=0.4 + 2.6 * ms[j, i] / top,
                alpha=0.25 + 0.75 * lk[j, i],
            )
        ax.scatter([col] * len(y_in), y_in, color="k", s=18, zorder=3)
    ax.scatter([len(links)] * links[-1].shape[0], _spread(links[-1].shape[0]), color="k", s=18)
    ax.set_xticks(range(len(links) + 1), ["input"] + [f"layer {i + 1}" for i in range(len(links))])
    g = links[0].shape[1]
    ax.set_yticks(_spread(g), [str(e) for e in range(g)] if g <= 16 else [""] * g)
    ax.set(title=title, xlabel="layer (ensembles as dots)", ylabel="ensemble")
    fig.tight_layout()
    return fig


def _spread(n: int) -> np.ndarray:
    """``n`` node heights evenly spaced over [0, 1], ensemble 0 at the top."""
    return np.linspace(1, 0, n) if n > 1 else np.array([0.5])


def load_bars(load: np.ndarray, title: str) -> Figure:
    """Share of the top-k assignments per expert, with the uniform share for reference."""
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    ax.bar(range(len(load)), 100 * np.asarray(load), color="tab:blue")
    ax.axhline(100 / len(load), color="grey", ls="--", lw=1, label="uniform")
    ax.set(title=title, xlabel="expert", ylabel="share of assignments (%)")
    ax.set_xticks(range(len(load)))
    ax.legend()
    fig.tight_layout()
    return fig


def entropy_bars(report: dict[str, Any], title: str) -> Figure:
    """Routing entropies and expert-class MI in bits, against their ceilings."""
    names = ["per-input gate\nentropy", "entropy of\nmean load", "expert-class\nMI"]
    values = [report["token_entropy_bits"], report["load_entropy_bits"], report["mi_bits"]]
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    ax.bar(names, values, color=["tab:orange", "tab:blue", "tab:green"])
    ax.axhline(report["max_entropy_bits"], color="grey", ls="--", lw=1, label="log2(experts)")
    ax.axhline(report["class_entropy_bits"], color="tab:green", ls=":", lw=1, label="H(class)")
    ax.set(title=title, ylabel="bits")
    ax.set_ylim(0, 1.3 * max(*values, report["max_entropy_bits"], report["class_entropy_bits"]))
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def structure_scatter(structural: np.ndarray, functional: np.ndarray, title: str) -> Figure:
    """One dot per ensemble pair: shared input (structure) against co-activation (function)."""
    fig, ax = plt.subplots(figsize=(4.6, 3.8))
    ax.scatter(structural, functional, s=22, alpha=0.8)
    ax.set(
        title=title,
        xlabel="structure: shared input (cosine of path mass)",
        ylabel="function: mean |correlation|",
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plasticity_figure(layers: list[dict[str, Any]], kind: str) -> Figure:
    """Per rewired layer, against the step of each event: connections swapped, density, and
    the fraction of links between different ensembles (when the log records it)."""
    fig, (ax_swap, ax_density, ax_cross) = plt.subplots(1, 3, figsize=(13, 3.6))
    for row in layers:
        steps = row["steps"]
        ax_swap.plot(steps, row["pruned"], marker="o", ms=3, label=row["layer"])
        ax_density.plot(steps, row["density"], marker="o", ms=3, label=row["layer"])
        cross = [np.nan if c is None else 100 * c for c in row["cross_fraction"]]
        ax_cross.plot(steps, cross, marker="o", ms=3, label=row["layer"])
    ax_swap.set(xlabel="step", ylabel="connections swapped", title=f"{kind} events")
    ax_density.set(xlabel="step", ylabel="density after the event", title="density")
    ax_cross.set(xlabel="step", ylabel="links between ensembles (%)", title="links across modules")
    for ax in (ax_density, ax_cross):
        ax.set_ylim(0, 1.15 * ax.get_ylim()[1])  # from 0, the top point clear of the frame
    for ax in (ax_swap, ax_density, ax_cross):
        ax.grid(alpha=0.3)
    ax_swap.legend(fontsize=7)
    fig.tight_layout()
    return fig


def sweep_figure(cells: list[dict[str, Any]], best: str | None, select: str) -> Figure:
    """Validation and test accuracy of every sweep cell, mean ± std over seeds (error bars);
    the cell selected on ``select`` (validation) is marked ★."""
    labels = [
        ("★ " if c["name"] == best else "") + (c["name"] or "base").replace("_", "\n")
        for c in cells
    ]
    x = np.arange(len(cells))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(cells) + 2), 4.0))
    for offset, (key, label) in ((-0.1, (select, "validation")), (0.1, ("test_acc", "test"))):
        means = [100 * c[key]["mean"] if c[key]["mean"] is not None else np.nan for c in cells]
        stds = [100 * c[key]["std"] if c[key]["std"] is not None else 0.0 for c in cells]
        ax.errorbar(x + offset, means, yerr=stds, fmt="o", capsize=4, label=label)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_xlim(-0.5, len(cells) - 0.5)
    ax.set(ylabel="accuracy (%), final epoch", title="sweep: mean ± std over seeds")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    return fig
