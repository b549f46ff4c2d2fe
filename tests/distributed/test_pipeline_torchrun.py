"""The pipeline launched by torchrun: two "nodes" on localhost (two torchrun launches with
``--nnodes 2 --node-rank 0/1`` and a localhost rendezvous) train the sequential run's parameters; a
worker killed on either node ends the run with one error line naming its rank and ``--resume``
continues exactly; 2 stage groups x 2 data-parallel replicas (4 processes) follow the sequential
run."""

import json
import os
import socket
import subprocess
import sys

import pytest

from neuroplex.config import to_yaml
from neuroplex.distributed.balance import PLAN
from neuroplex.distributed.pipeline import EXIT_AT

NO_DROPOUT = "[{kind: dense, width: 24}, {kind: dense, width: 16}, {kind: dense, width: 16}]"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nodes: int, per_node: int, args: list[str], env: dict[str, str] | None = None):
    """``nodes`` torchrun launches at once (node ranks 0..nodes-1, one localhost rendezvous),
    each starting ``per_node`` workers of ``neuroplex train ARGS``; their (returncode, stderr)."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                *(sys.executable, "-m", "torch.distributed.run"),
                *("--nnodes", str(nodes), "--nproc-per-node", str(per_node)),
                *("--node-rank", str(node), "--master-addr", "127.0.0.1"),
                *("--master-port", str(port), "-m", "neuroplex", "train", *args),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "CI": "1", "NEUROPLEX_DIST_TIMEOUT": "60", **(env or {})},
        )
        for node in range(nodes)
    ]
    return [(p.wait(timeout=300), p.stderr.read()) for p in procs]


def config_file(cfg, tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(to_yaml(cfg))
    return str(path)


def test_two_nodes_give_the_sequential_parameters(tiny, sequential, same_run, tmp_path):
    config = config_file(tiny("train.parallel=2"), tmp_path)
    runs = torchrun(2, 1, [config, "--run-dir", str(tmp_path / "run")])
    assert [code for code, _ in runs] == [0, 0], runs[0][1][-2000:] + runs[1][1][-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["ranks"] == 2
    same_run(tmp_path / "run", sequential)


@pytest.mark.parametrize("lost", [0, 1])
def test_a_worker_killed_on_either_node_is_one_error_line_and_resume_is_exact(
    tiny, sequential, same_run, tmp_path, lost
):
    config = config_file(tiny("train.parallel=2"), tmp_path)
    run_dir = tmp_path / "run"
    runs = torchrun(2, 1, [config, "--run-dir", str(run_dir)], {EXIT_AT: f"{lost}:14"})
    assert all(code != 0 for code, _ in runs)
    # the survivor's one line (torchrun's agents add their own failure report around it)
    survivor = runs[1 - lost][1]
    errors = [line for line in survivor.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, survivor[-3000:]
    assert f"lost pipeline rank {lost}" in errors[0] and f"--resume {run_dir}" in errors[0]
    assert not any(line.startswith("error: ") for line in runs[lost][1].splitlines())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and f"lost pipeline rank {lost}" in summary["error"]
    assert summary["epochs"] == 1 and "epoch-0001" in summary["error"]
    resumed = torchrun(2, 1, ["--resume", str(run_dir)])
    assert [code for code, _ in resumed] == [0, 0], resumed[0][1][-2000:]
    same_run(run_dir, sequential)


def test_two_stage_groups_times_two_replicas_follow_the_sequential_run(
    tiny, sequential_run, same_run, tmp_path
):
    cfg = tiny("train.parallel=2", f"model.stages={NO_DROPOUT}")
    runs = torchrun(1, 4, [config_file(cfg, tmp_path), "--run-dir", str(tmp_path / "run")])
    assert runs[0][0] == 0, runs[0][1][-3000:]
    plan = json.loads((tmp_path / "run" / PLAN).read_text())
    assert plan["replicas"] == 2 and len(plan["groups"]) == 2
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["ranks"] == 4
    reference = sequential_run(tiny(f"model.stages={NO_DROPOUT}"), tmp_path / "sequential")
    # each replica trains on half of every batch of 32 and DDP averages the two gradients: the
    # full batch's gradient up to float rounding
    same_run(tmp_path / "run", reference, rtol=1e-4, atol=1e-5)
