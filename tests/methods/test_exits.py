import json
import math

import pytest
import torch
from torch import nn

from neuroplex.config import ExitsConfig, load_config
from neuroplex.errors import ConfigError, NeuroplexError
from neuroplex.methods.exits import (
    ExitOutputs,
    accuracy_at_stages,
    best_saving,
    classifier_loss,
    confidence_policy,
    correctness_policy,
    exit_costs,
    exit_probabilities,
    first_exit,
    gate_loss,
    jei_exit_stage,
    jei_point,
    jei_targets,
    positive_weights,
    train_correctness_gates,
    train_jei,
    uncertainty_features,
)
from neuroplex.train import loop
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


# ---- JEI-DNN pieces against hand computations ----

# Per-exit cross-entropy of 4 samples at 3 exits (the last is the network's head).
CE = torch.tensor(
    [
        [0.20, 1.50, 2.00, 0.90],
        [0.10, 0.40, 1.90, 0.50],
        [0.05, 0.30, 0.20, 0.60],
    ]
)


def test_exit_costs_are_the_fraction_of_stages_run():
    assert exit_costs(4).tolist() == [0.25, 0.5, 0.75, 1.0]


def test_jei_targets_are_the_argmin_of_ce_plus_lambda_cost_cumulatively_encoded():
    costs = torch.tensor([1 / 3, 2 / 3, 1.0])
    # λ = 0.6 adds 0.2, 0.4, 0.6: totals [0.40 0.50 0.65], [1.70 0.80 0.90], [2.20 2.30 0.80],
    # [1.10 0.90 1.20] -> exits 0, 1, 2, 1.
    optimal, targets = jei_targets(CE, costs, 0.6)
    assert optimal.tolist() == [0, 1, 2, 1]
    assert targets.tolist() == [[1, 0, 0, 0], [1, 1, 0, 1]]  # gate l: optimal exit <= l
    # λ = 0: the lowest CE alone -> exits 2, 2, 2, 1.
    optimal, targets = jei_targets(CE, costs, 0.0)
    assert optimal.tolist() == [2, 2, 2, 1]
    assert targets.tolist() == [[0, 0, 0, 0], [0, 0, 0, 1]]
    # A tie goes to the earlier exit: CE 0.5 / 0.25 with costs 0.5 / 1 and λ = 0.5.
    tie, _ = jei_targets(torch.tensor([[0.5], [0.25]]), torch.tensor([0.5, 1.0]), 0.5)
    assert tie.tolist() == [0]


def test_positive_weights_balance_each_gates_ones_and_are_capped():
    # exits 0, 1, 2, 1 of 3: gate 0 has 1 sample -> 3/1; gate 1 has 2 -> 2/2.
    assert positive_weights(torch.tensor([0, 1, 2, 1]), 3).tolist() == [3.0, 1.0]
    # no sample at gate 0: count 0.1 -> 39, capped at 5; gate 1: one sample -> 3.
    assert positive_weights(torch.tensor([2, 2, 2, 1]), 3).tolist() == [5.0, 3.0]


