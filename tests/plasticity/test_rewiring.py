import json

import numpy as np
import pytest
import torch

from neuroplex import wiring as W
from neuroplex.errors import CheckpointError
from neuroplex.layers.sparse import SparseLinear
from neuroplex.plasticity.rewiring import (
    apply_wiring,
    block_rms,
    block_swap,
    ensemble_coactivation,
    pairs_wiring,
    restore_wirings,
    unit_drop,
    unit_grow,
    wiring_state,
)
from neuroplex.wiring import Wiring


def test_set_drops_zeta_of_each_sign_closest_to_zero():
    weight = torch.tensor(
        [
            [0.9, -0.05, 0.2, -0.7, 0.0, 0.5],
            [0.1, -0.3, 0.4, -0.01, 0.8, -0.6],
        ]
    )
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 5] = False  # -0.6 is not a connection
    # active: positives 0.9 0.2 0.5 0.1 0.4 0.8 (6), negatives -0.05 -0.7 -0.3 -0.01 (4), one 0.0
    # zeta 0.25: ceil(1.5) = 2 positives (0.1, 0.2), ceil(1.0) = 1 negative (-0.01), and the 0.0
    expected = torch.tensor(
        [
            [True, True, False, True, False, True],
            [False, True, True, False, True, False],
        ]
    )
    dropped = unit_drop(weight, mask, 0.25, "sign_split")
    kept = mask.clone().flatten()
    kept[dropped] = False
    assert torch.equal(kept.view(2, 6), expected)
    # joint |w| (RigL): ceil(0.25 * 11) = 3 smallest |w|: 0.0, -0.01, -0.05
    dropped = unit_drop(weight, mask, 0.25, "magnitude")
    assert sorted(dropped.tolist()) == [1, 4, 9]


def test_unit_grow_may_put_a_just_dropped_connection_back():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    score = torch.tensor([[9.0, 8.0, 1.0], [9.0, 3.0, 2.0]])  # kept ones are never candidates
    dropped = torch.tensor([1, 3])  # (0, 1) with score 8 and (1, 0) with score 9
    assert sorted(unit_grow(mask, dropped, score).tolist()) == [1, 3]
    score[0, 1] = score[1, 0] = 0.0
    assert sorted(unit_grow(mask, dropped, score).tolist()) == [4, 5]  # scores 3 and 2


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


def test_hebbian_drops_the_least_and_adds_the_most_co_active_pair_of_the_same_output():
    wiring = W.hypergraph([3] * 4, [2, 2], [([0, 1], 0), ([2], 1)])
    coact = ensemble_coactivation(*planted_activations(), wiring)
    assert coact.shape == (2, 4)
    assert np.argmax(coact[0]) == 3 and np.argmax(coact[1]) == 2
    for regrow in (False, True):
        pruned, grown = block_swap(wiring, coact, coact, 1, regrow)
        assert pruned == [(1, 0)]  # input 1 is noise: the weakest connected pair
        assert grown == [(3, 0)]  # the planted co-active unconnected pair
    new = pairs_wiring(wiring, pruned, grown)
    assert set(new.block_pairs) == {(0, 0), (3, 0), (2, 1)}
    # output 1 has no pair more co-active than (2, 1): regrow puts it back, hebbian replaces it
    pruned, grown = block_swap(wiring, coact, coact, 3, regrow=True)
    assert (2, 1) in pruned and (2, 1) in grown
    pruned, grown = block_swap(wiring, coact, coact, 3, regrow=False)
    assert (2, 1) in pruned and not set(pruned) & set(grown)
    assert grown[pruned.index((2, 1))] == (int(np.argmax(np.where([1, 1, 0, 1], coact[1], -1))), 1)


def test_block_swap_keeps_every_fan_in_and_the_density_exact():
    wiring = W.hypergraph([2, 2, 3, 2], [4, 4], [([0, 2], 0), ([1, 3], 1)])
    score = np.array([[0.5, 0.0, 0.6, 0.0], [0.0, 0.1, 0.0, 0.7]])
    grow = np.array([[0.0, 0.0, 5.0, 4.0], [9.0, 1.0, 9.5, 0.0]])
    pruned, grown = block_swap(wiring, score, grow, 2, regrow=True)
    assert pruned == [(1, 1), (0, 0)]  # the two weakest connected pairs
    # each replaced in its own output by a pair of its size: (2, 1) is 3x4, (2, 0) connected
    assert grown == [(0, 1), (3, 0)]
    new = pairs_wiring(wiring, pruned, grown)
    assert new.density == wiring.density and new.is_block
    fan_in = lambda w: sorted(j for _, j in w.block_pairs)  # noqa: E731
    assert fan_in(new) == fan_in(wiring) == [0, 0, 1, 1]
    grow[1, 0] = 0.0  # without regrow, (1, 1) moves to the only other 2-unit input left
    assert block_swap(wiring, score, grow, 2, regrow=False)[1] == [(0, 1), (3, 0)]


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
