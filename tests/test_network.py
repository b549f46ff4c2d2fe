import pytest
import torch
from torch import nn

from neuroplex.config import load_config
from neuroplex.network import (
    Network,
    StageOutput,
    build_network,
    describe_network,
    register_stage,
)


class WithAux(nn.Module):
    """A stage with a side loss, as a mixture of experts has."""

    d_out = 3

    def forward(self, x):
        return StageOutput(x[:, :3], x.pow(2).mean(), {"load": x.mean(0)})


def test_build_network_chains_stage_widths():
    cfg = load_config(
        None, ["model.stages=[{kind: dense, width: 8, layers: 2}, {kind: dense, width: 4}]"]
    )
    net = build_network(cfg.model, in_shape=6, n_classes=3)
    assert [s.d_out for s in net.stages] == [8, 4]
    assert net(torch.randn(5, 6)).shape == (5, 3)
    rows = describe_network(net, 6)
    assert [r["name"] for r in rows] == ["stage0", "stage1", "head"]
    assert [r["out"] for r in rows] == [[8], [4], [3]]
    assert sum(r["params"] for r in rows) == net.num_parameters()


def test_forward_stages_returns_features_aux_loss_and_stats():
    net = Network([nn.Identity(), WithAux()], nn.Linear(3, 2))
    x = torch.randn(4, 5)
    out = net.forward_stages(x)
    assert [f.shape for f in out.features] == [(4, 5), (4, 3)]
    assert torch.allclose(out.aux_loss, x.pow(2).mean())
    assert set(out.stats) == {"stage1.load"}
    assert torch.equal(out.logits, net(x))


def test_register_stage_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register_stage("dense", lambda cfg, d: nn.Identity())


def test_network_needs_a_stage():
    with pytest.raises(ValueError):
        Network([], nn.Identity())


def test_sparse_stage_with_inter_links_runs_its_unit_mask():
    stage = "{kind: sparse, width: 16, ensembles: 4, m: 0, p_inter: 0.25, norm: none}"
    cfg = load_config(None, [f"model.stages=[{stage}]"])
    torch.manual_seed(0)
    linear = build_network(cfg.model, in_shape=12, n_classes=3).stages[0][0].linear
    assert linear.path == "masked-dense" and linear.wiring.in_sizes == (3, 3, 3, 3)
    mask = torch.as_tensor(linear.wiring.to_mask(), dtype=torch.float64)
    own = torch.block_diag(*[torch.ones(4, 3, dtype=torch.float64)] * 4)
    assert (mask[own.bool()] == 1).all() and 0 < mask[~own.bool()].mean() < 1
    linear = linear.double()
    x = torch.randn(5, 12, dtype=torch.float64)
    expected = x @ (linear.weight * mask).T + linear.bias
    assert torch.allclose(linear(x), expected)
