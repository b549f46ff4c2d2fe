import json

import numpy as np
import pytest
import torch
from torch import nn

from neuroplex.analysis.routing import (
    entropy_bits,
    expert_load,
    mutual_information_bits,
    router_choices,
    routing_analysis,
    routing_matrix,
)
from neuroplex.analysis.run import analyze_run
from neuroplex.config import load_config
from neuroplex.layers.moe import MoE
from neuroplex.layers.stages import GatedStage
from neuroplex.network import Network
from neuroplex.train import train

C = 4  # classes = experts in the planted networks


def planted_network(perm: list[int]) -> Network:
    """Stage 0 permutes one-hot class inputs; stage 1 is a MoE whose router sends the unit that
    is on to the expert of the same index. So class ``c`` goes to expert ``perm[c]``."""
    permute = nn.Linear(C, C, bias=False)
    moe = MoE(C, 8, C, 1, 4, router="softmax_topk", drop="zero")
    with torch.no_grad():
        permute.weight.copy_(torch.eye(C)[:, perm])  # unit perm[c] copies input c
        moe.router.w_gate.copy_(5.0 * torch.eye(C))
    permute.d_out = C
    return Network([permute, GatedStage(moe)], nn.Linear(8, C))


def one_hot_batch(n: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (n,), generator=g)
    x = torch.eye(C)[y] + 0.05 * torch.randn(n, C, generator=g)
    return x, y


def test_entropy_and_mutual_information_on_known_tables():
    assert entropy_bits(np.full(8, 1 / 8)) == pytest.approx(3.0)
    assert entropy_bits(np.array([1.0, 0.0, 0.0])) == 0.0
    assert mutual_information_bits(np.eye(4) * 25) == pytest.approx(2.0)
    assert mutual_information_bits(np.ones((3, 5))) == pytest.approx(0.0, abs=1e-12)


def test_load_counts_every_top_k_choice_and_matrix_counts_top1_per_class():
    indices = np.array([[0, 1], [0, 2], [1, 0]])
    assert expert_load(indices, 4).tolist() == [3 / 6, 2 / 6, 1 / 6, 0.0]
    matrix = routing_matrix(indices[:, 0], np.array([2, 2, 0]), 4, 3)
    assert matrix.tolist() == [[0, 0, 2], [1, 0, 0], [0, 0, 0], [0, 0, 0]]


def test_planted_routing_gives_mi_equal_to_class_entropy_through_the_real_stage_input():
    perm = [2, 0, 3, 1]
    model = planted_network(perm)
    x, y = one_hot_batch()
    report = routing_analysis(model, x, y, C)[1]
    assert set(routing_analysis(model, x, y, C)) == {1}  # only the MoE stage
    expected = np.zeros((C, C))
    expected[perm, np.arange(C)] = 1.0
    assert np.array_equal(report["routing_frac"], expected)  # P(expert perm[c] | class c) = 1
    class_p = np.bincount(y.numpy(), minlength=C) / len(y)
    assert report["mi_bits"] == pytest.approx(entropy_bits(class_p))
    assert report["mi_over_class_entropy"] == pytest.approx(1.0)
    assert report["load"][perm] == pytest.approx(class_p)
    assert report["load_entropy_bits"] == pytest.approx(entropy_bits(class_p))
    assert 0 < report["token_entropy_bits"] < 0.5 * report["max_entropy_bits"]  # confident
    assert report["top_share_max"] == 1.0 and report["classes_with_majority_expert"] == C
    assert (report["load_max"], report["load_min"]) == (class_p.max(), class_p.min())


def test_routing_independent_of_class_has_near_zero_mi_and_uniform_gates_max_entropy():
    model = planted_network([0, 1, 2, 3])
    with torch.no_grad():
        model.stages[1].moe.router.w_gate.zero_()  # every expert equally likely for every input
    x, y = one_hot_batch(n=2000)
    report = routing_analysis(model, x, y, C)[1]
    assert report["token_entropy_bits"] == pytest.approx(2.0)
    shuffled = routing_analysis(planted_network([0, 1, 2, 3]), x, y[torch.randperm(len(y))], C)
    assert shuffled[1]["mi_bits"] < 0.01  # labels unrelated to the routing


def test_router_choices_leave_the_model_and_the_rng_untouched():
    model = planted_network([1, 0, 3, 2])
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    x, _ = one_hot_batch(n=50)
    routes = router_choices(model, x)
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert routes[1].indices.shape == (50, 1) and routes[1].probs.shape == (50, C)


@pytest.fixture
def moe_run(tmp_path):
    cfg = load_config(
        None,
        [
            "data.name=digits",
            "model.stages=[{kind: moe, width: 16, experts: 4, k: 2, expert_hidden: 8},"
            " {kind: dense, width: 16}]",
            "train.epochs=2",
            "train.batch_size=64",
        ],
    )
    train(cfg, tmp_path / "run")
    return tmp_path / "run"


def test_analyze_a_trained_moe_run_saves_routing(moe_run):
    result = analyze_run(moe_run, probe=300)
    (routing,) = result["routing"]
    assert routing["stage"] == 0 and routing["experts"] == 4 and routing["k"] == 2
    assert sum(routing["load"]) == pytest.approx(1.0)
    assert 0 <= routing["mi_bits"] <= routing["class_entropy_bits"] + 1e-9
    assert 0 <= routing["token_entropy_bits"] <= routing["max_entropy_bits"] == 2.0
    saved = json.loads((moe_run / "analysis.json").read_text())["routing"]
    assert saved[0]["mi_bits"] == pytest.approx(routing["mi_bits"])
    arrays = np.load(moe_run / "analysis.npz")
    assert arrays["stage0.routing"].shape == (4, 10) and arrays["stage0.routing"].sum() == 300
    assert np.allclose(arrays["stage0.routing_frac"].sum(axis=0), 1.0)
    assert analyze_run(moe_run, probe=300)["routing"] == result["routing"]  # reproducible
