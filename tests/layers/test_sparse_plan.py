import numpy as np

from neuroplex import wiring as W
from neuroplex.layers.sparse_plan import block_plan, fan_groups


def test_fan_groups_list_each_read_input_once_by_fan_out_without_dummies():
    # outputs read {0, 2}, {0}, {0, 2, 3}: input 1 is never read, output 1 gets 2 dummies
    wiring = W.hypergraph([2] * 4, [2] * 3, [([0, 2], 0), ([0], 1), ([0, 2, 3], 2)])
    blocks = block_plan(wiring, window=False)
    assert blocks.k == 3 and (blocks.block_in == -1).sum() == 3
    order, readers, groups = fan_groups(blocks.block_in, 4)
    assert groups == ((1, 1), (1, 2), (1, 3))  # (count, fan-out): input 3, 2, 0
    assert order.tolist() == [3, 2, 0]
    reading = np.split(readers, np.cumsum([c * f for c, f in groups])[:-1])
    for i, ids in zip(order, reading, strict=True):
        assert (blocks.block_in[ids] == i).all()  # every listed block reads that input
        assert len(ids) == (blocks.block_in == i).sum()  # and all of them are listed


def test_fan_groups_of_a_regular_wiring_are_one_group():
    blocks = block_plan(W.modular(32, 32, 8, 2, "shuffle", seed=3), window=False)
    order, readers, groups = fan_groups(blocks.block_in, 8)
    assert groups == ((8, 3),) and sorted(order.tolist()) == list(range(8))
    assert sorted(readers.tolist()) == list(range(24))
