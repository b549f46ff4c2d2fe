"""MoE on feature maps: per-position routing (pointwise MLP experts over channels) and whole
samples routed to convolutional experts; shapes, the mixture against a hand computation,
capacity, stats through the network, and the routing analysis of both."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuroplex.analysis.routing import entropy_bits, routing_analysis
from neuroplex.config import load_config
from neuroplex.errors import ConfigError
from neuroplex.layers.moe import MoE
from neuroplex.layers.moe_conv import ConvMoE
from neuroplex.layers.routers import RouterOutput
from neuroplex.layers.stages import GatedStage
from neuroplex.network import Network, build_network

F64 = torch.float64


@pytest.mark.parametrize("spatial", [(9,), (5, 6)])
def test_conv_experts_with_k_equal_e_are_the_softmax_mixture_of_every_expert(spatial):
    torch.manual_seed(0)
    moe = ConvMoE((3, *spatial), 4, 3, 3, router="softmax_topk", dtype=F64)
    with torch.no_grad():
        moe.router.w_gate.normal_()
    x = torch.randn(5, 3, *spatial, dtype=F64, requires_grad=True)
    y = moe(x)
    assert y.shape == (5, 4, *spatial)
    probs = torch.softmax(x.flatten(2).mean(2) @ moe.router.w_gate, dim=1)  # [b, e]
    conv = F.conv1d if len(spatial) == 1 else F.conv2d
    want = sum(
        probs[:, j].view(-1, *[1] * (len(spatial) + 1))
        * F.gelu(conv(x, ex[0].weight, ex[0].bias, padding=1))
        for j, ex in enumerate(moe.experts)
    )
    torch.testing.assert_close(y, want)
    g = torch.autograd.grad(y.square().sum(), [x, moe.router.w_gate, moe.experts[1][0].weight])
    w = torch.autograd.grad(want.square().sum(), [x, moe.router.w_gate, moe.experts[1][0].weight])
    for a, b in zip(g, w, strict=True):
        torch.testing.assert_close(a, b)


class ToExpertZero(nn.Module):
    n_experts, k = 2, 1

    def forward(self, x):
        b = x.shape[0]
        logits = torch.zeros(b, 2, dtype=x.dtype)
        idx = torch.zeros(b, 1, dtype=torch.long)
        load = torch.tensor([float(b), 0.0], dtype=x.dtype)
        return RouterOutput(idx, torch.ones(b, 1, dtype=x.dtype), logits, logits.softmax(1), load)


def test_conv_experts_capacity_drops_whole_samples():
    # 6 samples all to expert 0, capacity ceil(1 * 1 * 6 / 2) = 3: samples 3-5 pass through
    moe = ConvMoE((2, 4, 4), 2, 2, 1, router=ToExpertZero(), capacity_factor=1.0, drop="residual")
    x = torch.randn(6, 2, 4, 4)
    y = moe(x)
    torch.testing.assert_close(y[:3], moe.experts[0](x[:3]))
    torch.testing.assert_close(y[3:], x[3:])
    assert moe.stats["dropped_tokens"].item() == 0.5
    assert moe.stats["load"].tolist() == [1.0, 0.0]


def test_position_routing_mixes_each_position_over_its_channels():
    torch.manual_seed(0)
    moe = MoE(3, 4, 2, 2, 5, router="softmax_topk", dtype=F64)
    stage = GatedStage(moe, norm_layer=None, spatial=(4, 5))
    x = torch.randn(2, 3, 4, 5, dtype=F64)
    y = stage(x)
    assert y.shape == (2, 4, 4, 5) and stage.out_shape == (4, 4, 5)
    v = x.permute(0, 2, 3, 1)  # [b, h, w, c]: the channel vector of every position
    probs = torch.softmax(v @ moe.router.w_gate, dim=-1)  # [b, h, w, e]
    hidden = F.gelu(torch.einsum("bhwc,ecd->bhwed", v, moe.w1) + moe.b1)
    experts = torch.einsum("bhwed,edo->bhweo", hidden, moe.w2) + moe.b2
    want = (probs[..., None] * experts).sum(-2).permute(0, 3, 1, 2)
    torch.testing.assert_close(y, want)
    assert stage.route(x).indices.shape == (2 * 20, 2)  # one token per position


@pytest.mark.parametrize("routing", ["position", "sample"])
def test_feature_map_moe_stage_from_config_reports_routing_stats(routing):
    cfg = load_config(
        None,
        [
            "model.stages=[{kind: conv, channels: 6, pool: max}, {kind: moe, width: 6, "
            f"experts: 3, k: 1, routing: {routing}, residual: true, norm: batchnorm}}, "
            "{kind: pool}]"
        ],
    )
    torch.manual_seed(0)
    net = build_network(cfg.model, (1, 8, 8), 4)
    out = net.forward_stages(torch.randn(5, 1, 8, 8))
    assert [tuple(f.shape) for f in out.features] == [(5, 6, 4, 4), (5, 6, 4, 4), (5, 6)]
    assert isinstance(net.stages[1].moe, MoE if routing == "position" else ConvMoE)
    tokens = 5 * 16 if routing == "position" else 5
    load = out.stats["stage1.load"]
    assert load.shape == (3,) and load.sum().item() == pytest.approx(1.0)
    assert (load * tokens).round().sum().item() == tokens  # a whole count of tokens per expert
    assert out.aux_loss.item() > 0


def test_sample_routing_rejects_a_shared_expert():
    with pytest.raises(ConfigError, match="routing = sample"):
        load_config(
            None, ["model.stages=[{kind: moe, routing: sample, shared_hidden: 8}, {kind: pool}]"]
        )


def _planted(routing: str) -> Network:
    """Class ``c`` samples light up channel ``c`` everywhere; the router sends channel ``c``
    to expert ``c``, so routing follows the class exactly."""
    if routing == "sample":
        moe = ConvMoE((4, 3, 3), 4, 4, 1, router="softmax_topk")
    else:
        moe = MoE(4, 4, 4, 1, 8, router="softmax_topk")
    with torch.no_grad():
        moe.router.w_gate.copy_(5.0 * torch.eye(4))
    flat = nn.Flatten()
    flat.out_shape = (36,)
    return Network([GatedStage(moe, norm_layer=None, spatial=(3, 3)), flat], nn.Linear(36, 4))


@pytest.mark.parametrize("routing", ["position", "sample"])
def test_routing_analysis_on_feature_maps_recovers_a_planted_class_routing(routing):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (200,), generator=g)
    x = torch.eye(4)[y][:, :, None, None].expand(-1, -1, 3, 3) + 0.05 * torch.randn(
        200, 4, 3, 3, generator=g
    )
    report = routing_analysis(_planted(routing), x, y, 4)[0]
    class_p = np.bincount(y.numpy(), minlength=4) / len(y)
    assert np.array_equal(report["routing_frac"], np.eye(4))
    assert report["mi_bits"] == pytest.approx(entropy_bits(class_p))
    tokens = 200 * 9 if routing == "position" else 200
    assert report["routing"].sum() == tokens
