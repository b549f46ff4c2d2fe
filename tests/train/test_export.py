"""load_model and neuroplex export: a trained model on raw inputs, outside the training state."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import neuroplex
from neuroplex.cli import run as cli
from neuroplex.config import load_config
from neuroplex.data.registry import load_dataset
from neuroplex.errors import NeuroplexError
from neuroplex.train import train
from neuroplex.train.export import RawInputModel

SMALL = ["data.name=digits", "train.epochs=3", "train.batch_size=64", "threads=1"]
STAGES = {
    "dense": ["model.stages=[{kind: dense, width: 32, dropout: 0.1}]"],
    "conv image": ["model.stages=[{kind: conv, channels: 4}, {kind: flatten}]", "data.shape=image"],
    "moe": ["model.stages=[{kind: moe, width: 32, experts: 4, k: 2, expert_hidden: 16}]"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """One finished run per kind of model: {kind: (config, run_dir)}."""
    root = tmp_path_factory.mktemp("runs")
    done = {}
    for kind, overrides in STAGES.items():
        cfg = load_config(None, [*SMALL, *overrides])
        train(cfg, root / kind.replace(" ", "_"))
        done[kind] = (cfg, root / kind.replace(" ", "_"))
    return done


def raw_test(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's test split as stored before any standardisation (the same split: it does not
    depend on the scaling)."""
    test = load_dataset(cfg.data.model_copy(update={"standardize": False})).test
    x = test.x.reshape(len(test), 8, 8)  # raw 8x8 digit images; the model takes any layout
    return x, test.y


def cli_eval(run_dir, checkpoint: str, capsys) -> dict:
    capsys.readouterr()
    assert cli(["eval", str(run_dir), "--checkpoint", checkpoint]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("kind", list(STAGES))
@pytest.mark.parametrize("checkpoint", ["best", "last"])
def test_load_model_reproduces_eval_accuracy_on_raw_inputs(kind, checkpoint, runs, capsys):
    cfg, run_dir = runs[kind]
    expected = cli_eval(run_dir, checkpoint, capsys)
    model = neuroplex.load_model(str(run_dir), checkpoint=checkpoint)
    assert isinstance(model, RawInputModel) and not model.training
    x, y = raw_test(cfg)
    assert x.abs().max() > 10  # raw pixel values 0..16, not standardised
    with torch.no_grad():
        logits = model(x)
    correct = int((logits.argmax(dim=1) == y).sum())
    assert correct / len(y) == expected["acc"]
    assert model.classes == [str(i) for i in range(10)]
    numpy_logits = model(x.numpy().astype(np.float64))
    assert torch.equal(numpy_logits, logits)


def test_checkpoint_by_epoch_is_the_best_one(runs):
    _, run_dir = runs["dense"]
    best = json.loads((run_dir / "summary.json").read_text())["best_epoch"]
    x = torch.rand(5, 64) * 16
    by_epoch = neuroplex.load_model(run_dir, checkpoint=best)(x)
    assert torch.equal(by_epoch, neuroplex.load_model(run_dir, checkpoint="best")(x))


@pytest.mark.parametrize("kind", list(STAGES))
def test_export_round_trip_gives_equal_outputs(kind, runs, tmp_path, capsys):
    cfg, run_dir = runs[kind]
    capsys.readouterr()
    assert cli(["export", str(run_dir), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("wrote ")
    meta = json.loads((tmp_path / "out" / "model.json").read_text())
    assert meta["preprocessing"]["kind"] == ("image" if kind == "conv image" else "vector")
    x, _ = raw_test(cfg)
    from_run = neuroplex.load_model(run_dir)(x)
    assert torch.equal(neuroplex.load_model(tmp_path / "out")(x), from_run)
    program = tmp_path / "out" / "model.pt2"
    assert meta["torch_export"]["written"]  # MoE too: its export path pads every expert
    exported = torch.export.load(str(program)).module()
    prep = meta["preprocessing"]
    layout = prep.get("image_shape", prep["input_shape"])  # raw images, or vectors
    got = exported(x.float().reshape(len(x), *layout))
    torch.testing.assert_close(got, from_run, rtol=1e-5, atol=1e-5)
    one = exported(x[:1].float().reshape(1, *layout))  # any batch size, one included
    torch.testing.assert_close(one, from_run[:1], rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_one_line_errors(runs, tmp_path, capsys):
    _, run_dir = runs["dense"]
    (tmp_path / "file").write_text("x")
    cases = [
        (lambda: neuroplex.load_model(tmp_path / "nope"), "nope: not found"),
        (lambda: neuroplex.load_model(tmp_path), "neither a run directory nor an export"),
        (lambda: neuroplex.load_model(run_dir, checkpoint="worst"), "expected 'best', 'last'"),
        (lambda: neuroplex.load_model(run_dir, checkpoint=99), "keeps no checkpoint of epoch 99"),
        (lambda: neuroplex.load_model(run_dir)(torch.zeros(2, 10)), r"input has shape \(2, 10\)"),
    ]
    for call, message in cases:
        with pytest.raises(NeuroplexError, match=message) as info:
            call()
        assert "\n" not in str(info.value)
    for argv in (
        ["export", str(tmp_path), "--out", str(tmp_path / "o")],
        ["export", str(run_dir), "--out", str(tmp_path / "file")],
        ["export", str(run_dir), "--out", str(tmp_path / "o"), "--checkpoint", "-1"],
    ):
        capsys.readouterr()
        assert cli(argv) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err


def test_an_edited_export_is_refused(runs, tmp_path):
    _, run_dir = runs["dense"]
    neuroplex.train.export.export_model(run_dir, tmp_path / "out")
    weights = tmp_path / "out" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(NeuroplexError, match="sha256 does not match"):
        neuroplex.load_model(tmp_path / "out")


def test_load_run_takes_a_str_path(runs):
    from neuroplex.train.runs import load_run

    _, run_dir = runs["dense"]
    setup, ckpt = load_run(str(run_dir))
    assert ckpt.state["loop"]["epoch"] >= 1 and setup.cfg.data.name == "digits"
