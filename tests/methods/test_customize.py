import json

import pytest
import torch

from neuroplex.config import load_config
from neuroplex.errors import NeuroplexError
from neuroplex.layers.macs import count_macs
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
    with pytest.raises(NeuroplexError, match="network expects"):
        customize(run_dir, "mnist1d", run_dir / "out", epochs=1)


def test_customize_a_cnn_on_images(tmp_path):
    # a CNN on 1x8x8 digits ending in global pooling: the local expert reads the flattened
    # pixels and the pooled channels, the gate the flattened pixels
    stages = (
        "[{kind: conv, channels: 4, pool: max}, {kind: sparse_conv, channels: 8, ensembles: 2}, "
        "{kind: pool}]"
    )
    cfg = load_config(
        None,
        ["name=cnn", "data.name=digits", "data.shape=image", f"model.stages={stages}",
         "train.epochs=1", "train.batch_size=64"],
    )  # fmt: skip
    train(cfg, tmp_path / "run")
    summary = customize(tmp_path / "run", "digits", tmp_path / "out", epochs=2)
    assert summary["global_expert_unchanged"]
    from neuroplex.train.runs import load_run

    s, _ = load_run(tmp_path / "run")
    x = s.data.test.inputs(slice(0, 5))  # [5, 1, 8, 8]
    assert summary["global_expert"]["macs"] == count_macs(s.model, x[:1])["total"]
    model = Customized(s.model, 64, 10, gate_hidden=4)
    assert model.local_expert.linear.in_features == 64 + 8  # pixels + pooled channels
    out = model.mix(x)
    feature_map = s.model.forward_stages(x).features[-2]  # [5, 8, 4, 4] before the pool
    local = model.local_expert.linear(torch.cat([x.reshape(5, 64), feature_map.mean((2, 3))], 1))
    torch.testing.assert_close(out.local_logits, local)
    g = out.gate[:, None]
    expected = g * torch.softmax(s.model(x), -1) + (1 - g) * torch.softmax(local, -1)
    torch.testing.assert_close(out.log_probs.exp(), expected)
    with pytest.raises(NeuroplexError, match="network expects"):  # vectors for an image CNN
        customize(tmp_path / "run", "mnist1d", tmp_path / "out2", epochs=1)
