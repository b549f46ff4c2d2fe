"""``neuroplex bench pipeline``: throughput of pipelined local learning (``train.parallel: N``)
against the sequential local run given the same cores, for each N asked.

Runs of one config, one after another, each in its own process(es): by default MNIST-1D with
dense stages of the given widths, local learning, linear aux nets; with ``--config`` a user's
config (its data, stages and aux nets; local learning), e.g. a CNN whose stages' costs follow
their feature maps' size rather than their parameter counts. The runs compared:

- sequential with torch threads = 1 (the baseline of every ratio);
- for each N > 1: sequential with torch threads = N (the N cores used by intra-op threads), and
  the pipeline, ``train.parallel = N`` with one thread per process, once per stage-split rule
  asked (``--balance time params``).

``--rounds R`` repeats the whole list R times, round-robin, and reports each run's median over
the rounds (runs one after another on this machine varied by up to 20%). Throughput is the
median over epochs (the first left out: warm-up) of the training samples/s the
loop logs, evaluation excluded. Reported per pipeline run: the speedup over the sequential run
with N threads and over one thread, the scaling efficiency (against N x the one-thread
throughput), the stage groups and each one's share of the measured cost (from the run's
``pipeline.json``: its stages' training and its transfers), the transfer measured at each cut,
the ceiling that split allows (the sequential cost / the largest group's: the speedup over one
thread of a perfectly overlapped pipeline) and the share of it reached. With both rules,
the time-balanced split's throughput over the parameter-count split's.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from neuroplex.bench import machine, write
from neuroplex.bench.local import run_one
from neuroplex.distributed.balance import PLAN
from neuroplex.files import read_jsonl

Runner = Callable[[list[str], Path, str | Path | None], Any]  # (overrides, run dir, config file)
GOAL_SPEEDUP, GOAL_CEILING, GOAL_BALANCE = 1.35, 0.90, 1.2  # issue 17's goals, printed beside


def shared_overrides(widths: list[int], batch: int, steps: int) -> list[str]:
    stages = ", ".join(f"{{kind: dense, width: {w}, dropout: 0.1}}" for w in widths)
    return [
        # 40,000 samples: epochs of 125 steps (Fashion-MNIST has 234), so the pipeline's fill
        # and drain at each epoch's end weigh as in a real run, not as in 14-step epochs
        "data.name=mnist1d",
        "data.num_samples=40000",
        f"model.stages=[{stages}]",
        f"train.steps={steps}",
        f"train.batch_size={batch}",
        "train.lr=3e-3",
        "train.method=local",
        "train.aux.kind=linear",
    ]


def config_overrides(batch: int, steps: int) -> list[str]:
    """The shared overrides on a user's config: its network and data stay as they are."""
    return [f"train.steps={steps}", f"train.batch_size={batch}", "train.method=local"]


def runs(processes: list[int], balances: list[str]) -> dict[str, list[str]]:
    """The runs compared, by name: their overrides on top of the shared config."""
    named = {"sequential, 1 thread": ["threads=1"]}
    for n in sorted(set(processes) - {1}):
        named[f"sequential, {n} threads"] = [f"threads={n}"]
        for rule in balances:
            named[pipeline_name(n, rule)] = [
                f"train.parallel={n}",
                "threads=1",
                f"train.pipeline.balance={rule}",
            ]
    return named


def pipeline_name(n: int, rule: str) -> str:
    return f"pipeline, {n} processes x 1 thread, {rule} split"


def throughput(run_dir: Path) -> float:
    """Median training samples/s over the epochs of ``run_dir``, the first one left out."""
    rates = [row["samples_per_s"] for row in read_jsonl(run_dir / "metrics.jsonl")]
    return statistics.median(rates[1:] or rates)


def run(
    widths: list[int],
    batch: int,
    steps: int,
    processes: list[int],
    balances: list[str],
    out: Path,
    runner: Runner = run_one,
    rounds: int = 1,
    config: str | Path | None = None,
) -> dict[str, Any]:
    """Train the runs one after another, ``rounds`` times over (round-robin, so a slow spell of
    the machine is shared out; each run's figure is its median over the rounds, its split the
    first round's); write the JSON and a markdown table beside it. ``config``: a config file
    whose network is benchmarked instead of the dense ``widths`` (which are then ignored)."""
    shared = config_overrides(batch, steps) if config else shared_overrides(widths, batch, steps)
    result: dict[str, Any] = {
        "machine": machine(),
        "config": None if config is None else str(config),
        "widths": None if config else widths,
        "batch": batch,
        "steps": steps,
        "rounds": rounds,
        "processes": sorted(set(processes)),
        "balances": balances,
        "samples_per_s": {},
        "samples_per_s_by_round": {},
        "plans": {},
        "groups_by_round": {},  # each round's split: measured again in every run
    }
    by_round: dict[str, list[float]] = result["samples_per_s_by_round"]
    with tempfile.TemporaryDirectory(prefix="neuroplex-bench-") as tmp:
        for r in range(rounds):
            for i, (name, extra) in enumerate(runs(processes, balances).items()):
                run_dir = Path(tmp) / f"round-{r}-run-{i}"
                runner([*shared, *extra], run_dir, config)
                by_round.setdefault(name, []).append(throughput(run_dir))
                if (run_dir / PLAN).is_file():
                    plan = json.loads((run_dir / PLAN).read_text(encoding="utf-8"))
                    result["plans"].setdefault(name, plan)
                    result["groups_by_round"].setdefault(name, []).append(plan["groups"])
                print(f"round {r + 1}/{rounds}, {name}: {by_round[name][-1]:,.0f} samples/s")
    result["samples_per_s"] = {name: statistics.median(v) for name, v in by_round.items()}
    result["pipelines"] = pipeline_figures(result)
    write(result, out, table)
    return result


