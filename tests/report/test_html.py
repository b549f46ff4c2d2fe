import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from neuroplex.analysis.run import analyze_run
from neuroplex.config import load_config
from neuroplex.files import read_jsonl
from neuroplex.report.baseline import Analysed, baseline_section
from neuroplex.report.captions import learning_curves as learning_curves_caption
from neuroplex.report.captions import routing_matrix as routing_matrix_caption
from neuroplex.report.html import (
    analysis_sections,
    markdown_table,
    plasticity_section,
    routing_section,
    structure_section,
    wiring_section,
    write_report,
)
from neuroplex.train import train
from neuroplex.train.runs import evaluate_exits

SECTIONS = [
    "Overview",
    "Communities vs designed ensembles: against the baseline",
    "Learning curves",
    "Wiring",
    "Plasticity",
    "Functional connectivity",
    "Structure vs function",
    "Routing",
    "Representation similarity",
    "Early exit",
    "Benchmark: local",
    "Configuration",
]


REPORT_RUN = [
    "data.name=digits",
    "model.stages=[{kind: sparse, width: 32, ensembles: 4, m: 1, pattern: random},"
    " {kind: moe, width: 16, experts: 4, k: 1, expert_hidden: 8, router: dts_temperature}]",
    "train.method=local",
    "train.aux.kind=linear",
    "train.epochs=2",
    "train.batch_size=64",
    "train.plasticity={kind: set, every: 5, fraction: 0.3}",
]