def test_gate_loss_weights_the_one_targets():
    logits = torch.tensor([[0.0, 2.0], [-1.0, 0.5]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    expected = (
        3 * math.log(2)  # target 1, logit 0, weight 3
        + math.log(1 + math.exp(2.0))  # target 0
        + math.log(1 + math.exp(-1.0))  # target 0
        + 2 * math.log(1 + math.exp(-0.5))  # target 1, weight 2
    ) / 4
    loss = gate_loss(logits, targets, torch.tensor([3.0, 2.0]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_exit_probabilities_read_each_gate_as_its_exit_probability_capped_at_what_is_left():
    g = torch.tensor([[0.3, 0.9], [0.5, 0.2], [0.4, 0.5]])  # 3 gates x 2 samples
    # sample 0: 0.3, min(0.5, 0.7), min(0.4, 0.2); sample 1: 0.9, min(0.2, 0.1), 0 (1.1 used)
    expected = torch.tensor([[0.3, 0.9], [0.5, 0.1], [0.2, 0.0]])
    assert torch.allclose(exit_probabilities(g), expected, atol=1e-6)


def test_exit_prob_classifier_loss_weights_each_exit_by_its_exit_probability():
    ce = torch.tensor([[1.0, 2.0], [3.0, 0.5]], requires_grad=True)  # 2 exits x 2 samples
    p = torch.tensor([[0.25, 1.0], [0.5, 0.0]])
    loss = classifier_loss(ce, p, "exit_prob")
    loss.backward()
    # sample 0: 0.25·1 + 0.5·3 = 1.75; sample 1: 1·2 + 0·0.5 = 2; mean over the 2 samples
    assert loss.item() == pytest.approx(1.875)
    assert torch.allclose(ce.grad, torch.tensor([[0.125, 0.5], [0.25, 0.0]]))


def test_the_references_rescaling_without_stop_gradient_is_the_plain_mean():
    # The reference: P = exit probs, L = CEs [n, exits]; loss = mean(P*L * ΣL / Σ(P*L)).
    p = torch.tensor([[0.25, 0.5], [1.0, 0.0]])
    ce = torch.tensor([[1.0, 3.0], [2.0, 0.5]], requires_grad=True)
    weighted = p * ce
    reference = torch.mean(weighted * (ce.sum(dim=1) / weighted.sum(dim=1))[:, None])
    reference.backward()
    assert torch.allclose(ce.grad, torch.full((2, 2), 0.25))
    uniform_ce = ce.detach().T.clone().requires_grad_()  # ours is [exits, n]
    classifier_loss(uniform_ce, p.T, "uniform").backward()
    assert torch.allclose(uniform_ce.grad, torch.full((2, 2), 0.25))


def test_jei_exit_rule_on_hand_computed_conditional_probabilities():
    g = torch.tensor([[0.3, 0.9, 0.4, 0.1], [0.5, 0.2, 0.45, 0.2]])  # 2 gates x 4 samples
    # s0: a0 = 0.3, a1 = 0.5/0.7 -> exit 1. s1: a0 = 0.9 -> exit 0.
    # s2: a0 = 0.4, a1 = 0.45/0.6 = 0.75 -> exit 1. s3: a0 = 0.1, a1 = 0.2/0.9 -> last (2).
    assert jei_exit_stage(g).tolist() == [1, 0, 1, 2]


def test_uncertainty_features_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    h = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
    sq = [0.25 / 0.38, 0.09 / 0.38, 0.04 / 0.38]
    h_sq = -sum(q * math.log(q) for q in sq)
    expected = torch.tensor([[0.5, h, 0.2, h_sq]])
    assert torch.allclose(uncertainty_features(probs), expected, atol=1e-6)


def easy_hard_exits(n: int = 400, seed: int = 0):
    """Stage 0 is confident and right on easy inputs, unsure and wrong on hard ones; the last
    stage is always right. Returns outputs, labels, the stage-0 head and the easy mask."""
    gen = torch.Generator().manual_seed(seed)
    easy = torch.rand(n, generator=gen) < 0.6
    y = (~easy).long()  # easy: class 0, hard: class 1
    feats0 = torch.randn(n, 3, generator=gen) * 0.1
    feats0[:, 0] = torch.where(easy, 3.0, 0.0)
    head0 = nn.Linear(3, 2)
    with torch.no_grad():
        head0.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]]))
        head0.bias.zero_()  # hard: logits [0, 0] -> class 0, wrong
    probs0 = torch.softmax(head0(feats0), dim=-1).detach()
    probs1 = torch.nn.functional.one_hot(y, 2).float() * 0.9998 + 0.0001  # CE below stage 0
    out = ExitOutputs([feats0, torch.randn(n, 3, generator=gen)], torch.stack([probs0, probs1]))
    return out, y, [head0, nn.Identity()], easy


def same(out, y):
    return {"gates": (out, y), "classifiers": (out, y), "val": (out, y)}


def test_jei_gates_exit_early_exactly_where_the_early_stage_is_right():
    out, y, heads, easy = easy_hard_exits()
    cfg = ExitsConfig(classifier_loss="frozen", steps=300)
    jei = train_jei(heads, same(out, y), 0.2, cfg)
    point = jei_point(jei, out, y)
    assert point["acc"] == 1.0
    assert point["mean_stages"] == pytest.approx(1 + (~easy).float().mean().item())
    assert torch.equal(jei.heads[0].weight, heads[0].weight)  # frozen: untouched
    # without cost every sample's target is the last exit (lowest CE): nobody leaves early
    none = jei_point(train_jei(heads, same(out, y), 0.0, cfg), out, y)
    assert none["mean_stages"] == 2.0


