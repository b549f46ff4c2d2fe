import json

import pytest
import torch

from neuroplex.config import load_config
from neuroplex.errors import NeuroplexError
from neuroplex.train import loop
from neuroplex.train.exits import (
    ExitOutputs,
    best_saving,
    confidence_policy,
    first_exit,
    gate_policy,
    train_exit_gates,
)
from neuroplex.train.runs import evaluate_exits


def test_first_exit_takes_the_first_true_stage_and_the_last_stage_always_exits():
    mask = torch.tensor([[False, True, False], [True, True, False], [False, False, False]])
    assert first_exit(mask).tolist() == [1, 0, 2]


def test_confidence_policy_on_hand_built_probabilities():
    # 2 stages, 2 samples, 2 classes. Stage 0 is confident on sample 0 (right) only.
    probs = torch.tensor(
        [[[0.9, 0.1], [0.6, 0.4]], [[0.8, 0.2], [0.1, 0.9]]]  # stage 0  # stage 1
    )
    y = torch.tensor([0, 1])
    rows = {r["threshold"]: r for r in confidence_policy(probs, y, thresholds=(0.0, 0.7, 1.01))}
    assert rows[0.0] == {"threshold": 0.0, "acc": 0.5, "mean_stages": 1.0}  # all exit at stage 0
    assert rows[0.7] == {"threshold": 0.7, "acc": 1.0, "mean_stages": 1.5}  # sample 1 continues
    assert rows[1.01] == {"threshold": 1.01, "acc": 1.0, "mean_stages": 2.0}


def test_learned_gates_exit_early_where_the_early_stage_is_right():
    torch.manual_seed(0)
    n = 400
    feats0 = torch.randn(n, 3)
    easy = feats0[:, 0] > 0  # stage 0 is right exactly on "easy" inputs, visible in its features
    y = torch.zeros(n, dtype=torch.long)
    wrong, right = torch.tensor([0.3, 0.7]), torch.tensor([0.7, 0.3])
    probs0 = torch.where(easy[:, None], right, wrong)
    probs1 = right.expand(n, 2)  # the last stage is always right
    out = ExitOutputs([feats0, torch.randn(n, 3)], torch.stack([probs0, probs1]))
    gates = train_exit_gates(out, y, steps=300)
    rows = {r["cost"]: r for r in gate_policy(gates, out, y, costs=(0.2,))}
    assert rows[0.2]["acc"] >= 0.95
    assert rows[0.2]["mean_stages"] == pytest.approx(1 + (~easy).float().mean().item(), abs=0.05)


def test_best_saving_picks_fewest_stages_within_one_point():
    full = {"acc": 0.80, "mean_stages": 4.0}
    points = [
        {"acc": 0.70, "mean_stages": 1.0},
        {"acc": 0.795, "mean_stages": 2.0},
        {"acc": 0.80, "mean_stages": 3.0},
    ]
    assert best_saving(points, full)["mean_stages"] == 2.0
    assert best_saving(points[:1], full) is None


def tiny(method: str):
    return load_config(
        None,
        [
            "data.name=digits",
            "model.stages=[{kind: dense, width: 32}, {kind: dense, width: 32},"
            " {kind: dense, width: 16}]",
            f"train.method={method}",
            "train.aux.kind=linear",
            "train.epochs=3",
            "train.batch_size=64",
            "train.lr=0.01",
        ],
    )


def test_evaluate_exits_on_a_local_run_writes_table_and_plot(tmp_path):
    loop.train(tiny("local"), tmp_path / "run")
    report = evaluate_exits(tmp_path / "run")
    assert report["stages"] == 3 and report["gates_trained_on"] == "val"
    assert report["confidence"][-1]["mean_stages"] == 3.0  # threshold above 1: nobody exits early
    assert report["confidence"][-1]["acc"] == report["full"]["acc"]
    assert all(1.0 <= p["mean_stages"] <= 3.0 for p in report["gate"])
    assert json.loads((tmp_path / "run" / "exits.json").read_text())["stages"] == 3
    assert (tmp_path / "run" / "exits.png").stat().st_size > 10_000


def test_exits_need_a_local_run(tmp_path):
    loop.train(tiny("backprop"), tmp_path / "run", stop_after_epoch=1)
    with pytest.raises(NeuroplexError, match="train.method=local"):
        evaluate_exits(tmp_path / "run", which="last")
