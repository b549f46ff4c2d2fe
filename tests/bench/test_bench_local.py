from neuroplex.bench.local import base_overrides, table
from neuroplex.config import load_config


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
