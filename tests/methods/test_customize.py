import json

import pytest
import torch

from neuroplex.errors import NeuroplexError
from neuroplex.methods.customize import Customized, customize, linear_cost
from neuroplex.train import train


@pytest.fixture
def run_dir(tiny_config, tmp_path):
    train(tiny_config, tmp_path / "run")
    return tmp_path / "run"


def test_customize_end_to_end_keeps_the_global_expert_unchanged(run_dir, tmp_path):
    ckpt = run_dir / "checkpoints"
    before = {p.name: p.read_bytes() for p in ckpt.rglob("*.safetensors")}
    summary = customize(run_dir, "digits", tmp_path / "out", epochs=3)
    assert summary["global_expert_unchanged"]
    assert {p.name: p.read_bytes() for p in ckpt.rglob("*.safetensors")} == before
    assert 0 < summary["cost_fraction"]["params"] < 1
    for split in ("before", "after"):
        assert 0 <= summary[split]["new_test_acc"] <= 1
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
    assert (tmp_path / "out" / "customization.safetensors").stat().st_size > 0


def test_mixture_is_a_probability_distribution_between_the_two_experts(run_dir):
    from neuroplex.train.runs import load_run

    s, _ = load_run(run_dir)
    model = Customized(s.model, 64, 10, gate_hidden=4)
    x = torch.randn(5, 64)
    out = model.mix(x)
    probs = out.log_probs.exp()
    assert torch.allclose(probs.sum(-1), torch.ones(5))
    g = out.gate[:, None]
    expected = g * torch.softmax(s.model(x), -1) + (1 - g) * torch.softmax(out.local_logits, -1)
    assert torch.allclose(probs, expected, atol=1e-6)
    assert not any(p.requires_grad for p in model.global_expert.parameters())


def test_linear_cost_counts_params_and_macs():
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    assert linear_cost(net) == {"params": 4 * 3 + 3 + 3 * 2 + 2, "macs": 12 + 6}


def test_incompatible_data_is_refused(run_dir):
    with pytest.raises(NeuroplexError, match="features"):
        customize(run_dir, "mnist1d", run_dir / "out", epochs=1)
