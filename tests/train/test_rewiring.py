import json

import numpy as np
import pytest
import torch

from neuroplex import wiring as W
from neuroplex.errors import CheckpointError
from neuroplex.layers.sparse import SparseLinear
from neuroplex.train.rewiring import (
    apply_wiring,
    block_rms,
    block_swap,
    ensemble_coactivation,
    pairs_wiring,
    restore_wirings,
    unit_swap,
    wiring_state,
)
from neuroplex.wiring import Wiring


def test_unit_swap_drops_the_smallest_and_grows_the_best_inactive():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    magnitude = torch.tensor([[0.5, 0.1, 0.0], [0.3, 0.0, 0.0]])
    score = torch.tensor([[9.0, 9.0, 1.0], [9.0, 3.0, 2.0]])  # active scores are ignored
    pruned, grown = unit_swap(magnitude, mask, score, 2)
    assert pruned.tolist() == [1, 3]  # |w| 0.1 then 0.3
    assert grown.tolist() == [4, 5]  # inactive scores 3 and 2
    pruned, grown = unit_swap(magnitude, mask, score, 10)  # capped by the 3 inactive ones
    assert len(pruned) == len(grown) == 3


def planted_activations(p: int = 500, seed: int = 0):
    """Input ensembles of 3 units (4 of them), output ensembles of 2 (2 of them). Output 0's
    mean follows input 3 (unconnected), output 1's follows input 2; input 1 is pure noise."""
    gen = np.random.default_rng(seed)
    sources = gen.normal(size=(p, 4))
    x = np.repeat(sources, 3, axis=1) + 0.1 * gen.normal(size=(p, 12))
    y0 = sources[:, 3] + 0.3 * sources[:, 0]
    y1 = sources[:, 2]
    y = np.stack([y0, y0, y1, y1], axis=1) + 0.1 * gen.normal(size=(p, 4))
    return torch.tensor(x), torch.tensor(y)


def test_hebbian_drops_the_least_and_adds_the_most_co_active_pair():
    wiring = W.hypergraph([3] * 4, [2, 2], [([0, 1], 0), ([2], 1)])
    coact = ensemble_coactivation(*planted_activations(), wiring)
    assert coact.shape == (2, 4)
    assert np.argmax(coact[0]) == 3 and np.argmax(coact[1]) == 2
    pruned, grown = block_swap(wiring, coact, coact, 1)
    assert pruned == [(1, 0)]  # input 1 is noise: the weakest connected pair
    assert grown == [(3, 0)]  # the planted co-active unconnected pair
    new = pairs_wiring(wiring, pruned, grown)
    assert set(new.block_pairs) == {(0, 0), (3, 0), (2, 1)}


def test_block_swap_keeps_every_output_fed_and_the_density_exact():
    # output 1 has one input, the weakest pair of all: it must stay
    wiring = W.hypergraph([2, 2, 3], [4, 4], [([0, 1], 0), ([2], 1)])
    score = np.array([[0.5, 0.6, 0.0], [0.0, 0.0, 0.1]])
    grow = np.array([[0.0, 0.0, 5.0], [9.0, 1.0, 0.0]])
    pruned, grown = block_swap(wiring, score, grow, 2)
    assert pruned == [(0, 0)]  # (2, 1) is output 1's only input; (1, 0) is kept for output 0
    assert grown == [(0, 1)]  # same size (2x4) as the pruned pair; (2, 0) is 3x4
    new = pairs_wiring(wiring, pruned, grown)
    assert new.density == wiring.density and new.is_block


def test_block_rms_is_per_block_root_mean_square():
    wiring = W.hypergraph([1, 2], [2, 1], [([0, 1], 0), ([1], 1)])
    dense = torch.tensor([[3.0, 1.0, 1.0], [4.0, 1.0, 1.0], [0.0, 2.0, 0.0]])
    rms = block_rms(dense, wiring)
    np.testing.assert_allclose(rms, [[np.sqrt(12.5), 1.0], [0.0, np.sqrt(2.0)]])


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_apply_wiring_zeroes_new_weights_and_their_optimizer_state(optimizer):
    torch.manual_seed(0)
    layer = SparseLinear(W.modular(8, 8, 4, 1))
    opt = (
        torch.optim.AdamW(layer.parameters(), lr=0.1)
        if optimizer == "adamw"
        else torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    )
    for _ in range(2):
        opt.zero_grad()
        layer(torch.randn(5, 8)).square().sum().backward()
        opt.step()
    old_mask = torch.as_tensor(layer.wiring.to_mask())
    new_mask = old_mask.clone()
    new_mask[0, :] = ~old_mask[0, :]  # unit-level: row 0 swaps every connection
    moments = [k for k, v in opt.state[layer.weight].items() if v.shape == layer.weight.shape]
    before = {k: layer.to_dense(opt.state[layer.weight][k]) for k in moments}
    weight = layer.dense_weight().detach()
    wiring = Wiring((8,), (8,), unit_mask=new_mask.numpy())
    apply_wiring(layer, wiring, opt)
    assert layer.path == "masked-dense" and layer.weight.shape == (8, 8)
    kept = old_mask & new_mask
    grown = new_mask & ~old_mask
    assert (layer.dense_weight()[grown] == 0).all()
    assert torch.equal(layer.dense_weight().detach()[kept], weight[kept])
    assert moments == (["exp_avg", "exp_avg_sq"] if optimizer == "adamw" else ["momentum_buffer"])
    for k in moments:
        after = layer.to_dense(opt.state[layer.weight][k])
        assert after.shape == (8, 8) and (after[grown] == 0).all() and (after[~new_mask] == 0).all()
        assert torch.equal(after[kept], before[k][kept]) and before[k][kept].abs().sum() > 0
    opt.step()  # the optimizer still owns the (same) parameter with its new shape


def test_wiring_state_round_trips_into_a_fresh_model():
    build = lambda: torch.nn.Sequential(SparseLinear(W.modular(8, 6, 2, 1)), torch.nn.ReLU())  # noqa: E731
    model, fresh = build(), build()
    rewired = pairs_wiring(model[0].wiring, [(1, 0)], [])  # output 0 keeps input 0
    model[0].set_wiring(rewired)
    state = json.loads(json.dumps(wiring_state(model)))
    restore_wirings(fresh, state)
    assert fresh[0].wiring == rewired and fresh[0].path == model[0].path
    fresh.load_state_dict(model.state_dict())
    with pytest.raises(CheckpointError, match="'9'"):
        restore_wirings(fresh, {"9": state["0"]})
