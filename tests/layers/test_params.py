"""Parameter counts count the connections that exist (layers/params.py), for every sparse path,
sparse MoE experts, and before and after every plasticity kind and lottery-ticket pruning."""

import pytest
import torch
from torch import nn

from neuroplex import wiring as W
from neuroplex.config import load_config
from neuroplex.layers.moe import MoE
from neuroplex.layers.params import count_parameters
from neuroplex.layers.sparse import SparseLinear
from neuroplex.plasticity.prune import apply_ticket, prunable_layers
from neuroplex.train.setup import build_setup

UNEVEN = W.modular(13, 11, 3, 1, "ring")  # unequal ensembles: block paths pad
DUMMIES = W.hypergraph([2, 3, 2], [2, 2, 3], [([0, 1], 0), ([2], 1), ([0], 2)])  # fan-in 2, 1, 1


def mask_nonzeros(layer: SparseLinear) -> int:
    """Connections of ``layer`` read off a mask tensor (its buffer on masked-dense, else the
    wiring's unit mask), never off the weight's storage."""
    mask = layer.mask if layer.path == "masked-dense" else torch.as_tensor(layer.wiring.to_mask())
    return int(torch.count_nonzero(mask))


def expected_count(model: nn.Module) -> int:
    """Every parameter entry, except each SparseLinear weight counts its mask's nonzeros."""
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    weights = {id(m.weight) for m in sparse}
    other = sum(p.numel() for p in model.parameters() if id(p) not in weights)
    return other + sum(mask_nonzeros(m) for m in sparse)


@pytest.mark.parametrize(
    ("wiring", "path"),
    [
        (W.random(12, 10, 2.0, seed=0), "auto"),  # a unit mask: masked-dense
        (UNEVEN, "masked-dense"),
        (UNEVEN, "block-gather"),
        (UNEVEN, "block-window"),
        (DUMMIES, "block-gather"),
        (W.dense(6, 5), "auto"),
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_layer_counts_its_mask_nonzeros_plus_bias_on_every_path(wiring, path, bias):
    layer = SparseLinear(wiring, bias=bias, path=path)
    mask = torch.as_tensor(wiring.to_mask())
    assert count_parameters(layer) == int(mask.sum()) + (wiring.n_out if bias else 0)
    if path != "auto" or not wiring.is_block:
        assert layer.weight.numel() >= mask.sum()  # stored entries may be more, never fewer


def test_sparse_moe_experts_count_only_their_masked_in_weights():
    wirings = (W.modular(8, 12, 4, 1), W.modular(12, 8, 4, 0))
    moe = MoE(8, 8, 4, 2, 12, router="softmax_topk", expert_wirings=wirings)
    dense = MoE(8, 8, 4, 2, 12, router="softmax_topk")
    zeros = int((moe.mask1 == 0).sum() + (moe.mask2 == 0).sum())
    stored = sum(p.numel() for p in moe.parameters())
    assert zeros > 0
    assert count_parameters(moe) == stored - 4 * zeros
    assert count_parameters(dense) == sum(p.numel() for p in dense.parameters())


def sparse_config(kind: str):
    """Two 4-ensemble ring-wired sparse stages (density 0.5) on digits, rewired every 2 steps."""
    return load_config(
        None,
        [
            "name=tiny",
            "data.name=digits",
            "model.stages=[{kind: sparse, width: 32, ensembles: 4, m: 1}, "
            "{kind: sparse, width: 16, ensembles: 4, m: 1}]",
            "train.batch_size=64",
            "train.lr=0.01",
            f"train.plasticity={{kind: {kind}, every: 2, fraction: 0.3}}",
        ],
    )


@pytest.mark.parametrize("kind", ["set", "rigl", "block_set", "block_rigl", "hebbian"])
def test_count_follows_the_masks_before_and_after_every_plasticity_kind(kind, tmp_path):
    s = build_setup(sparse_config(kind))
    model = s.model
    before = expected_count(model)
    assert model.num_parameters() == before
    rewired = []
    for step in range(1, 7):
        idx = torch.arange(64) + 64 * step
        s.method.step(s.data.train.x[idx], s.data.train.y[idx], 0.01)
        rewired += s.plasticity.after_step(step, tmp_path)
        assert model.num_parameters() == expected_count(model)
    assert rewired  # the layers were rewired
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    if kind in ("set", "rigl"):  # unit-level swaps: masked-dense stores the full matrix
        assert all(m.path == "masked-dense" for m in layers)
        assert sum(m.weight.numel() for m in layers) > sum(mask_nonzeros(m) for m in layers)
    assert model.num_parameters() == before  # swaps keep the number of connections
    assert model.num_active_parameters() == model.num_parameters()  # no experts


def test_count_follows_the_masks_of_a_pruned_ticket():
    cfg = load_config(
        None,
        [
            "name=tiny",
            "data.name=digits",
            "model.stages=[{kind: dense, width: 32}, "
            "{kind: sparse, width: 16, ensembles: 4, m: 1}]",
        ],
    )
    model = build_setup(cfg).model
    gen = torch.Generator().manual_seed(0)
    masks = {
        name: torch.rand(m.out_features, m.in_features, generator=gen) < 0.3
        for name, m in prunable_layers(model).items()
    }
    apply_ticket(model, masks, {k: v.clone() for k, v in model.state_dict().items()})
    kept = sum(int(m.sum()) for m in masks.values())
    biases = sum(m.bias.numel() for m in prunable_layers(model).values())
    rest = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("stages"))
    norms = sum(p.numel() for n, p in model.stages.named_parameters() if ".norm." in n)
    assert model.num_parameters() == kept + biases + rest + norms == expected_count(model)