def pipeline_figures(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per pipeline run: speedups, scaling efficiency, ceiling and the share of it reached."""
    rates = result["samples_per_s"]
    one = rates["sequential, 1 thread"]
    figures = {}
    for n in result["processes"]:
        for rule in result["balances"] if n > 1 else []:
            name = pipeline_name(n, rule)
            rate, ceiling = rates[name], result["plans"][name]["ceiling"]
            figures[name] = {
                "processes": n,
                "vs_sequential_n_threads": rate / rates[f"sequential, {n} threads"],
                "vs_1_thread": rate / one,
                "scaling_efficiency": rate / (n * one),
                "ceiling": ceiling,
                "of_ceiling": rate / one / ceiling,
            }
    return figures


def table(result: dict[str, Any]) -> str:
    rates, one = result["samples_per_s"], result["samples_per_s"]["sequential, 1 thread"]
    if result.get("config"):
        network = f"`{result['config']}` (its data, stages and aux nets), local learning"
    else:
        widths = ", ".join(str(w) for w in result["widths"])
        network = f"MNIST-1D, local learning (linear aux nets), dense stages of widths {widths}"
    lines = [
        f"{network}, batch {result['batch']}, {result['steps']} steps, median of "
        f"{result.get('rounds', 1)} round(s) ({result['machine']}).",
        "",
        "| run | samples/s | vs sequential, 1 thread |",
        "|---|---|---|",
        *(f"| {name} | {rate:,.0f} | {rate / one:.2f}× |" for name, rate in rates.items()),
        "",
        "| pipeline | vs sequential, N threads | scaling efficiency | stage groups (share of "
        "the measured cost) | transfer at each cut (ms, send / receive) | ceiling | "
        "of the ceiling |",
        "|---|---|---|---|---|---|---|",
        *(pipeline_row(name, f, result["plans"][name]) for name, f in result["pipelines"].items()),
        *goal_lines(result),
    ]
    return "\n".join(lines) + "\n"


def pipeline_row(name: str, figures: dict[str, float], plan: dict[str, Any]) -> str:
    groups = " / ".join(f"{a}–{b}" if a != b else f"{a}" for a, b in plan["groups"])
    shares = " / ".join(f"{100 * share:.0f}%" for share in plan["shares"])
    transfers = plan.get("transfer_seconds") or []  # [send, receive] per boundary
    cuts = [transfers[b] for _, b in plan["groups"][:-1]] if transfers else []
    cut_ms = ", ".join(f"{1e3 * send:.2f} / {1e3 * receive:.2f}" for send, receive in cuts) or "—"
    return (
        f"| {name.removeprefix('pipeline, ')} | {figures['vs_sequential_n_threads']:.2f}× | "
        f"{100 * figures['scaling_efficiency']:.0f}% | {groups} ({shares}) | {cut_ms} | "
        f"{figures['ceiling']:.2f}× | {100 * figures['of_ceiling']:.0f}% |"
    )


def goal_lines(result: dict[str, Any]) -> list[str]:
    """Where the runs allow it: the two processes vs two threads goal, and time vs params."""
    figures, rates = result["pipelines"], result["samples_per_s"]
    lines = [""]
    two = figures.get(pipeline_name(2, "time"))
    if two is not None:
        lines.append(
            f"2 processes x 1 thread (time split) vs sequential with 2 threads: "
            f"{two['vs_sequential_n_threads']:.2f}× (goal ≥ {GOAL_SPEEDUP}×), "
            f"{100 * two['of_ceiling']:.0f}% of the {two['ceiling']:.2f}× ceiling its split "
            f"allows (goal ≥ {100 * GOAL_CEILING:.0f}%)."
        )
    for n in result["processes"]:
        time_name, params_name = pipeline_name(n, "time"), pipeline_name(n, "params")
        if time_name in rates and params_name in rates:
            ratio = rates[time_name] / rates[params_name]
            lines.append(
                f"{n} processes: the time-balanced split trains {ratio:.2f}× as fast as the "
                f"parameter-count split (goal ≥ {GOAL_BALANCE}×)."
            )
    return lines if len(lines) > 1 else []
