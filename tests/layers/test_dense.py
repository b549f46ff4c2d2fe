import torch
from torch import nn

from neuroplex.layers import DenseBlock, DenseStage


def test_dense_block_shapes_and_parts():
    block = DenseBlock(5, 7, norm_layer=None, act_layer=nn.ReLU, dropout=0.0)
    assert isinstance(block.norm, nn.Identity) and isinstance(block.drop, nn.Identity)
    out = block(torch.randn(3, 5))
    assert out.shape == (3, 7)
    assert (out >= 0).all()  # ReLU applied


def test_dense_stage_stacks_layers_of_one_width():
    stage = DenseStage(5, 16, layers=3, norm_layer=nn.LayerNorm, dropout=0.2)
    assert stage.d_out == 16 and len(stage) == 3
    assert [b.linear.in_features for b in stage] == [5, 16, 16]
    assert stage(torch.randn(4, 5)).shape == (4, 16)


def test_dense_stage_state_dict_round_trip_and_dtype():
    a = DenseStage(5, 8, layers=2, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in a.parameters())
    b = DenseStage(5, 8, layers=2, dtype=torch.float64)
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    x = torch.randn(2, 5, dtype=torch.float64)
    assert torch.equal(a(x), b(x))
