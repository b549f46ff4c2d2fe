"""count_macs against hand counts of a small conv network, on every SparseConv path."""

from pathlib import Path

import pytest
import torch
from torch import nn

from neuroplex import wiring
from neuroplex.config import load_config
from neuroplex.layers.macs import count_macs
from neuroplex.layers.sparse import SparseLinear
from neuroplex.layers.sparse_conv import SparseConv
from neuroplex.network import build_network


@pytest.mark.parametrize("path", ["block", "masked"])
def test_conv_network_macs_equal_the_hand_count(path):
    # conv 1 -> 4 on 8x8, 2x2 pool, sparse conv 4 -> 8 (2 ensembles, m 0: 2 of 4 input
    # channels per output channel) on 4x4, 2x2 pool, flatten 8 * 2 * 2 = 32, linear 32 -> 10
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.MaxPool2d(2),
        SparseConv(wiring.modular(4, 8, 2, 0), 2, kernel=3, path=path),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    hand = {"conv": 8 * 8 * 4 * 1 * 9 + 4 * 4 * 8 * 2 * 9, "linear": 32 * 10}
    macs = count_macs(model, torch.zeros(3, 1, 8, 8))
    assert macs == hand | {"total": hand["conv"] + hand["linear"]}


def test_grouped_conv_strided_1d_and_sparse_linear_macs():
    model = nn.Sequential(
        nn.Conv1d(4, 6, 5, stride=2, padding=2, groups=2),  # 10 -> 5 positions, 2 in per out
        nn.Flatten(),
        SparseLinear(wiring.modular(30, 8, 2, 0)),  # 15 * 4 connections per ensemble pair
    )
    macs = count_macs(model, torch.zeros(2, 4, 10))
    assert macs["conv"] == 5 * 6 * 2 * 5
    assert macs["linear"] == 2 * 15 * 4


def test_fashion_mnist_cnn_and_its_modular_twin():
    def network(stage2: str, stage3: str):
        conv = "kind: conv, kernel: 3, norm: batchnorm, pool: max"
        stages = f"[{{{conv}, channels: 24}}, {{{stage2}}}, {{{stage3}}}, {{kind: flatten}}]"
        return build_network(load_config(None, [f"model.stages={stages}"]).model, (1, 28, 28), 10)

    dense = network("kind: conv, channels: 48, pool: max", "kind: conv, channels: 96, pool: max")
    sparse = "kind: sparse_conv, ensembles: 4, m: 0, pool: max, channels: "
    modular = network(sparse + "48", sparse + "96")
    x = torch.zeros(1, 1, 28, 28)
    # 28x28 * 24 * 1 * 9 + 14x14 * 48 * 24 * 9 + 7x7 * 96 * 48 * 9; 3x3 * 96 -> 10 head
    assert count_macs(dense, x) == {"conv": 4_233_600, "linear": 8_640, "total": 4_242_240}
    # the two sparse convs read 1/4 of their input channels
    assert count_macs(modular, x)["conv"] == 169_344 + (2_032_128 + 2_032_128) // 4


def test_the_modular_cnn_config_is_the_cnn_at_quarter_density_and_under_04_of_its_macs():
    configs = Path(__file__).parents[2] / "configs"
    dense, modular = (
        build_network(load_config(configs / name).model, (1, 28, 28), 10)
        for name in ("fmnist_cnn.yaml", "fmnist_modular_cnn.yaml")
    )
    convs = [m for m in modular.modules() if isinstance(m, SparseConv)]
    assert len(convs) == 2 and all(m.wiring.density <= 0.25 for m in convs)
    assert [m.path for m in convs] == ["grouped", "grouped"]
    x = torch.zeros(1, 1, 28, 28)
    assert count_macs(modular, x)["conv"] <= 0.4 * count_macs(dense, x)["conv"]
