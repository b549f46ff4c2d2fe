"""``bench pipeline`` smoke test: valid configs for the runs compared, and the throughput
arithmetic (no training: a fake runner logs known samples/s and a recorded stage split)."""

import json

import pytest

from neuroplex.bench.pipeline import pipeline_name, run
from neuroplex.config import load_config
from neuroplex.distributed.balance import PLAN
from neuroplex.files import append_jsonl

# (threads, processes, balance) -> samples/s
RATES = {(1, 1, None): 1000.0, (2, 1, None): 1300.0, (1, 2, "time"): 1600.0}
RATES |= {(1, 2, "params"): 1250.0, (4, 1, None): 900.0, (1, 4, "time"): 2000.0}
RATES |= {(1, 4, "params"): 1800.0}
SHARES = {2: [0.45, 0.55], 4: [0.2, 0.3, 0.25, 0.25]}


def fake_runner(configs: list, slow_spell: tuple[int, float] = (-1, 1.0)):
    """``slow_spell``: (the run, counted from 0, whose rates are scaled, the factor)."""

    def runner(overrides: list[str], run_dir, config=None):
        cfg = load_config(config, overrides)
        configs.append(cfg)
        n = cfg.train.parallel
        rate = RATES[(cfg.threads, n, cfg.train.pipeline.balance if n > 1 else None)]
        rate *= slow_spell[1] if len(configs) - 1 == slow_spell[0] else 1.0
        run_dir.mkdir(parents=True)
        for epoch, r in enumerate([rate / 10, rate, rate, rate * 1.1], start=1):  # slow warm-up
            append_jsonl(run_dir / "metrics.jsonl", {"epoch": epoch, "samples_per_s": r})
        if n > 1:
            groups = [[i, i] for i in range(n - 1)] + [[n - 1, 3]]
            plan = {"groups": groups, "shares": SHARES[n], "ceiling": 1 / max(SHARES[n])}
            plan["transfer_seconds"] = [[1e-3 * (i + 1), 2e-3 * (i + 1)] for i in range(3)]
            (run_dir / PLAN).write_text(json.dumps(plan))

    return runner


def test_throughput_compares_each_pipeline_with_the_sequential_runs(tmp_path):
    configs = []
    out = tmp_path / "pipeline.json"
    widths = [1024, 256, 256, 256]
    result = run(widths, 256, 300, [1, 2, 4], ["time", "params"], out, fake_runner(configs))
    assert [(c.threads, c.train.parallel) for c in configs] == [
        (1, 1),
        (2, 1),
        (1, 2),
        (1, 2),
        (4, 1),
        (1, 4),
        (1, 4),
    ]
    for cfg in configs:
        assert cfg.train.method == "local" and cfg.train.batch_size == 256
        assert [s.width for s in cfg.model.stages] == widths
    two = result["pipelines"][pipeline_name(2, "time")]
    assert two["vs_sequential_n_threads"] == pytest.approx(1600 / 1300)
    assert two["scaling_efficiency"] == pytest.approx(1600 / 2000)
    assert two["ceiling"] == pytest.approx(1 / 0.55)
    assert two["of_ceiling"] == pytest.approx(1.6 * 0.55)
    four = result["pipelines"][pipeline_name(4, "params")]
    assert four["scaling_efficiency"] == pytest.approx(1800 / 4000)
    assert json.loads(out.read_text())["pipelines"] == result["pipelines"]
    lines = out.with_suffix(".md").read_text().splitlines()
    assert "| pipeline, 2 processes x 1 thread, time split | 1,600 | 1.60× |" in lines
    assert (
        "| 2 processes x 1 thread, time split | 1.23× | 80% | 0 / 1–3 (45% / 55%) | 1.00 / 2.00 "
        "| 1.82× | 88% |" in lines
    )
    assert (
        "2 processes x 1 thread (time split) vs sequential with 2 threads: 1.23× (goal ≥ 1.35×), "
        "88% of the 1.82× ceiling its split allows (goal ≥ 90%)." in lines
    )
    assert (
        "2 processes: the time-balanced split trains 1.28× as fast as the parameter-count split "
        "(goal ≥ 1.2×)." in lines
    )


def test_rounds_repeat_every_run_and_report_the_median(tmp_path):
    configs = []
    out = tmp_path / "pipeline.json"
    runner = fake_runner(configs, slow_spell=(1, 0.5))  # round 1's 2-thread run at half speed
    result = run([512] * 4, 256, 300, [1, 2], ["time"], out, runner, rounds=3)
    assert [(c.threads, c.train.parallel) for c in configs] == [(1, 1), (2, 1), (1, 2)] * 3
    assert result["samples_per_s_by_round"]["sequential, 2 threads"] == [650.0, 1300.0, 1300.0]
    assert result["samples_per_s"]["sequential, 2 threads"] == 1300.0
    assert result["groups_by_round"][pipeline_name(2, "time")] == [[[0, 0], [1, 3]]] * 3
    two = result["pipelines"][pipeline_name(2, "time")]
    assert two["vs_sequential_n_threads"] == pytest.approx(1600 / 1300)
    assert "median of 3 round(s)" in out.with_suffix(".md").read_text()


def test_a_user_config_keeps_its_network_and_data(tmp_path):
    config = tmp_path / "cnn.yaml"
    config.write_text(
        "data: {name: digits, shape: image}\n"
        "model:\n  stages:\n"
        "    - {kind: conv, channels: 4, kernel: 3}\n"
        "    - {kind: conv, channels: 8, kernel: 3}\n"
        "    - {kind: flatten}\n"
        "train: {method: local, aux: {kind: linear}, batch_size: 32}\n"
    )
    configs = []
    out = tmp_path / "pipeline.json"
    run([9, 9], 64, 120, [1, 2], ["time"], out, fake_runner(configs), config=config)
    assert len(configs) == 3
    for cfg in configs:
        assert [s.kind for s in cfg.model.stages] == ["conv", "conv", "flatten"]
        assert (cfg.data.name, cfg.train.aux.kind) == ("digits", "linear")
        assert (cfg.train.batch_size, cfg.train.steps) == (64, 120)
    table = out.with_suffix(".md").read_text()
    assert table.startswith(f"`{config}` (its data, stages and aux nets), local learning, batch 64")
    assert json.loads(out.read_text())["widths"] is None
