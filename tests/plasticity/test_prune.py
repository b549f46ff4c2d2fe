import json
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook
from typer.testing import CliRunner

from neuroplex.cli import app
from neuroplex.config import load_config
from neuroplex.errors import CheckpointError, ConfigError
from neuroplex.files import read_jsonl
from neuroplex.layers.sparse import SparseLinear
from neuroplex.plasticity.prune import apply_ticket, prunable_layers, prune_masks, prune_run
from neuroplex.train import loop
from neuroplex.train.checkpoint import load_checkpoint, load_module_state
from neuroplex.train.rundir import rewind_path
from neuroplex.train.setup import build_setup

STAGES = (
    "model.stages=[{kind: dense, width: 32, dropout: 0.1}, "
    "{kind: sparse, width: 16, ensembles: 4, m: 1}]"
)


def config(*extra: str):
    """A dense and a sparse stage on digits, 2 epochs, weights kept after epoch 1."""
    base = ["name=tiny", "data.name=digits", STAGES, "train.epochs=2", "train.batch_size=64"]
    return load_config(None, [*base, "train.lr=0.01", "train.save_epochs=[0, 1]", *extra])


@pytest.fixture
def run(tmp_path):
    loop.train(config(), tmp_path / "run")
    return tmp_path / "run"


def test_save_epochs_keeps_the_weights_after_those_epochs(run):
    for epoch in (0, 1):
        assert rewind_path(run, epoch).is_file()
    assert not rewind_path(run, 2).exists()
    model = build_setup(config()).model
    init = load_file(str(rewind_path(run, 0)))
    for key, value in model.state_dict().items():  # epoch 0 = the initial weights
        assert torch.equal(init[key], value), key


def test_prune_masks_keep_the_largest_magnitudes():
    weight = torch.tensor([[0.1, -0.9, 0.5], [0.3, 0.0, -0.7]])
    mask = torch.tensor([[True, True, True], [True, False, True]])
    kept = prune_masks({"a": weight}, {"a": mask}, {"a": 2})["a"]
    assert kept.tolist() == [[False, True, False], [False, False, True]]


def test_rewind_restores_the_saved_weights_on_surviving_connections(run):
    model = build_setup(config()).model
    rewind = load_file(str(rewind_path(run, 1)))
    reference = build_setup(config()).model
    load_module_state(reference, rewind, "")
    gen = torch.Generator().manual_seed(0)
    masks = {
        name: torch.rand(m.out_features, m.in_features, generator=gen) < 0.5
        for name, m in prunable_layers(model).items()
    }
    apply_ticket(model, masks, rewind)
    ref_layers = prunable_layers(reference)
    for name, layer in prunable_layers(model).items():
        assert isinstance(layer, SparseLinear) and layer.path == "masked-dense"
        ref = ref_layers[name]
        want = ref.dense_weight() if isinstance(ref, SparseLinear) else ref.weight
        original = torch.as_tensor(ref.wiring.to_mask()) if isinstance(ref, SparseLinear) else 1
        assert torch.equal(layer.dense_weight().detach(), (want * masks[name] * original).detach())
        assert torch.equal(layer.bias, ref.bias)
    assert torch.equal(model.head.weight, reference.head.weight)
    assert torch.equal(model.stages[0][0].norm.weight, reference.stages[0][0].norm.weight)


def test_sparsity_after_r_rounds_is_one_minus_point_eight_to_the_r(run):
    rows = prune_run(run, rounds=3, rate=0.2, rewind_epoch=1)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    dense, sparse = "stages.0.0.linear", "stages.1.0.linear"
    n_dense, n_sparse = 64 * 32, 32 * 16 // 2  # the sparse stage starts at density 0.5
    for row in rows:
        alive = 0.8 ** row["round"]
        assert abs((1 - row["layer_sparsity"][dense]) * 64 * 32 - n_dense * alive) <= 1
        assert abs((1 - row["layer_sparsity"][sparse]) * 32 * 16 - n_sparse * alive) <= 1
    last = load_checkpoint(run / "prune" / "round_3", "last").tensors
    mask = last[f"model.{dense}.mask"].bool()
    assert abs(int(mask.sum()) - n_dense * 0.8**3) <= 1
    assert (last[f"model.{dense}.weight"][~mask] == 0).all()  # pruned weights stay zero
    table = json.loads((run / "prune" / "prune.json").read_text())
    assert table["rows"] == json.loads(json.dumps(rows)) and table["rewind_epoch"] == 1
    assert (run / "prune" / "prune.md").read_text().count("\n") == 2 + 4


def test_prune_refuses_a_missing_rewind_epoch_and_a_second_prune(run):
    with pytest.raises(CheckpointError, match=r"train.save_epochs: \[5\]"):
        prune_run(run, rounds=1, rate=0.2, rewind_epoch=5)
    prune_run(run, rounds=1, rate=0.5, rewind_epoch=0)
    with pytest.raises(ConfigError, match="remove it to prune again"):
        prune_run(run, rounds=1, rate=0.2, rewind_epoch=0)


def test_prune_cli_prints_the_table_and_errors_in_one_line(run):
    runner = CliRunner()
    result = runner.invoke(app, ["prune", str(run), "--rounds", "1", "--rewind-epoch", "1"])
    assert result.exit_code == 0, result.output
    rows = json.loads((run / "prune" / "prune.json").read_text())["rows"]
    assert "lottery tickets" in result.stdout and len(rows) == 2
    for row in rows:  # round 1 prunes 20% of each layer's weights
        assert f"{100 * row['sparsity']:.1f}%" in result.stdout
    assert (run / "prune" / "round_1" / "summary.json").is_file()
    bad = runner.invoke(app, ["prune", str(run / "nope"), "--rounds", "1"])
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1 and "no config.yaml" in bad.stderr


@contextmanager
def recorded_lrs():
    """Every optimizer step's learning rate (``param_groups[0]``), from a global hook."""
    lrs: list[float] = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"])
    )
    try:
        yield lrs
    finally:
        handle.remove()


@pytest.mark.parametrize("rewind_epoch", [0, 2])
def test_a_late_rewound_ticket_trains_the_tail_of_the_schedule(rewind_epoch, tmp_path):
    cfg = config("train.epochs=4", "train.warmup_steps=30", "train.save_epochs=[0, 2]")
    with recorded_lrs() as original:
        loop.train(cfg, tmp_path / "run")
    steps_per_epoch = len(original) // 4
    assert len(set(original)) > 40 and original[0] < original[30]  # warmup, then cosine
    with recorded_lrs() as rewound:
        prune_run(tmp_path / "run", rounds=1, rate=0.2, rewind_epoch=rewind_epoch)
    assert rewound == original[rewind_epoch * steps_per_epoch :]
    metrics = read_jsonl(tmp_path / "run" / "prune" / "round_1" / "metrics.jsonl")
    assert [r["epoch"] for r in metrics] == list(range(rewind_epoch + 1, 5))
    assert metrics[-1]["step"] == len(original)
