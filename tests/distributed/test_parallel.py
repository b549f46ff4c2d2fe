"""Data parallel: two torchrun processes on CPU (gloo) follow the single-process loss curve."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neuroplex.distributed.parallel import World
from neuroplex.files import read_jsonl

TINY = """
name: tiny
data: {name: digits}
model:
  stages:
    - {kind: dense, width: 32}
    - {kind: dense, width: 16}
train: {epochs: 3, batch_size: 64, lr: 0.01, method: METHOD, aux: {kind: linear}}
"""


def test_shards_are_equal_sized_disjoint_and_cover_a_trimmed_batch():
    idx = torch.arange(13)
    shards = [World(rank=r, size=2).shard(idx) for r in range(2)]
    assert [len(s) for s in shards] == [6, 6]
    assert sorted(torch.cat(shards).tolist()) == list(range(12))
    assert torch.equal(World().shard(idx), idx)


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("method", ["backprop", "local"])
def test_two_ranks_match_one_process_with_the_same_global_batch(tmp_path, method):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY.replace("METHOD", method))
    neuroplex = [sys.executable, "-m", "neuroplex", "train", str(config)]
    run([*neuroplex, "--run-dir", str(tmp_path / "one")], tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    two = run(
        [*torchrun, "-m", "neuroplex", "train", str(config), "--run-dir", str(tmp_path / "two")],
        tmp_path,
    )
    assert two.stdout.count("summary:") == 1  # only rank 0 reports
    one_rows = read_jsonl(tmp_path / "one" / "metrics.jsonl")
    two_rows = read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert len(one_rows) == len(two_rows) == 3
    for a, b in zip(one_rows, two_rows, strict=True):
        # The global batch is the same; only the last batch of each epoch loses one sample
        # (trimmed to a multiple of the 2 ranks), so the curves agree closely, not exactly.
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=2e-2)
        assert b["test_acc"] == pytest.approx(a["test_acc"], abs=0.02)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["status"] == "completed"
