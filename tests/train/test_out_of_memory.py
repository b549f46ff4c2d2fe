"""Running out of memory during training ends with one line naming the likely field, exit 2."""

from __future__ import annotations

import json

import pytest
import torch

from neuroplex.cli import run as cli
from neuroplex.methods.backprop import Backprop
from neuroplex.train import train

ARGS = [
    "--set",
    "data.name=digits",
    "--set",
    "model.stages=[{kind: dense, width: 16}]",
    "--set",
    "train.epochs=2",
    "--set",
    "train.batch_size=64",
    "--set",
    "threads=1",
]


def fail_at_step(monkeypatch, step: int, error: BaseException) -> None:
    """Make the ``step``-th optimizer step (1-based) raise ``error``."""
    real, calls = Backprop.step, []

    def step_or_fail(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            raise error
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Backprop, "step", step_or_fail)


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough "
            "memory: you tried to allocate 800000000000 bytes."
        ),
        MemoryError(),
    ],
    ids=["cuda", "cpu allocator", "MemoryError"],
)
def test_out_of_memory_at_a_step_is_one_line_and_exit_2(error, monkeypatch, tmp_path, capsys):
    fail_at_step(monkeypatch, 25, error)  # in epoch 2 (21 steps per epoch)
    capsys.readouterr()
    assert cli(["train", *ARGS, "--run-dir", str(tmp_path / "run")]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if not line.startswith("epoch ")]
    assert len(lines) == 1, captured.err  # beside the progress lines of the epochs done
    assert "Traceback" not in captured.err
    assert lines[0].startswith(
        "error: config error: train.batch_size = 64: out of memory at step 25"
    )
    assert "epoch-0001" in lines[0]  # what is kept to resume from
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "out_of_memory" and summary["epochs"] == 1


def test_other_runtime_errors_are_not_taken_for_out_of_memory(monkeypatch, tmp_path, tiny_config):
    fail_at_step(monkeypatch, 2, RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        train(tiny_config, tmp_path / "run")
