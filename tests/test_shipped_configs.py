"""The configs in configs/: all valid; the default uses every pillar; its dense twin differs
only where it must."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from neuroplex.config import SparseStageConfig, load_config
from neuroplex.layers.stages import GatedStage, SparseStage
from neuroplex.network import build_network

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MNIST1D = (40, 10)  # features, classes


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    assert load_config(path).name == path.stem


def test_the_default_uses_every_pillar_at_once():
    cfg = load_config(CONFIGS / "default.yaml")
    assert cfg.data.name == "mnist1d" and cfg.train.method == "local"
    net = build_network(cfg.model, *MNIST1D)
    sparse = [s for s in net.stages if isinstance(s, SparseStage)]
    assert len(sparse) == 1 and any(isinstance(s, GatedStage) for s in net.stages)
    (stage_cfg,) = [c for c in cfg.model.stages if isinstance(c, SparseStageConfig)]
    assert stage_cfg.wiring == "modular"
    assert all(block.linear.wiring.density < 0.5 for block in sparse[0])
    assert len(np.unique(sparse[0].ensemble_labels)) == stage_cfg.ensembles > 1


def test_the_dense_twin_wires_every_ensemble_to_every_other_and_changes_nothing_else():
    modular = load_config(CONFIGS / "default.yaml")
    dense = load_config(CONFIGS / "default_dense.yaml")
    i = next(i for i, c in enumerate(modular.model.stages) if isinstance(c, SparseStageConfig))
    stage = modular.model.stages[i]
    twin = stage.model_copy(update={"m": stage.ensembles - 1})
    stages = [*modular.model.stages[:i], twin, *modular.model.stages[i + 1 :]]
    model = modular.model.model_copy(update={"stages": stages})
    expected = modular.model_copy(update={"name": "default_dense", "model": model})
    assert dense == expected
    built = build_network(dense.model, *MNIST1D).stages[i]
    assert all(block.linear.wiring.density == 1.0 for block in built)
    designed = build_network(modular.model, *MNIST1D).stages[i].ensemble_labels
    assert np.array_equal(built.ensemble_labels, designed)  # the same groups to compare with


@pytest.mark.parametrize(
    "backprop, auglocal",
    [
        ("fmnist_cnn", "fmnist_cnn_local"),
        ("fmnist_allconv", "fmnist_allconv_local"),
        ("fmnist_resnet", "fmnist_local"),
    ],
)
def test_the_auglocal_configs_are_their_backprop_twins_trained_by_auglocal(backprop, auglocal):
    # docs/benchmarks.md compares the two runs: only the method and its aux nets may differ
    cnn, local = (
        load_config(CONFIGS / f"{backprop}.yaml"),
        load_config(CONFIGS / f"{auglocal}.yaml"),
    )
    assert local.model == cnn.model and local.data == cnn.data and local.seed == cnn.seed
    assert local.train.method == "local" and local.train.aux.kind == "augmented"
    as_backprop = local.train.model_copy(update={"method": "backprop", "aux": cnn.train.aux})
    assert as_backprop == cnn.train


def test_fmnist_modular_is_sparse_and_its_dense_twins_match_width_and_parameters():
    modular, mlp, small = (
        load_config(CONFIGS / f"{name}.yaml")
        for name in ("fmnist_modular", "fmnist_mlp", "fmnist_mlp_small")
    )
    assert modular.train == small.train and modular.data == mlp.data == small.data
    # the modular config trains as fmnist_mlp did before it went to 24000 steps
    assert modular.train == mlp.train.model_copy(update={"steps": 16000})
    torch.manual_seed(0)  # the wirings' draws follow the run's seed
    net = build_network(modular.model, 784, 10)
    masks = [block.linear.wiring.to_mask() for stage in net.stages for block in stage]
    assert sum(m.sum() for m in masks) / sum(m.size for m in masks) <= 0.25
    assert [s.width for s in modular.model.stages] == [s.width for s in mlp.model.stages]
    # the dense twin's parameters by hand: linear + layernorm per stage, then the head
    dims = [784] + [s.width for s in small.model.stages]
    pairs = zip(dims[:-1], dims[1:], strict=True)
    dense = sum(a * b + b + 2 * b for a, b in pairs) + dims[-1] * 10 + 10
    assert build_network(small.model, 784, 10).num_parameters() == dense
    active = net.num_active_parameters()
    assert abs(dense - active) / active < 0.02
