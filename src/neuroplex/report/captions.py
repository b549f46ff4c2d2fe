"""Captions of the report, written from the numbers they describe.

One pure function per caption: it takes the figures that ``summary.json``, ``analysis.json`` or
``exits.json`` hold for a plot and returns the sentence under it, so a caption never claims
what its plot does not show. Nothing is computed here beyond the ratio of two given numbers
and the choice of words.
"""

from __future__ import annotations

from typing import Any

BRIGHT, FAINT = 2.0, 1.3  # inside/outside |corr| ratios read as bright / faint diagonal blocks


def pct(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


def num(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def blocks(inside: float, outside: float | None) -> str:
    """How diagonal blocks of mean |corr| ``inside`` against ``outside`` look."""
    if outside is None:
        return "a single group, so no blocks to compare"
    ratio = inside / outside if outside > 0 else float("inf")
    if ratio >= BRIGHT:
        look = "bright blocks on the diagonal"
    elif ratio >= FAINT:
        look = "faint blocks on the diagonal"
    else:
        look = "no blocks on the diagonal"
    return f"|corr| {inside:.2f} inside vs {outside:.2f} between ({ratio:.1f}×): {look}"


def learning_curves(summary: dict[str, Any]) -> str:
    """Under the loss and accuracy curves: the evaluation cadence, the axis unit, and which
    checkpoint gives which test accuracy."""
    epochs, steps = summary.get("epochs"), summary.get("steps")
    text = (
        f"Train, validation and test loss and accuracy, evaluated at the end of each of the "
        f"{epochs} epochs; the x axis counts optimizer steps ({steps} in all). "
    )
    if summary.get("best_val_acc") is None:
        return text + (
            "Without a validation split the best checkpoint is the last epoch: test accuracy "
            f"{pct(summary.get('test_acc'), 2)}."
        )
    return text + (
        f"Best validation accuracy {pct(summary['best_val_acc'], 2)} at epoch "
        f"{summary.get('best_epoch')}: that checkpoint (what eval and analyze load by default) "
        f"has test accuracy {pct(summary.get('test_acc_at_best_val'), 2)}; the final epoch "
        f"{pct(summary.get('test_acc'), 2)}. A widening gap between train and validation means "
        "overfitting."
    )


def communities(probe: int, stages: list[dict[str, Any]]) -> str:
    """Above the unit-correlation heat maps ordered by Louvain community."""
    parts = []
    for st in stages:
        contrast = st.get("community_contrast")
        look = "" if contrast is None else f", {blocks(contrast['inside'], contrast['outside'])}"
        parts.append(
            f"stage {st['stage']}: {st['communities']} communities, Q {st['modularity']:.2f}{look}"
        )
    return (
        f"Correlation of unit activations on {probe} test inputs, units ordered by Louvain "
        f"community; {'; '.join(parts)}. NMI compares the communities with the designed "
        "ensembles (1 = function follows wiring)."
    )


def designed_heatmap(contrast: dict[str, float | None] | None) -> str:
    """Under a unit-correlation heat map ordered by designed ensemble."""
    if contrast is None:
        return "Units ordered by designed ensemble."
    look = blocks(contrast["inside"], contrast["outside"])
    inside, outside = contrast["inside"], contrast["outside"]
    verdict = (
        "the designed ensembles co-activate as modules"
        if outside is not None and inside >= BRIGHT * outside
        else "the units do not co-activate along the designed ensembles"
    )
    return f"Designed ensembles: {look} — {verdict}."


def cka(analysis: dict[str, Any]) -> str:
    """Beside the CKA matrix between stages and its shuffled-rows baseline."""
    estimator = analysis.get("cka_estimator", "biased")  # files written before the option
    adjacent = analysis.get("cka_adjacent") or []
    shown = ", ".join(f"{v:.2f}" for v in adjacent) if adjacent else "n/a (one stage)"
    text = (
        f"Linear CKA ({estimator} HSIC estimator) between stage outputs on {analysis['probe']} "
        "test inputs: 1 = the same representation up to rotation and scale. Consecutive stages: "
        f"{shown}."
    )
    if "cka_shuffled_max_abs" in analysis:
        text += (
            " Right: the same CKA with the rows of the second representation shuffled (inputs "
            f"no longer matched), |CKA| ≤ {analysis['cka_shuffled_max_abs']:.2f}; a figure near "
            "its baseline means no shared structure."
        )
    if estimator == "biased":
        text += " The biased estimator is far from 0 for unrelated data at finite n."
    return text


def wiring(layer_links: list[dict[str, Any]]) -> str:
    """Under the ensemble wiring drawing of one sparse stage."""
    parts = []
    for i, row in enumerate(layer_links):
        cross = row["cross_links"]
        between = "n/a" if cross is None or row["links"] == 0 else pct(cross / row["links"], 0)
        parts.append(
            f"layer {i + 1}: {row['linked_pairs']} of {row['pairs']} ensemble pairs linked, "
            f"density {row['density']:.3f}, {between} of its links between different ensembles"
        )
    return "; ".join(parts) + "."


def structure(found: dict[str, Any]) -> str:
    """Under the structure vs function scatter of one sparse stage."""
    rho, p, pairs = found["rho"], found["p"], found["pairs"]
    if rho is None:
        return (
            f"No ranking to follow over {pairs} ensemble pairs (fewer than 3, or every pair "
            "equally linked): structure cannot predict function here."
        )
    if rho >= 0.5:
        look = "dots rise to the right: ensembles that share input also co-activate"
    elif rho >= 0.2:
        look = "a weak upward trend: shared input only partly predicts co-activation"
    else:
        look = "no upward trend: co-activation does not follow shared input"
    return f"Spearman rho {rho:.2f} (p {p:.2g}) over {pairs} ensemble pairs: {look}."


def load(report: dict[str, Any]) -> str:
    """Under the load-per-expert bars of one MoE stage."""
    uniform = 1 / report["experts"]
    high, low = report["load_max"], report["load_min"]
    balanced = high <= 1.5 * uniform and low >= uniform / 1.5
    verdict = "roughly balanced" if balanced else "unbalanced"
    return (
        f"Expert loads from {pct(low)} to {pct(high)} against the uniform {pct(uniform)} "
        f"(dashed line): {verdict}."
    )


def routing_matrix(report: dict[str, Any]) -> str:
    """Under the experts x classes matrix of top-1 choices of one MoE stage."""
    top, majority = report["top_share_max"], report["classes_with_majority_expert"]
    if majority == 0:
        return (
            f"Largest cell {top:.2f}: no class sends most of its inputs to one expert, so "
            "experts do not specialise by class."
        )
    return (
        f"Largest cell {top:.2f}; {majority} of {report['classes']} classes send most of their "
        "inputs to one expert (a column with one bright cell)."
    )


def entropy(report: dict[str, Any]) -> str:
    """Under the routing entropy bars of one MoE stage."""
    top = report["max_entropy_bits"]
    return (
        f"Per-input gate entropy {report['token_entropy_bits']:.2f} of at most {top:.2f} bits "
        f"(lower = more confident routing); load entropy {report['load_entropy_bits']:.2f} of "
        f"{top:.2f} (at the maximum: balanced); expert-class MI {report['mi_bits']:.2f} bits, "
        f"{pct(report['mi_over_class_entropy'], 0)} of H(class)."
    )


def exits(report: dict[str, Any]) -> str:
    """Under the early-exit curve: the full network and each policy's setting chosen on val."""
    stages = report.get("stages")
    text = (
        f"Accuracy against mean stages executed on {report.get('split', 'test')} "
        f"({report.get('checkpoint', 'best')} checkpoint); all stages "
        f"{pct(report['full']['acc'], 2)}, the dotted line one point below."
    )
    names = {
        "jei": "JEI-DNN gates",
        "confidence": "confidence threshold",
        "correctness": "correctness gates",
    }
    for key, name in names.items():
        chosen = report.get("selected_on_val", {}).get(key)
        if chosen is None:
            text += f" {name}: no setting within one point on val."
            continue
        best = chosen["test"]
        saved = f" ({pct(1 - best['mean_stages'] / stages, 0)} saved)" if stages else ""
        text += (
            f" {name}, chosen on val: {best['mean_stages']:.2f} stages{saved} at "
            f"{pct(best['acc'], 2)} on test."
        )
    return text


def plasticity(report: dict[str, Any]) -> str:
    """Beside the plasticity figure: events, swaps, density and links between modules."""
    kind = report.get("kind")
    if report["events"] == 0:
        return (
            f"train.plasticity.kind is {kind}, but plasticity.jsonl holds no event: the run "
            "ended before the first one, or no layer had a connection to swap."
        )
    layers = [row for row in report["layers"] if "steps" in row]
    steps = report["steps"]
    when = (
        f"step {steps[0]}" if len(steps) == 1 else f"{len(steps)} steps, {steps[0]} to {steps[-1]}"
    )
    parts = [
        f"{row['layer']}: {row['swapped']:,} connections swapped, density "
        f"{row['density_start']:.3f} → {row['density_end']:.3f}, links between different "
        f"ensembles {pct(row['cross_fraction_start'], 0)} → {pct(row['cross_fraction_end'], 0)}"
        for row in layers
    ]
    return (
        f"{kind} rewired {len(layers)} layer(s) at {when} (x axes in optimizer steps). "
        f"{'; '.join(parts)}."
    )
