"""``neuroplex bench pipeline``: throughput of pipelined local learning (``train.parallel: N``)
against the sequential local run given the same cores.

Three runs of one MNIST-1D config (dense stages of one width, local learning), one after another,
each in its own process:

- sequential with torch threads = N (the N cores used by intra-op threads);
- sequential with torch threads = 1;
- the pipeline, ``train.parallel = N``, one thread per process.

Throughput is the median over epochs (the first left out: warm-up) of the training samples/s the
loop logs, evaluation excluded. Reported: the pipeline's speedup over the sequential run with N
threads, and its scaling efficiency against N x the one-thread sequential throughput; beside
them, how the stages were split and the speedup over one thread a perfectly overlapped pipeline
would reach with that split (total cost / largest group's cost).
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from neuroplex.bench import write
from neuroplex.bench.local import base_overrides, machine, run_one
from neuroplex.config import load_config
from neuroplex.distributed.pipeline import split_stages, stage_costs
from neuroplex.files import read_jsonl
from neuroplex.train.setup import build_setup

Runner = Callable[[list[str], Path], Any]
Planner = Callable[[list[str]], dict[str, Any]]


def runs(n: int) -> dict[str, list[str]]:
    """The three runs compared, by name: their overrides on top of the shared config."""
    return {
        f"sequential, {n} threads": [f"threads={n}"],
        "sequential, 1 thread": ["threads=1"],
        f"pipeline, {n} processes x 1 thread": [f"train.parallel={n}", "threads=1"],
    }


def stage_plan(overrides: list[str]) -> dict[str, Any]:
    """The pipeline run's stage groups (first and last stage), each group's share of the cost,
    and the ideal speedup over one thread (1 / the largest share)."""
    cfg = load_config(None, overrides)
    costs = stage_costs(build_setup(cfg).method)
    groups = split_stages(costs, cfg.train.parallel)
    shares = [sum(costs[i] for i in group) / sum(costs) for group in groups]
    return {
        "groups": [[group.start, group.stop - 1] for group in groups],
        "cost_share": shares,
        "ideal_speedup_vs_1_thread": 1 / max(shares),
    }


def throughput(run_dir: Path) -> float:
    """Median training samples/s over the epochs of ``run_dir``, the first one left out."""
    rates = [row["samples_per_s"] for row in read_jsonl(run_dir / "metrics.jsonl")]
    return statistics.median(rates[1:] or rates)


def run(
    stages: int,
    width: int,
    batch: int,
    steps: int,
    n: int,
    out: Path,
    runner: Runner = run_one,
    planner: Planner = stage_plan,
) -> dict[str, Any]:
    """Train the three runs one after another; write the JSON and a markdown table beside it."""
    shared = [
        *base_overrides(stages, width, steps),
        f"train.batch_size={batch}",
        "train.method=local",
    ]
    result: dict[str, Any] = {
        "machine": machine(),
        "stages": stages,
        "width": width,
        "batch": batch,
        "steps": steps,
        "processes": n,
        "samples_per_s": {},
        "plan": planner([*shared, *list(runs(n).values())[-1]]),
    }
    with tempfile.TemporaryDirectory(prefix="neuroplex-bench-") as tmp:
        for i, (name, extra) in enumerate(runs(n).items()):
            run_dir = Path(tmp) / f"run-{i}"
            runner([*shared, *extra], run_dir)
            result["samples_per_s"][name] = throughput(run_dir)
            print(f"{name}: {result['samples_per_s'][name]:,.0f} samples/s")
    sequential_n, sequential_1, pipeline = (result["samples_per_s"][k] for k in runs(n))
    result["speedup"] = pipeline / sequential_n
    result["scaling_efficiency"] = pipeline / (n * sequential_1)
    write(result, out, table)
    return result


def table(result: dict[str, Any]) -> str:
    n = result["processes"]
    rates = result["samples_per_s"]
    reference = rates[f"sequential, {n} threads"]
    plan = result["plan"]
    groups = " | ".join(f"{a}–{b}" if a != b else f"{a}" for a, b in plan["groups"])
    shares = " | ".join(f"{100 * share:.0f}%" for share in plan["cost_share"])
    lines = [
        f"MNIST-1D, local learning, {result['stages']} dense stages of width {result['width']}, "
        f"batch {result['batch']}, {result['steps']} steps ({result['machine']}).",
        "",
        f"| run | samples/s | vs sequential, {n} threads |",
        "|---|---|---|",
        *(f"| {name} | {rate:,.0f} | {rate / reference:.2f}× |" for name, rate in rates.items()),
        "",
        f"Pipeline speedup over the sequential run with {n} threads: {result['speedup']:.2f}×; "
        f"scaling efficiency against {n} × the one-thread sequential throughput: "
        f"{100 * result['scaling_efficiency']:.0f}%.",
        "",
        f"Stage groups {groups} ({shares} of the parameter cost): a perfectly overlapped pipeline "
        f"would reach {plan['ideal_speedup_vs_1_thread']:.2f}× one thread.",
    ]
    return "\n".join(lines) + "\n"