def test_jei_trains_copies_of_the_exit_classifiers_and_keeps_the_originals():
    out, y, heads, easy = easy_hard_exits()
    before = heads[0].weight.clone()
    jei = train_jei(heads, same(out, y), 0.2, ExitsConfig(steps=300, phase_steps=50))
    assert torch.equal(heads[0].weight, before)
    assert not torch.equal(jei.heads[0].weight, before)
    point = jei_point(jei, out, y)
    assert point["acc"] >= 0.95
    assert point["mean_stages"] <= 1 + (~easy).float().mean().item() + 0.02
    again = train_jei(heads, same(out, y), 0.2, ExitsConfig(steps=300, phase_steps=50))
    assert jei_point(again, out, y) == point  # one seed, same numbers


def test_correctness_gates_exit_early_where_the_early_stage_is_right():
    torch.manual_seed(0)
    n = 400
    feats0 = torch.randn(n, 3)
    easy = feats0[:, 0] > 0  # stage 0 is right exactly on "easy" inputs, visible in its features
    y = torch.zeros(n, dtype=torch.long)
    wrong, right = torch.tensor([0.3, 0.7]), torch.tensor([0.7, 0.3])
    probs0 = torch.where(easy[:, None], right, wrong)
    probs1 = right.expand(n, 2)  # the last stage is always right
    out = ExitOutputs([feats0, torch.randn(n, 3)], torch.stack([probs0, probs1]))
    gates = train_correctness_gates(out, y, steps=300)
    rows = {r["cost"]: r for r in correctness_policy(gates, out, y, costs=(0.2,))}
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


def test_accuracy_at_equal_stages_is_linear_between_operating_points():
    points = [{"acc": 0.9, "mean_stages": 3.0}, {"acc": 0.7, "mean_stages": 1.0}]
    assert accuracy_at_stages(points, 1.5) == pytest.approx(0.75)
    assert accuracy_at_stages(points, 4.0) == pytest.approx(0.9)


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


FAST = ["train.exits.steps=40", "train.exits.phase_steps=10", "train.exits.lambdas=[0, 0.5]"]


def test_evaluate_exits_on_a_local_run_writes_table_and_plot(tmp_path):
    loop.train(tiny("local"), tmp_path / "run")
    report = evaluate_exits(tmp_path / "run", overrides=FAST)
    assert report["stages"] == 3 and report["settings"]["gate_split"] == "val"
    assert report["confidence"][-1]["mean_stages"] == 3.0  # threshold above 1: nobody exits early
    assert report["confidence"][-1]["acc"] == report["full"]["acc"]
    assert [p["lambda"] for p in report["jei"]] == [0.0, 0.5]
    for policy in ("jei", "correctness"):
        assert all(1.0 <= p["mean_stages"] <= 3.0 for p in report[policy])
        assert all(1.0 <= p["mean_stages"] <= 3.0 for p in report["val"][policy])
    assert set(report["selected_on_val"]) == {"confidence", "jei", "correctness"}
    assert report["settings"]["steps"] == 40
    assert json.loads((tmp_path / "run" / "exits.json").read_text())["stages"] == 3
    assert (tmp_path / "run" / "exits.png").stat().st_size > 10_000


def test_evaluate_exits_takes_only_exit_settings(tmp_path):
    loop.train(tiny("local"), tmp_path / "run", stop_after_epoch=1)
    with pytest.raises(NeuroplexError, match="only train.exits"):
        evaluate_exits(tmp_path / "run", which="last", overrides=["train.lr=1"])
    with pytest.raises(ConfigError, match="gate_split"):
        evaluate_exits(tmp_path / "run", which="last", overrides=["train.exits.gate_split=test"])


def test_exits_need_a_local_run(tmp_path):
    loop.train(tiny("backprop"), tmp_path / "run", stop_after_epoch=1)
    with pytest.raises(NeuroplexError, match="train.method=local"):
        evaluate_exits(tmp_path / "run", which="last")
