"""``neuroplex report``: one self-contained HTML page of everything a run produced.

Inline CSS, plots as embedded PNG, no network access. It renders the files the run directory
holds (config.yaml, metrics.jsonl, summary.json, analysis.json/.npz, exits.json) and benchmark
tables; it computes nothing. Captions are written from the numbers of the plot they describe
(neuroplex.report.captions).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from neuroplex.files import atomic_write_text, read_jsonl
from neuroplex.report import captions, plots
from neuroplex.report.baseline import Analysed, baseline_section
from neuroplex.report.blocks import figure, fmt, image, section, table

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;
  padding:0 1em;color:#222;line-height:1.45}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
.caption{color:#555;font-size:.92em;margin:.3em 0 1em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.92em}
td,th{border:1px solid #ddd;padding:.3em .6em;text-align:left} th{background:#f5f5f5}
pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.85em}
.figs{display:flex;flex-wrap:wrap;gap:1em} img{max-width:100%}
figure{margin:0;max-width:520px}
.kpi{display:inline-block;margin:0 1.5em .5em 0} .kpi b{font-size:1.4em;display:block}
"""


def markdown_table(text: str) -> str:
    """A markdown pipe table (as the benchmarks write) as HTML; other lines as paragraphs."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    rows = [
        [c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("|")
    ]
    rows = [r for r in rows if not all(set(c) <= set("-: ") for c in r)]
    prose = "".join(f"<p>{html.escape(line)}</p>" for line in lines if not line.startswith("|"))
    return prose + (table(rows[0], rows[1:]) if rows else "")


def overview(summary: dict[str, Any]) -> str:
    best = f"test acc (best val checkpoint, epoch {summary.get('best_epoch')})"
    kpis = [
        ("test acc (final epoch)", fmt(summary.get("test_acc"), percent=True)),
        (best, fmt(summary.get("test_acc_at_best_val"), percent=True)),
        ("best val accuracy", fmt(summary.get("best_val_acc"), percent=True)),
        ("parameters", fmt(summary.get("params"))),
        ("activation memory", f"{summary.get('activation_bytes_peak', 0) / 2**20:.2f} MiB"),
        ("train time", f"{summary.get('train_time_s', 0):.1f} s"),
        ("status", str(summary.get("status"))),
    ]
    cards = "".join(f'<span class="kpi"><b>{html.escape(v)}</b>{k}</span>' for k, v in kpis)
    rows = [[k, fmt(v) if not isinstance(v, dict) else json.dumps(v)] for k, v in summary.items()]
    return cards + table(["summary.json", "value"], rows)


def analysis_sections(analysis: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
    rows = [
        [
            st["stage"],
            st["kind"],
            st["units"],
            st["communities"],
            f"{st['modularity']:.3f}",
            f"{st['nmi']:.2f}" if "nmi" in st else "no design",
            f"{100 * st['dead']:.0f}%",
        ]
        for st in analysis["stages"]
    ]
    header = ["stage", "kind", "units", "communities", "modularity Q", "NMI vs design", "dead"]
    figs = []
    for st in analysis["stages"]:
        i = st["stage"]
        corr, labels = arrays.get(f"stage{i}.corr"), arrays.get(f"stage{i}.labels")
        if corr is not None and labels is not None:
            title = f"stage {i} ({st['kind']}): unit correlation"
            figs.append(image(plots.correlation_heatmap(corr, labels, title)))
    body = table(header, rows) + f'<div class="figs">{"".join(figs)}</div>'
    out = section(
        "Functional connectivity",
        body,
        captions.communities(analysis["probe"], analysis["stages"]),
    )
    out += section("Representation similarity", cka_figures(analysis), captions.cka(analysis))
    if analysis.get("path_norm"):
        pn = analysis["path_norm"]
        out += section(
            "Path-norm",
            table(["norm", "value"], [["L1", fmt(pn["l1"])], ["L2", fmt(pn["l2"])]]),
            "Path-norms of the trained network (one forward pass of |θ| on a ones input); "
            "smaller values go with better generalisation bounds.",
        )
    return out


def cka_figures(analysis: dict[str, Any]) -> str:
    """The CKA matrix between stages beside its shuffled-rows baseline."""
    estimator = analysis["cka_estimator"]
    matrices = [
        ("cka_between_stages", f"linear CKA ({estimator}) between stages"),
        ("cka_shuffled_between_stages", "shuffled-rows baseline"),
    ]
    figs = [
        image(plots.matrix_heatmap(np.array(analysis[key]), title, "stage", "stage"))
        for key, title in matrices
    ]
    return f'<div class="figs">{"".join(figs)}</div>'


def plasticity_section(analysis: dict[str, Any]) -> str:
    """Events over time, density and links across modules ('' for a run without plasticity)."""
    report = analysis.get("plasticity")
    if report is None:
        return ""
    caption = captions.plasticity(report)
    layers = [row for row in report["layers"] if "steps" in row]
    if not layers:
        return section("Plasticity", "", caption)
    at = f"links between ensembles ({analysis['checkpoint']} checkpoint)"
    header = ["layer", "events", "swapped", "density", at]
    rows = [
        [
            row["layer"],
            len(row["steps"]),
            f"{row['swapped']:,}",
            f"{row['density_end']:.3f}",
            fmt(row["checkpoint"]["cross_links"]) + f" of {row['checkpoint']['links']:,}",
        ]
        for row in layers
    ]
    fig = image(plots.plasticity_figure(layers, report["kind"]))
    return section("Plasticity", table(header, rows) + fig, caption)


def wiring_section(analysis: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
    figs = []
    for st in analysis["stages"]:
        i, links, mass = st["stage"], [], []
        while f"stage{i}.layer{len(links)}.links" in arrays:
            links.append(arrays[f"stage{i}.layer{len(links)}.links"])
            mass.append(arrays[f"stage{i}.layer{len(mass)}.mass"])
        if links:
            unit = "channel ensemble" if st["kind"] == "sparse_conv" else "ensemble"
            fig = plots.wiring_drawing(links, mass, f"stage {i} ({st['kind']}): {unit} wiring")
            figs.append(figure(fig, captions.wiring(st["structure"]["layer_links"])))
    if not figs:
        return ""
    paths = "; ".join(r["text"] for r in analysis.get("sparse_layers", []))
    return section(
        "Wiring",
        f'<div class="figs">{"".join(figs)}</div><p>Execution paths: {html.escape(paths)}</p>',
        "Ensembles of each sparse stage (dots; channel ensembles of a sparse_conv stage) and the "
        "blocks that connect them, layer by layer: line opacity = fraction of the block's links "
        "present, width = mean |weight| (a conv's summed over its kernel taps).",
    )


def structure_section(analysis: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
    rows, figs = [], []
    for st in analysis["stages"]:
        if "structure" not in st:
            continue
        i, found = st["stage"], st["structure"]
        weights, wiring = found["from_weights"], found["from_wiring"]
        rows.append(
            [i, weights["pairs"], fmt(weights["rho"]), fmt(weights["p"]), fmt(wiring["rho"])]
        )
        title = f"stage {i}: structure vs function (rho {fmt(weights['rho'])})"
        fig = plots.structure_scatter(
            arrays[f"stage{i}.pairs_structure"], arrays[f"stage{i}.pairs_function"], title
        )
        figs.append(figure(fig, captions.structure(weights)))
    if not rows:
        return ""
    header = ["stage", "ensemble pairs", "Spearman rho (weights)", "p", "rho (wiring only)"]
    return section(
        "Structure vs function",
        table(header, rows) + f'<div class="figs">{"".join(figs)}</div>',
        "Does function follow structure? Spearman rank correlation over ensemble pairs between "
        "shared input through the trained weights and activation correlation; near 1 = yes.",
    )


ROUTING_COLUMNS = {
    "stage": "stage",
    "experts": "experts",
    "k": "k",
    "mi_bits": "MI (bits)",
    "mi_over_class_entropy": "MI / H(class)",
    "token_entropy_bits": "gate entropy",
    "load_entropy_bits": "load entropy",
}


def routing_section(analysis: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
    reports = analysis.get("routing") or []
    if not reports:
        return ""
    rows = [[fmt(r[key]) for key in ROUTING_COLUMNS] for r in reports]
    figs = "".join(routing_figures(r, arrays) for r in reports)
    return section(
        "Routing",
        table(list(ROUTING_COLUMNS.values()), rows) + f'<div class="figs">{figs}</div>',
        f"How the mixture-of-experts stages route the {analysis['probe']} probe inputs (eval "
        "mode); entropies and MI in bits, MI between top-1 expert and class 0 = routing "
        "ignores the class.",
    )


def routing_figures(report: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
    """Load per expert, the experts x classes matrix and the entropies of one MoE stage."""
    i = report["stage"]
    heatmap = plots.matrix_heatmap(
        arrays[f"stage{i}.routing_frac"],
        f"stage {i}: top-1 expert per class",
        "class",
        "expert",
        value_label="P(expert | class)",
    )
    return "".join(
        [
            figure(
                plots.load_bars(arrays[f"stage{i}.load"], f"stage {i}: load per expert"),
                captions.load(report),
            ),
            figure(heatmap, captions.routing_matrix(report)),
            figure(
                plots.entropy_bars(report, f"stage {i}: routing entropy"),
                captions.entropy(report),
            ),
        ]
    )


def read_analysis(run_dir: Path) -> Analysed | None:
    """The run's analysis files, or None before ``neuroplex analyze``."""
    if not (run_dir / "analysis.json").exists():
        return None
    analysis = json.loads((run_dir / "analysis.json").read_text())
    with np.load(run_dir / "analysis.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    summary = json.loads((run_dir / "summary.json").read_text())
    return Analysed(run_dir.name, analysis, arrays, summary)


def render(run_dir: Path, bench: list[Path] | None = None, baseline: Path | None = None) -> str:
    """The report page of ``run_dir`` as an HTML string; with ``baseline`` (an analysed run),
    a section comparing both runs' communities with their designed ensembles."""
    summary = json.loads((run_dir / "summary.json").read_text())
    parts = [section("Overview", overview(summary))]
    analysed = read_analysis(run_dir)
    if baseline is not None and analysed is not None:
        parts.append(baseline_section(analysed, read_analysis(baseline)))
    rows = read_jsonl(run_dir / "metrics.jsonl")
    if rows:
        fig = plots.learning_curves(rows, f"{run_dir.name} ({summary.get('method')})")
        parts.append(section("Learning curves", image(fig), captions.learning_curves(summary)))
    if analysed is not None:
        parts.append(wiring_section(analysed.analysis, analysed.arrays))
        parts.append(plasticity_section(analysed.analysis))
        for build in (analysis_sections, structure_section, routing_section):
            parts.append(build(analysed.analysis, analysed.arrays))
    if (run_dir / "exits.json").exists():
        exits = json.loads((run_dir / "exits.json").read_text())
        parts.append(section("Early exit", image(plots.exits_figure(exits)), captions.exits(exits)))
    for path in bench or []:
        parts.append(section(f"Benchmark: {path.stem}", markdown_table(path.read_text())))
    config = (run_dir / "config.yaml").read_text()
    parts.append(section("Configuration", f"<pre>{html.escape(config)}</pre>"))
    title = f"neuroplex report: {run_dir.name}"
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}'
        f"</title><style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        f"{''.join(parts)}</body></html>\n"
    )


def write_report(
    run_dir: Path, bench: list[Path] | None = None, baseline: Path | None = None
) -> Path:
    path = run_dir / "report.html"
    atomic_write_text(path, render(run_dir, bench, baseline))
    return path
