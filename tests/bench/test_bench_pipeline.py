"""``bench pipeline`` smoke test: valid configs for the three runs, and the throughput arithmetic
(no training: a fake runner logs known samples/s)."""

import json

import pytest

from neuroplex.bench.pipeline import run
from neuroplex.config import load_config
from neuroplex.files import append_jsonl

RATES = {(2, 1): 1300.0, (1, 1): 1000.0, (1, 2): 1600.0}  # (threads, processes) -> samples/s


def fake_runner(configs: list):
    def runner(overrides: list[str], run_dir):
        cfg = load_config(None, overrides)
        configs.append(cfg)
        rate = RATES[(cfg.threads, cfg.train.parallel)]
        run_dir.mkdir(parents=True)
        for epoch, r in enumerate([rate / 10, rate, rate, rate * 1.1], start=1):  # slow warm-up
            append_jsonl(run_dir / "metrics.jsonl", {"epoch": epoch, "samples_per_s": r})

    return runner


def test_throughput_compares_the_pipeline_with_the_sequential_runs(tmp_path):
    configs = []
    out = tmp_path / "pipeline.json"
    result = run(4, 512, 256, 300, 2, out, runner=fake_runner(configs))
    assert [(c.threads, c.train.parallel) for c in configs] == [(2, 1), (1, 1), (1, 2)]
    for cfg in configs:
        assert cfg.train.method == "local" and cfg.train.batch_size == 256
        assert len(cfg.model.stages) == 4 and cfg.model.stages[0].width == 512
    assert list(result["samples_per_s"].values()) == [1300.0, 1000.0, 1600.0]
    assert result["speedup"] == pytest.approx(1600 / 1300)
    assert result["scaling_efficiency"] == pytest.approx(1600 / 2000)
    assert json.loads(out.read_text())["speedup"] == pytest.approx(1600 / 1300)
    lines = out.with_suffix(".md").read_text().splitlines()
    assert "| pipeline, 2 processes x 1 thread | 1,600 | 1.23× |" in lines
    assert lines[-1].endswith(
        "1.23×; scaling efficiency against 2 × the one-thread sequential throughput: 80%."
    )
