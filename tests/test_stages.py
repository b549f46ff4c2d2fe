"""Stage kinds moe and sparse: built from config, trained by the one loop with either method."""

import numpy as np
import pytest
import torch

from neuroplex.config import load_config
from neuroplex.errors import ConfigError
from neuroplex.files import read_jsonl
from neuroplex.layers.stages import GatedStage, SparseStage
from neuroplex.network import build_network
from neuroplex.train import train

MIXED = (
    "model.stages=[{kind: sparse, width: 32, ensembles: 4, m: 1},"
    " {kind: moe, width: 32, experts: 4, k: 2, expert_hidden: 16}]"
)


def test_sparse_and_moe_stages_build_and_report_side_results():
    cfg = load_config(None, [MIXED])
    torch.manual_seed(0)
    net = build_network(cfg.model, in_shape=12, n_classes=3)
    assert isinstance(net.stages[0], SparseStage) and isinstance(net.stages[1], GatedStage)
    assert np.array_equal(net.stages[0].ensemble_labels, np.repeat(np.arange(4), 8))
    out = net.forward_stages(torch.randn(20, 12))
    assert out.logits.shape == (20, 3)
    assert out.aux_loss.item() >= 0
    assert out.stats["stage1.load"].shape == (4,)


def test_moe_stage_dropout_acts_in_training_only():
    dropped = MIXED.replace("expert_hidden: 16}", "expert_hidden: 16, dropout: 0.5}")
    cfg = load_config(None, [dropped])
    torch.manual_seed(0)
    stage = build_network(cfg.model, in_shape=12, n_classes=3).stages[1]
    x = torch.randn(50, 32)
    stage.train()
    assert (stage(x) == 0).float().mean() > 0.3  # about half the units dropped
    stage.eval()
    assert (stage(x) == 0).float().mean() < 0.01


@pytest.mark.parametrize("method", ["backprop", "local"])
def test_loop_trains_mixed_stages_and_logs_expert_load(method, tmp_path):
    cfg = load_config(
        None,
        ["data.name=digits", MIXED, f"train.method={method}", "train.epochs=3", "train.lr=0.01"],
    )
    summary = train(cfg, tmp_path / "run")
    assert summary["test_acc"] > 0.6
    row = read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]
    loads = [row[f"stage1.load.{i}"] for i in range(4)]
    assert sum(loads) == pytest.approx(1.0, abs=1e-6)
    assert summary["min_expert_load"] == min(loads)


@pytest.mark.parametrize(
    ("override", "words"),
    [
        (
            "model.stages=[{kind: moe, experts: 2, k: 3}]",
            "model.stages.0.k = 3: must be <= experts",
        ),
        ("model.stages=[{kind: sparse, ensembles: 4, m: 4}]", "model.stages.0.m = 4"),
        ("model.stages=[{kind: moe, router: magic}]", "model.stages.0.router = 'magic'"),
        ("model.stages=[{kind: moe, capacity_factor: 0}]", "model.stages.0.capacity_factor = 0"),
        ("model.stages=[{kind: sparse, wiring: hypergraph}]", "model.stages.0.hypergraph: missing"),
    ],
)
def test_bad_stage_configs_name_the_field(override, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(".", r"\.")):
        load_config(None, [override])


def test_a_width_that_clashes_with_the_previous_stage_names_the_stage():
    cfg = load_config(
        None, ["model.stages=[{kind: dense, width: 16}, {kind: moe, width: 32, residual: true}]"]
    )
    with pytest.raises(ConfigError, match=r"model\.stages\.1 \(input width 16\): residual needs"):
        build_network(cfg.model, in_shape=12, n_classes=3)


def test_residual_moe_stage_adds_its_input_before_the_norm():
    cfg = load_config(None, ["model.stages=[{kind: moe, width: 12, residual: true, norm: none}]"])
    stage = build_network(cfg.model, in_shape=12, n_classes=3).stages[0].eval()
    x = torch.randn(5, 12)
    assert torch.allclose(stage(x), x + stage.moe(x))


def test_shared_expert_sees_every_input_and_counts_as_active():
    stages = "model.stages=[{kind: moe, width: 12, experts: 4, k: 1, expert_hidden: 8, "
    cfg = load_config(None, [stages + "shared_hidden: 6, norm: none}]"])
    net = build_network(cfg.model, in_shape=12, n_classes=3).eval()
    stage = net.stages[0]
    x = torch.randn(5, 12)
    assert torch.allclose(stage(x), stage.moe(x) + stage.shared(x))
    plain = build_network(load_config(None, [stages + "norm: none}]"]).model, 12, 3)
    shared_params = (12 * 6 + 6) + (6 * 12 + 12)
    assert net.num_active_parameters() == plain.num_active_parameters() + shared_params


def test_the_loop_anneals_dense_to_sparse_routers(tmp_path):
    from neuroplex.train.runs import load_run

    stages = "model.stages=[{kind: moe, width: 16, experts: 4, k: 1, router: dts_temperature}]"
    cfg = load_config(None, ["data.name=digits", stages, "train.epochs=2"])
    train(cfg, tmp_path / "run")
    s, _ = load_run(tmp_path / "run", "last")
    router = s.model.stages[0].moe.router
    assert float(router.progress) == pytest.approx(1.0)  # the last step saw the end of training
    assert router.schedule()[1] == 1  # exactly top-k at the end


def test_moe_stage_with_sparse_experts_trains(tmp_path):
    sparse = MIXED.replace("expert_hidden: 16}", "expert_hidden: 16, expert_wiring: {m: 1}}")
    cfg = load_config(None, ["data.name=digits", sparse, "train.epochs=2", "train.lr=0.01"])
    torch.manual_seed(0)
    moe = build_network(cfg.model, in_shape=64, n_classes=10).stages[1].moe
    assert moe.expert_density == pytest.approx(0.5)  # 4 ensembles, own + 1 other
    net = build_network(cfg.model, in_shape=64, n_classes=10)
    weights = 4 * 2 * 32 * 16  # w1 and w2 of 4 experts, half of them masked out
    stored = sum(p.numel() for p in net.parameters())
    assert net.num_parameters() == stored - weights // 2  # masked-out weights are not parameters
    experts = weights // 2 + 4 * (16 + 32)  # existing expert weights and biases
    assert net.num_active_parameters() == net.num_parameters() - experts // 2  # k=2 of 4
    assert train(cfg, tmp_path / "run")["test_acc"] > 0.5


def test_active_parameters_count_k_of_e_experts():
    cfg = load_config(None, [MIXED])
    net = build_network(cfg.model, in_shape=12, n_classes=3)
    experts = 2 * (4 * 32 * 16) + 4 * 16 + 4 * 32  # w1, w2, b1, b2 of 4 experts 32 -> 16 -> 32
    assert net.num_active_parameters() == net.num_parameters() - experts // 2  # k=2 of 4
    dense = build_network(load_config(None, []).model, in_shape=12, n_classes=3)
    assert dense.num_active_parameters() == dense.num_parameters()