@pytest.fixture(scope="module")
def report_path(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEUROPLEX_CACHE", str(tmp / "cache"))
        run, twin = tmp / "run", tmp / "twin"
        train(load_config(None, REPORT_RUN), run)
        train(load_config(None, [*REPORT_RUN, "model.stages.0.m=3"]), twin)  # dense twin
        for path in (run, twin):
            analyze_run(path, probe=200)
        evaluate_exits(run, overrides=["train.exits.lambdas=[0.1,1.0]", "train.exits.steps=100"])
        bench = tmp / "local.md"
        bench.write_text("Numbers.\n\n| a | b |\n|---|---|\n| 1 | <x> |\n")
        return write_report(run, [bench], baseline=twin)


def test_report_is_one_self_contained_page_with_every_section(report_path):
    page = report_path.read_text()
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in page, title
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched
    assert page.count("data:image/png;base64,") >= 10  # curves, 2 stages, wiring, 3 routing...
    # wiring, structure, load, routing matrix, entropy; run and baseline by designed ensemble
    assert page.count("<figcaption") == 7
    assert "&lt;x&gt;" in page  # table cells escaped
    exits = json.loads((report_path.parent / "exits.json").read_text())
    assert f"(best checkpoint); all stages {100 * exits['full']['acc']:.2f}%" in page
    chosen = exits["selected_on_val"]["confidence"]
    if chosen is None:
        assert "confidence threshold: no setting within one point on val" in page
    else:
        assert f"{chosen['test']['mean_stages']:.2f} stages" in page


def test_a_run_without_sparse_or_moe_stages_gets_no_wiring_structure_or_routing_section():
    analysis = {
        "probe": 10,
        "stages": [
            {
                "stage": 0,
                "kind": "dense",
                "units": 4,
                "communities": 1,
                "modularity": 0.0,
                "dead": 0.0,
            }
        ],
        "cka_estimator": "debiased",
        "cka_between_stages": [[1.0]],
        "cka_shuffled_between_stages": [[0.01]],
        "cka_adjacent": [],
        "cka_shuffled_max_abs": 0.01,
        "path_norm": None,
    }  # as written before routing existed: no "routing" key
    page = "".join(
        build(analysis, {})
        for build in (wiring_section, analysis_sections, structure_section, routing_section)
    )
    assert "<h2>Functional connectivity</h2>" in page
    for title in ("Wiring", "Structure vs function", "Routing"):
        assert f"<h2>{title}</h2>" not in page
    assert "Consecutive stages: n/a (one stage)" in page and "|CKA| ≤ 0.01" in page


def test_markdown_table_drops_the_rule_row_and_keeps_prose():
    out = markdown_table("Title line\n| h1 | h2 |\n|---|:-:|\n| 1 | 2 |\n")
    assert out.startswith("<p>Title line</p><table>")
    assert "<th>h1</th><th>h2</th>" in out and "<td>1</td><td>2</td>" in out
    assert "---" not in out


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (.ci/run installs Debian chromium)")
def test_report_renders_in_headless_chromium(report_path, tmp_path):
    from PIL import Image

    shot = tmp_path / "shot.png"
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    url = report_path.as_uri()
    subprocess.run(
        [CHROMIUM, *FLAGS, *profile, f"--screenshot={shot}", "--window-size=1200,2400", url],
        check=True,
        capture_output=True,
        timeout=120,
    )
    dom = subprocess.run(
        [CHROMIUM, *FLAGS, *profile, "--dump-dom", url],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    for title in SECTIONS:
        assert title in dom
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert len(np.unique(pixels)) > 20  # text and plots, not a blank page


def test_the_baseline_section_shows_both_runs_numbers_from_their_analysis_files(report_path):
    page = report_path.read_text()
    body = page.split("<h2>Communities vs designed ensembles")[1].split("</section>")[0]
    for name in ("run", "twin"):
        stage = json.loads((report_path.parent.parent / name / "analysis.json").read_text())
        stage = stage["stages"][0]
        cells = f"<td>0</td><td>{name}</td><td>sparse</td><td>{stage['communities']}</td>"
        assert cells + f"<td>{stage['modularity']:.3f}</td><td>{stage['nmi']:.2f}</td>" in body
    # accuracy of both runs, then only the sparse stage has a design: two tables of a header and
    # two rows, two heat maps
    assert body.count("<tr>") == 6 and body.count("<img") == 2
    twin = json.loads((report_path.parent.parent / "twin" / "summary.json").read_text())
    final, best = (f"{100 * twin[k]:.2f}%" for k in ("test_acc", "test_acc_at_best_val"))
    header = "<th>run</th><th>test acc (final epoch)</th><th>test acc (best val checkpoint)</th>"
    assert header in body and f"<td>twin</td><td>{final}</td><td>{best}</td>" in body


def test_a_baseline_without_a_design_says_so():
    def analysed(name, stage):
        analysis = {"stages": [{"stage": 0, "units": 4, "communities": 2, "modularity": 0.1}]}
        analysis["stages"][0].update(stage)
        return Analysed(name, analysis, {})

    run = analysed("modular", {"kind": "sparse", "nmi": 0.9, "ari": 0.8})
    page = baseline_section(run, analysed("dense", {"kind": "dense"}))
    assert "<td>modular</td><td>sparse</td><td>2</td><td>0.100</td><td>0.90</td><td>0.80" in page
    assert "<td>dense</td><td>dense</td><td>2</td><td>0.100</td><td>no design</td>" in page
    page = baseline_section(analysed("a", {"kind": "dense"}), analysed("b", {"kind": "dense"}))
    assert "Neither run has a stage with designed ensembles" in page


def test_the_wiring_section_says_how_each_sparse_layer_runs(report_path):
    page = report_path.read_text(encoding="utf-8")
    analysis = json.loads((report_path.parent / "analysis.json").read_text(encoding="utf-8"))
    (row,) = analysis["sparse_layers"]
    assert row["text"].startswith("stages.0.0.linear: ")
    assert f"Execution paths: {row['text']}</p>" in page


def design(inside, outside):
    return {
        "stage": 0,
        "kind": "sparse",
        "units": 4,
        "communities": 2,
        "modularity": 0.1,
        "nmi": 0.5,
        "ari": 0.4,
        "design_contrast": {"inside": inside, "outside": outside},
    }


def test_captions_are_written_from_the_data_they_describe():
    arrays = {"stage0.corr": np.eye(4), "stage0.designed": np.array([0, 0, 1, 1])}
    modular = Analysed("modular", {"stages": [design(0.45, 0.05)]}, arrays)
    dense = Analysed("dense", {"stages": [design(0.11, 0.10)]}, arrays)
    page = baseline_section(modular, dense)
    captions = re.findall(r'<figcaption class="caption">(.*?)</figcaption>', page)
    assert captions == [
        "Designed ensembles: |corr| 0.45 inside vs 0.05 between (9.0×): bright blocks on the "
        "diagonal — the designed ensembles co-activate as modules.",
        "Designed ensembles: |corr| 0.11 inside vs 0.10 between (1.1×): no blocks on the "
        "diagonal — the units do not co-activate along the designed ensembles.",
    ]


def routing(top_share, majority):
    return {
        "experts": 4,
        "classes": 10,
        "top_share_max": top_share,
        "classes_with_majority_expert": majority,
    }


def test_the_routing_matrix_caption_follows_its_largest_cell():
    assert routing_matrix_caption(routing(0.42, 0)) == (
        "Largest cell 0.42: no class sends most of its inputs to one expert, so experts do not "
        "specialise by class."
    )
    assert routing_matrix_caption(routing(0.97, 8)) == (
        "Largest cell 0.97; 8 of 10 classes send most of their inputs to one expert (a column "
        "with one bright cell)."
    )


def test_the_learning_curve_caption_names_the_axis_unit_and_both_accuracies():
    summary = {
        "epochs": 12,
        "steps": 480,
        "best_val_acc": 0.9,
        "best_epoch": 7,
        "test_acc_at_best_val": 0.863,
        "test_acc": 0.853,
    }
    text = learning_curves_caption(summary)
    assert "each of the 12 epochs; the x axis counts optimizer steps (480 in all)" in text
    assert "at epoch 7" in text and "test accuracy 86.30%; the final epoch 85.30%" in text
    no_val = learning_curves_caption({**summary, "best_val_acc": None})
    assert "Without a validation split" in no_val and "85.30%" in no_val


def plasticity_run(**extra):
    layer = {
        "layer": "stages.0.0.linear",
        "checkpoint": {"links": 512, "cross_links": 64},
        "steps": [5, 10],
        "pruned": [30, 20],
        "grown": [30, 20],
        "density": [0.5, 0.5],
        "cross_fraction": [0.3, 0.4],
        "swapped": 50,
        "density_start": 0.5,
        "density_end": 0.5,
        "cross_fraction_start": 0.25,
        "cross_fraction_end": 0.4,
    }
    report = {"kind": "set", "events": 2, "steps": [5, 10], "layers": [layer], **extra}
    return {"probe": 10, "checkpoint": "best", "plasticity": report}


def test_the_plasticity_section_shows_events_density_and_links_across_modules():
    page = plasticity_section(plasticity_run())
    assert "<h2>Plasticity</h2>" in page and page.count("<img") == 1
    assert "set rewired 1 layer(s) at 2 steps, 5 to 10" in page
    assert "50 connections swapped, density 0.500 → 0.500" in page
    assert "links between different ensembles 25% → 40%" in page
    assert "<th>links between ensembles (best checkpoint)</th>" in page
    assert "<td>64 of 512</td>" in page


def test_the_plasticity_section_is_absent_without_plasticity_and_explained_without_events():
    assert plasticity_section({"probe": 10, "plasticity": None}) == ""
    assert plasticity_section({"probe": 10}) == ""  # analysis written without the key
    empty = plasticity_section(
        {"probe": 10, "plasticity": {"kind": "set", "events": 0, "steps": [], "layers": []}}
    )
    assert "<h2>Plasticity</h2>" in empty and "holds no event" in empty and "<img" not in empty


def test_the_report_of_a_rewired_run_has_its_plasticity_figures(report_path):
    page = report_path.read_text()
    body = page.split("<h2>Plasticity</h2>")[1].split("</section>")[0]
    events = read_jsonl(report_path.parent / "plasticity.jsonl")
    steps, layers = sorted({e["step"] for e in events}), {e["layer"] for e in events}
    when = f"at {len(steps)} steps, {steps[0]} to {steps[-1]}"
    assert f"set rewired {len(layers)} layer(s) {when}" in body
    assert body.count("<img") == 1
