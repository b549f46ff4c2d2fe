"""``bench pipeline`` smoke test: valid configs for the three runs, and the throughput arithmetic
(no training: a fake runner logs known samples/s)."""

import json

import numpy as np
import pytest

from neuroplex.bench.pipeline import run, stage_plan
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
    plan = {
        "groups": [[0, 1], [2, 3]],
        "cost_share": [0.4, 0.6],
        "ideal_speedup_vs_1_thread": 5 / 3,
    }
    result = run(4, 512, 256, 300, 2, out, runner=fake_runner(configs), planner=lambda o: plan)
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
    assert lines[-3].endswith(
        "1.23×; scaling efficiency against 2 × the one-thread sequential throughput: 80%."
    )
    assert lines[-1] == (
        "Stage groups 0–1 | 2–3 (40% | 60% of the parameter cost): a perfectly overlapped "
        "pipeline would reach 1.67× one thread."
    )


def test_stage_plan_shares_the_cost_between_contiguous_groups(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(200, 8)), y=rng.integers(0, 2, 200))
    stages = "[{kind: dense, width: 4}, {kind: dense, width: 32}, {kind: dense, width: 32}]"
    plan = stage_plan(
        ["data.name=file", f"data.path={tmp_path / 'd.npz'}", f"model.stages={stages}"]
        + ["train.method=local", "train.aux.kind=linear", "train.parallel=2"]
    )
    # costs: 8*4+4+8+4*2+2 = 54; 4*32+32+64+32*2+2 = 290; 32*32+32+64+32*2+2 = 1186
    assert plan["groups"] == [[0, 1], [2, 2]]
    assert plan["cost_share"] == pytest.approx([344 / 1530, 1186 / 1530])
    assert plan["ideal_speedup_vs_1_thread"] == pytest.approx(1530 / 1186)
