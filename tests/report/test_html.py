import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from neuroplex.analysis.run import analyze_run
from neuroplex.config import load_config
from neuroplex.report.baseline import Analysed, baseline_section
from neuroplex.report.html import (
    analysis_sections,
    markdown_table,
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
        evaluate_exits(run)
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
        "cka_between_stages": [[1.0]],
        "path_norm": None,
    }  # as written before routing existed: no "routing" key
    page = "".join(
        build(analysis, {})
        for build in (wiring_section, analysis_sections, structure_section, routing_section)
    )
    assert "<h2>Functional connectivity</h2>" in page
    for title in ("Wiring", "Structure vs function", "Routing"):
        assert f"<h2>{title}</h2>" not in page


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
    # only the sparse stage has a design: a header and two rows, two heat maps
    assert body.count("<tr>") == 3 and body.count("<img") == 2


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
