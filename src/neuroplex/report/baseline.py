"""The baseline section of ``neuroplex report RUN --baseline OTHER``: do the functional
communities of each run recover its designed ensembles?

Both runs' test accuracy (best validation checkpoint and final epoch), then side by side for
every stage that has designed ensembles in either run: communities, modularity, NMI and ARI
against the design, and both unit-correlation heat maps ordered by designed ensemble, each
captioned with its block contrast. It renders the two runs' files; it computes nothing.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from neuroplex.report import captions, plots
from neuroplex.report.blocks import figure, fmt, section, table

CAPTION = (
    "Does each run work as its designed modules? Louvain communities of the unit correlation "
    "graph against the designed ensembles (NMI, ARI: 1 = the same partition, 0 = unrelated). "
    "A modular stage should score high; its dense twin (same units, same groups, every ensemble "
    "wired to every other) should not."
)
ACCURACY = {  # column -> summary.json key
    "test acc (final epoch)": "test_acc",
    "test acc (best val checkpoint)": "test_acc_at_best_val",
    "best val acc": "best_val_acc",
}
HEADER = ["stage", "run", "kind", "communities", "modularity Q", "NMI vs design", "ARI vs design"]


class Analysed(NamedTuple):
    """One run's files: its name, ``analysis.json``, the ``analysis.npz`` arrays and
    ``summary.json``."""

    name: str
    analysis: dict[str, Any]
    arrays: dict[str, np.ndarray]
    summary: dict[str, Any] | None = None


def designed_stages(run: Analysed, base: Analysed) -> list[int]:
    """Indices of the stages with designed ensembles in either run (present in both)."""
    pairs = zip(run.analysis["stages"], base.analysis["stages"], strict=False)
    return [a["stage"] for a, b in pairs if "nmi" in a or "nmi" in b]


def row(stage: int, run: Analysed) -> list[Any]:
    st = run.analysis["stages"][stage]
    if "nmi" not in st:
        agreement = ["no design", "no design"]
    else:
        agreement = [f"{st['nmi']:.2f}", f"{st['ari']:.2f}"]
    return [stage, run.name, st["kind"], st["communities"], f"{st['modularity']:.3f}", *agreement]


def heatmap(stage: int, run: Analysed) -> str:
    """The stage's unit correlation ordered by designed ensemble ('' without a design)."""
    corr = run.arrays.get(f"stage{stage}.corr")
    designed = run.arrays.get(f"stage{stage}.designed")
    if corr is None or designed is None:
        return ""
    nmi = run.analysis["stages"][stage]["nmi"]
    title = f"{run.name}, stage {stage}: NMI {nmi:.2f}"
    fig = plots.correlation_heatmap(corr, designed, title, grouping="designed ensemble")
    return figure(
        fig, captions.designed_heatmap(run.analysis["stages"][stage].get("design_contrast"))
    )


def accuracy(runs: tuple[Analysed, ...]) -> str:
    """Both runs' test accuracy, each figure named by its checkpoint ('' without summaries)."""
    keys = ACCURACY.values()
    rows = [
        [r.name, *(fmt(r.summary.get(k), percent=True) for k in keys)] for r in runs if r.summary
    ]
    return table(["run", *ACCURACY], rows) if rows else ""


def baseline_section(run: Analysed, base: Analysed) -> str:
    """The side-by-side section of ``run`` and its baseline ``base``."""
    stages = designed_stages(run, base)
    title = "Communities vs designed ensembles: against the baseline"
    scores = accuracy((run, base))
    if not stages:
        body = scores + "<p>Neither run has a stage with designed ensembles.</p>"
        return section(title, body, CAPTION)
    rows = [row(i, r) for i in stages for r in (run, base)]
    figs = "".join(heatmap(i, r) for i in stages for r in (run, base))
    return section(title, scores + table(HEADER, rows) + f'<div class="figs">{figs}</div>', CAPTION)
