"""scripts/measure_results.py (``make results``) on a tiny config: its sweep and its table row."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import measure_results  # noqa: E402

TINY = {
    "name": "tiny",
    "data": {"name": "digits"},
    "model": {"stages": [{"kind": "dense", "width": 16}]},
    "train": {"epochs": 2, "batch_size": 128, "lr": 0.01},
    "log": {"tensorboard": False},
}


def test_the_table_row_is_the_mean_of_the_sweeps_runs(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY), encoding="utf-8")
    results = measure_results.run_all([str(config)], seeds=2, out=tmp_path / "out")
    runs = results[str(config)]
    summaries = [
        json.loads((tmp_path / "out" / "tiny" / f"seed{s}" / "summary.json").read_text())
        for s in (0, 1)
    ]
    assert [r["run_dir"] for r in runs] == [
        str(tmp_path / "out" / "tiny" / f"seed{s}") for s in (0, 1)
    ]
    assert [r["test_acc"] for r in runs] == [s["test_acc"] for s in summaries]
    assert (tmp_path / "out" / "tiny" / "sweep.md").is_file()
    accs = [100 * s["test_acc"] for s in summaries]
    d = summaries[0]["dataset"]
    row = next(line for line in measure_results.table(results).splitlines() if "tiny.yaml" in line)
    assert row.startswith(
        f"| `{config}` | digits ({d['train']}/{d['val']}/{d['test']}) | "
        f"{summaries[0]['params']:,} | {summaries[0]['params']:,} | "
        f"{statistics.mean(accs):.1f}% ± {statistics.stdev(accs):.1f} (2) | "
    )
    assert row.endswith(" | — |")  # a dense network has no designed ensembles
