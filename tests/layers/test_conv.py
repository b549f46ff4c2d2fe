"""Feature-map stages: output shapes against hand-computed sizes, and values against F.conv."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuroplex.layers.conv import (
    BasicBlock,
    ChannelLayerNorm,
    ConvStage,
    Flatten,
    GlobalPool,
    ResidualStage,
)


def out_of(stage: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    y = stage.eval()(x)
    assert tuple(y.shape[1:]) == stage.out_shape  # the declared shape is the real one
    return stage.out_shape


def test_conv_stage_2d_shapes():
    x = torch.randn(2, 3, 17, 13)
    # one conv, kernel 3, stride 2, padding 1: (17 + 2 - 3) // 2 + 1 = 9 and (13 - 1) // 2 + 1 = 7
    assert out_of(ConvStage((3, 17, 13), 8, kernel=3, stride=2), x) == (8, 9, 7)
    # + max pool 2 after each of 2 layers: 9x7 -> 4x3 -> (conv keeps it) -> 2x1
    stage = ConvStage((3, 17, 13), 8, 2, kernel=3, stride=2, pool="max")
    assert out_of(stage, x) == (8, 2, 1)
    assert isinstance(stage[0].conv, nn.Conv2d) and isinstance(stage[0].pool, nn.MaxPool2d)
    # kernel 5 (padding 2), stride 1: sizes kept
    assert out_of(ConvStage((3, 17, 13), 4, kernel=5), x) == (4, 17, 13)


def test_conv_stage_1d_shapes():
    x = torch.randn(2, 2, 40)
    # kernel 5, stride 2, padding 2: (40 + 4 - 5) // 2 + 1 = 20; avg pool 2 -> 10
    stage = ConvStage((2, 40), 6, kernel=5, stride=2, pool="avg")
    assert out_of(stage, x) == (6, 10)
    assert isinstance(stage[0].conv, nn.Conv1d) and isinstance(stage[0].pool, nn.AvgPool1d)
    # 3 layers, pool 2 each, stride 1: 40 -> 20 -> 10 -> 5
    assert out_of(ConvStage((2, 40), 6, 3, pool="max"), x) == (6, 5)


def test_conv_stage_refuses_vectors_and_maps_that_vanish():
    with pytest.raises(ValueError, match=r"needs a feature map \(c, L\) or \(c, h, w\)"):
        ConvStage((40,), 8)
    with pytest.raises(ValueError, match="shrink the feature map"):
        ConvStage((1, 8, 8), 4, 4, pool="max")  # 8 -> 4 -> 2 -> 1 -> 0


def test_conv_block_is_conv_then_norm_then_activation_then_pool():
    torch.manual_seed(0)
    stage = ConvStage((3, 6, 6), 4, kernel=3, pool="max", norm=None, act_layer=nn.ReLU)
    x = torch.randn(2, 3, 6, 6)
    conv = stage[0].conv
    expected = F.max_pool2d(F.relu(F.conv2d(x, conv.weight, conv.bias, padding=1)), 2)
    assert torch.allclose(stage(x), expected, atol=1e-6)
    assert conv.bias is not None  # a bias only without a norm after the conv
    assert ConvStage((3, 6, 6), 4, norm=nn.BatchNorm2d)[0].conv.bias is None


def test_residual_stage_shapes_and_projection_only_when_the_shape_changes():
    x = torch.randn(2, 4, 9, 9)
    stage = ResidualStage((4, 9, 9), 16, 2, stride=2)
    # stride 2, kernel 3, padding 1: (9 + 2 - 3) // 2 + 1 = 5
    assert out_of(stage, x) == (16, 5, 5)
    assert isinstance(stage[0].shortcut, nn.Sequential)
    assert isinstance(stage[1].shortcut, nn.Identity)
    same = ResidualStage((4, 9, 9), 4, 1)
    assert out_of(same, x) == (4, 9, 9) and isinstance(same[0].shortcut, nn.Identity)
    strided = ResidualStage((4, 9, 9), 4, 1, stride=3)  # same channels, new size: projection
    assert out_of(strided, x) == (4, 3, 3) and isinstance(strided[0].shortcut, nn.Sequential)
    one_d = ResidualStage((3, 40), 8, 3, stride=2)  # (40 + 2 - 3) // 2 + 1 = 20
    assert out_of(one_d, torch.randn(2, 3, 40)) == (8, 20)
    assert isinstance(one_d[0].conv1, nn.Conv1d)


def test_basic_block_matches_a_hand_written_resnet_block():
    torch.manual_seed(0)
    block = BasicBlock(3, 5, 2, stride=2, norm=None, act_layer=nn.ReLU)
    x = torch.randn(2, 3, 7, 7)
    c1, c2, proj = block.conv1, block.conv2, block.shortcut[0]
    h = F.relu(F.conv2d(x, c1.weight, c1.bias, stride=2, padding=1))
    main = F.conv2d(h, c2.weight, c2.bias, padding=1)
    expected = F.relu(main + F.conv2d(x, proj.weight, proj.bias, stride=2))
    assert torch.allclose(block(x), expected, atol=1e-6)


def test_channel_layernorm_normalises_over_channels_at_each_position():
    torch.manual_seed(0)
    norm = ChannelLayerNorm(4)
    x = torch.randn(2, 4, 3, 5) * 3 + 1
    mean = x.mean(dim=1, keepdim=True)
    var = x.var(dim=1, unbiased=False, keepdim=True)
    assert torch.allclose(norm(x), (x - mean) / torch.sqrt(var + norm.eps), atol=1e-5)


def test_global_pool_and_flatten():
    x = torch.randn(3, 4, 5, 6)
    avg, top = GlobalPool((4, 5, 6), "avg"), GlobalPool((4, 5, 6), "max")
    assert avg.out_shape == (4,) and avg.d_out == 4
    assert torch.allclose(avg(x), x.mean(dim=(2, 3)))
    assert torch.equal(top(x), x.amax(dim=(2, 3)))
    signal = torch.randn(3, 4, 7)
    assert torch.allclose(GlobalPool((4, 7))(signal), signal.mean(dim=2))
    flat = Flatten((4, 5, 6))
    assert flat.out_shape == (120,) and flat.d_out == 120
    assert torch.equal(flat(x)[1], torch.cat([x[1, c].reshape(-1) for c in range(4)]))
    with pytest.raises(ValueError, match="needs a feature map"):
        GlobalPool((10,))
