import pytest

from neuroplex.bench import local as bench_local
from neuroplex.bench.local import base_overrides, table
from neuroplex.config import load_config
from neuroplex.errors import NeuroplexError


def run_row(method: str, acc: float, act: int, seed: int = 0) -> dict:
    return {
        "stages": 4,
        "method": method,
        "seed": seed,
        "test_acc": acc,
        "activation_bytes_peak": act,
        "peak_rss_bytes": 2**30,
        "train_time_s": 10.0,
        "epochs": 5,
    }


def test_table_reports_mean_spread_and_memory_ratio_to_backprop():
    result = {
        "machine": "test",
        "steps": 10,
        "width": 8,
        "runs": [
            run_row("backprop", 0.70, 4 * 2**20),
            run_row("backprop", 0.72, 4 * 2**20, seed=1),
            run_row("local / linear", 0.60, 2**20),
        ],
    }
    lines = table(result).splitlines()
    assert "| 4 | backprop | 71.0% ± 1.4 (2) | 4.00 MiB | 1.00× | 1024 MiB | 2.000 s |" in lines
    assert (
        "| 4 | local / linear | 60.0% ± 0.0 (1) | 1.00 MiB | 0.25× | 1024 MiB | 2.000 s |" in lines
    )


def test_benchmark_overrides_make_a_valid_config():
    cfg = load_config(None, base_overrides(stages=8, width=64, steps=100))
    assert len(cfg.model.stages) == 8 and cfg.model.stages[0].width == 64
    assert cfg.train.steps == 100


def fake_run_one(calls):
    def run_one(overrides, run_dir):
        calls.append(overrides)
        seed = int(overrides[-1].split("=")[1])
        return run_row("x", 0.5 + seed / 100, 2**20, seed) | {"test_acc": 0.5}

    return run_one


def test_resume_runs_only_the_missing_seeds_and_methods(tmp_path, monkeypatch):
    out = tmp_path / "local.json"
    calls: list = []
    monkeypatch.setattr(bench_local, "run_one", fake_run_one(calls))
    bench_local.run([4], 1, 10, 8, out, methods=["backprop"])
    assert len(calls) == 1
    result = bench_local.run([4], 2, 10, 8, out, methods=["backprop", "local / mlp"], resume=True)
    assert len(calls) == 4  # seed 0 backprop kept; seed 0 mlp, seed 1 backprop and mlp run
    assert sorted((r["method"], r["seed"]) for r in result["runs"]) == [
        ("backprop", 0),
        ("backprop", 1),
        ("local / mlp", 0),
        ("local / mlp", 1),
    ]
    with pytest.raises(NeuroplexError, match="holds steps=10, width=8; this run asks for steps=20"):
        bench_local.run([4], 1, 20, 8, out, resume=True)


def test_table_without_backprop_shows_no_ratio():
    result = {"machine": "m", "steps": 1, "width": 8, "runs": [run_row("local / mlp", 0.5, 2**20)]}
    assert "| 1.00 MiB | — |" in table(result)


def test_augmented_methods_name_the_layer_rule_they_run():
    def aux(name):
        return load_config(None, [*base_overrides(4, 8, 10), *bench_local.METHODS[name]]).train.aux

    spread, reference = aux("local / augmented (spread)"), aux("local / augmented (reference)")
    assert (spread.picks, spread.depth_coeff) == ("spread", 1.0)
    assert (reference.picks, reference.depth_coeff) == ("end", 0.5)
