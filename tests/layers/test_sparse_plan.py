import numpy as np

from neuroplex import wiring as W
from neuroplex.layers.sparse_plan import block_plan, choose_path


def test_gather_plan_pads_each_output_to_the_largest_fan_in_with_dummies():
    # outputs read {0, 2}, {0}, {0, 2, 3}: input 1 is never read, output 1 gets 2 dummies
    wiring = W.hypergraph([2] * 4, [2] * 3, [([0, 2], 0), ([0], 1), ([0, 2, 3], 2)])
    blocks = block_plan(wiring, window=False)
    assert blocks.k == 3 and (blocks.block_in == -1).sum() == 3
    rows = blocks.block_in.reshape(3, 3)
    assert [set(r[r >= 0].tolist()) for r in rows] == [{0, 2}, {0}, {0, 2, 3}]
    assert (blocks.block_out == np.repeat(np.arange(3), 3)).all()


def test_window_plan_applies_only_to_cyclic_wirings():
    assert block_plan(W.modular(32, 32, 8, 2, "ring"), window=True) is not None
    assert block_plan(W.modular(32, 32, 8, 2, "random", seed=3), window=True) is None
    assert choose_path(W.modular(512, 512, 8, 1, "random", seed=3)) == "block-gather"
