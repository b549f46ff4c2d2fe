"""SparseConv equals a dense convolution with the wiring's unit mask applied, on every path."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from neuroplex import wiring
from neuroplex.config import load_config
from neuroplex.layers.sparse_conv import SparseConv
from neuroplex.network import build_network

C_IN, C_OUT = 12, 8
WIRINGS = {
    "modular_m0": lambda: wiring.modular(C_IN, C_OUT, 4, 0),
    "modular_ring_m1": lambda: wiring.modular(C_IN, C_OUT, 4, 1, "ring"),
    "modular_random_m2": lambda: wiring.modular(C_IN, C_OUT, 4, 2, "random", seed=3),
    "modular_shuffle_m1": lambda: wiring.modular(C_IN, C_OUT, 4, 1, "shuffle", seed=1),
    "modular_uneven": lambda: wiring.modular(C_IN, 10, 4, 1),  # out ensembles 3, 3, 2, 2
    "random": lambda: wiring.random(C_IN, C_OUT, 2.0, seed=0),
    "dense": lambda: wiring.dense(C_IN, C_OUT),
    "hypergraph": lambda: wiring.hypergraph([6, 6], [4, 4], [[[0, 1], 0], [[1], 1]]),
}
BLOCK_PATHS = {  # the path each wiring takes when the block path is requested
    "modular_m0": "grouped",
    "modular_ring_m1": "gathered",
    "modular_random_m2": "gathered",
    "modular_shuffle_m1": "gathered",
    "modular_uneven": "masked",
    "random": "masked",
    "dense": "grouped",  # one ensemble a side: a grouped conv of one group
    "hypergraph": "masked",  # its output ensembles read 2 and 1 input ensembles
}


def dense_reference_weight(layer: SparseConv, mask: np.ndarray) -> torch.Tensor:
    """The equivalent dense weight ``[c_out, c_in, *k]``, differentiable w.r.t. the layer's
    weight, from the layout each path stores: a masked layer stores it whole; a grouped /
    gathered one stores, for output channel o, the filters of its connected input channels in
    ascending channel order."""
    if layer.path == "masked":
        unit = torch.as_tensor(mask, dtype=layer.weight.dtype)
        return layer.weight * unit.view(*mask.shape, *[1] * layer.n)
    dense = torch.zeros(mask.shape[0], mask.shape[1], *layer.weight.shape[2:], dtype=torch.float64)
    for o in range(mask.shape[0]):
        dense[o, np.flatnonzero(mask[o])] = layer.weight[o]
    return dense


@pytest.mark.parametrize("path", ["block", "masked"])
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("name", list(WIRINGS))
def test_sparse_conv_equals_masked_dense_conv(name, n, path):
    torch.manual_seed(0)
    w = WIRINGS[name]()
    layer = SparseConv(w, n, kernel=3, stride=2, path=path, dtype=torch.float64)
    assert layer.path == (BLOCK_PATHS[name] if path == "block" else "masked")
    assert f"path={layer.path}" in repr(layer)
    mask = w.to_mask()
    x = torch.randn(3, w.n_in, *[9] * n, dtype=torch.float64, requires_grad=True)
    conv = F.conv1d if n == 1 else F.conv2d
    expected = conv(x, dense_reference_weight(layer, mask), layer.bias, stride=2, padding=1)
    out = layer(x)
    assert out.shape == (3, w.n_out, *[5] * n)  # (9 + 2 - 3) // 2 + 1 = 5
    assert torch.allclose(out, expected, atol=1e-12)
    # gradients of the input, the stored weight and the bias equal the reference's
    probe = torch.randn_like(out)
    params = (x, layer.weight, layer.bias)
    got = torch.autograd.grad((out * probe).sum(), params, retain_graph=True)
    want = torch.autograd.grad((expected * probe).sum(), params)
    for g, r in zip(got, want, strict=True):
        assert torch.allclose(g, r, atol=1e-12)
    # independently of the layout: output channel o depends on input channel i iff wired
    for o in range(w.n_out):
        (grad,) = torch.autograd.grad(out[:, o].sum(), x, retain_graph=True)
        reads = grad.abs().flatten(2).sum((0, 2)) > 0
        assert np.array_equal(reads.numpy(), mask[o])


@pytest.mark.parametrize("name", list(WIRINGS))
def test_dense_view_round_trips_and_weight_grad_is_the_dense_conv_gradient(name):
    torch.manual_seed(1)
    w = WIRINGS[name]()
    layer = SparseConv(w, 2, kernel=3, stride=1, path="block", dtype=torch.float64)
    full = layer.dense_weight()
    assert full.shape == (w.n_out, w.n_in, 3, 3)
    assert torch.equal(full, dense_reference_weight(layer, w.to_mask()))
    assert torch.equal(layer.from_dense(full), layer.weight)
    assert layer.num_connections() == w.to_mask().sum() * 9
    x = torch.randn(2, w.n_in, 6, 6, dtype=torch.float64)
    dense = full.detach().requires_grad_()  # every channel pair, connected or not
    out = F.conv2d(x, dense, padding=1)
    grad_out = torch.randn_like(out)
    (reference,) = torch.autograd.grad((out * grad_out).sum(), dense)
    assert torch.allclose(layer.weight_grad(x, grad_out), reference, atol=1e-12)


def test_auto_rule_grouped_for_m0_gathered_when_sparse_masked_when_dense():
    assert SparseConv(wiring.modular(24, 48, 4, 0), 2).path == "grouped"  # density 1/4
    assert SparseConv(wiring.modular(24, 48, 8, 0), 1).path == "grouped"
    assert SparseConv(wiring.modular(24, 48, 8, 1), 2).path == "gathered"  # density 2/8
    assert SparseConv(wiring.modular(24, 48, 4, 1), 2).path == "masked"  # density 2/4
    assert SparseConv(wiring.modular(24, 48, 4, 1), 2, path="block").path == "gathered"
    assert SparseConv(wiring.random(24, 48, 2.0, seed=0), 2).path == "masked"


def test_set_wiring_keeps_shared_filters_and_zeroes_new_ones():
    torch.manual_seed(2)
    old, new = wiring.modular(8, 8, 4, 1, "ring"), wiring.modular(8, 8, 4, 0)
    layer = SparseConv(old, 2, path="block")
    before = layer.dense_weight().detach().clone()
    param = layer.weight
    layer.set_wiring(new)
    assert layer.weight is param and layer.path == "grouped" and not hasattr(layer, "index")
    keep = torch.as_tensor(new.to_mask()).view(8, 8, 1, 1)
    assert torch.equal(layer.dense_weight(), before * keep)


def test_grouped_path_for_m0_stores_one_block_per_ensemble():
    layer = SparseConv(wiring.modular(16, 8, 4, 0), 2, kernel=3)
    assert layer.path == "grouped" and layer.groups == 4
    assert layer.weight.shape == (8, 4, 3, 3)  # 16 / 4 input channels per group
    assert not hasattr(layer, "index") and not hasattr(layer, "mask")


def test_gathered_path_stores_only_connected_blocks():
    w = wiring.modular(16, 16, 4, 1)  # density 2 / 4
    layer = SparseConv(w, 2, kernel=3, path="block")
    assert layer.path == "gathered" and layer.groups == 4
    assert layer.weight.numel() == 16 * 16 * 9 // 2
    assert layer.index.shape == (4 * 2 * 4,)  # 4 groups x 2 input ensembles x 4 channels


def test_sparse_conv_stage_from_config():
    stages = (
        "model.stages=[{kind: conv, channels: 8}, {kind: sparse_conv, channels: 16, "
        "ensembles: 8, m: 1, layers: 2, pool: max}, {kind: pool}]"
    )
    net = build_network(load_config(None, [stages]).model, (1, 10, 10), 3)
    stage = net.stages[1]
    assert stage.out_shape == (16, 2, 2)  # 10 -pool-> 5 -pool-> 2
    assert [block.conv.path for block in stage] == ["gathered", "gathered"]
    assert np.array_equal(stage.ensemble_labels, np.repeat(np.arange(8), 2))
    assert net(torch.randn(2, 1, 10, 10)).shape == (2, 3)
