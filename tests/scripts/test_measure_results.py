"""scripts/measure_results.py (``make results``) on a tiny config: its sweep and its table row."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import measure_results  # noqa: E402


def test_the_table_row_is_the_mean_of_the_sweeps_runs(tmp_path, small_yaml):
    config = small_yaml(tmp_path)
    results = measure_results.run_all([str(config)], seeds=2, out=tmp_path / "out")
    runs = results[str(config)]
    summaries = [
        json.loads((tmp_path / "out" / "small" / f"seed{s}" / "summary.json").read_text())
        for s in (0, 1)
    ]
    assert [r["run_dir"] for r in runs] == [
        str(tmp_path / "out" / "small" / f"seed{s}") for s in (0, 1)
    ]
    assert [r["test_acc"] for r in runs] == [s["test_acc"] for s in summaries]
    assert (tmp_path / "out" / "small" / "sweep.md").is_file()
    accs = [100 * s["test_acc"] for s in summaries]
    d = summaries[0]["dataset"]
    row = next(line for line in measure_results.table(results).splitlines() if "small.yaml" in line)
    assert row.startswith(
        f"| `{config}` | digits ({d['train']}/{d['val']}/{d['test']}) | "
        f"{summaries[0]['params']:,} | {summaries[0]['params']:,} | "
        f"{statistics.mean(accs):.1f}% ± {statistics.stdev(accs):.1f} (2) | "
    )
    assert row.endswith(" | — |")  # a dense network has no designed ensembles


def test_threads_and_jobs_go_to_a_one_value_grid_and_the_table_says_so(tmp_path, small_yaml):
    config = small_yaml(tmp_path)
    results = measure_results.run_all(
        [str(config)], seeds=2, out=tmp_path / "out", threads=1, jobs=2
    )
    runs = results[str(config)]
    assert [r["run_dir"] for r in runs] == [
        str(tmp_path / "out" / "small" / "threads=1" / f"seed{s}") for s in (0, 1)
    ]
    row = next(line for line in measure_results.table(results).splitlines() if "small.yaml" in line)
    assert " s (1 thread, 2 runs side by side) | " in row
