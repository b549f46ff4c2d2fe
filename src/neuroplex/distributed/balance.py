"""How the pipeline's stages are split into groups (``train.pipeline.balance``).

Before the first step, each stage with its aux net (the head for the last stage) trains a few
batches on a copy of itself. ``time`` (default): the stages are split into contiguous groups that
minimise the slowest group's measured time (a small dynamic program, :func:`split_stages`).
``params``: the same split with the trainable parameter count as the cost (the rule before
measuring, kept as a fallback and for comparison).

The split is written to ``RUN_DIR/pipeline.json`` with the measured shares, and a resumed run
reads it back: it is part of the run's state. (The parameters do not depend on the split — each
stage draws from its own random stream — but the run's record of how it ran does.)

Shape legend: ``b`` batch.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass
from functools import cache
from itertools import accumulate
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neuroplex.errors import NeuroplexError
from neuroplex.files import atomic_write_json, read_json
from neuroplex.methods.local import Local
from neuroplex.train.optim import build_optimizer
from neuroplex.train.setup import Setup

PLAN = "pipeline.json"


@dataclass(frozen=True)
class Plan:
    """The stage groups of a pipeline run and what they were chosen from."""

    groups: list[list[int]]  # [first, last] stage of each group
    balance: str  # what the split balanced: "time" or "params"
    stage_seconds: list[float]  # per stage: measured seconds per training step (either rule)
    stage_params: list[int]  # per stage: trainable parameters
    replicas: int  # data-parallel replicas of each group

    @property
    def ranges(self) -> list[range]:
        return [range(a, b + 1) for a, b in self.groups]

    @property
    def shares(self) -> list[float]:
        """Each group's share of the measured time."""
        total = sum(self.stage_seconds) or 1.0
        return [sum(self.stage_seconds[i] for i in r) / total for r in self.ranges]

    @property
    def ceiling(self) -> float:
        """Speedup over one process a perfectly overlapped pipeline reaches with this split
        (total cost / the largest group's cost)."""
        return 1.0 / max(self.shares)

    def record(self) -> dict[str, Any]:
        return {**asdict(self), "shares": self.shares, "ceiling": self.ceiling}


def stage_params(local: Local) -> list[int]:
    """Trainable parameters of each stage with its aux net (the head for the last stage)."""
    return [
        sum(p.numel() for p in trainee.parameters() if p.requires_grad)
        for trainee in local.trainees
    ]


def stage_seconds(s: Setup, batches: int) -> list[float]:
    """Median seconds of one training step (forward, backward, optimizer step) of each stage
    with its aux net, on copies: the run's parameters, optimizer state and random streams are
    left as they were.

    After a warm-up round (which also makes each stage's input, the previous copy's output), the
    stages are timed in ``batches`` interleaved rounds, one step of every stage per round, so a
    slow spell of the machine falls on all of them alike rather than on whichever stage was being
    timed (timed one stage after another, two identical stages measured 5.3 and 8.7 ms). The
    clock is the process's CPU time on the CPU (what a worker spends; another process on the
    core does not count) and synchronized wall time on CUDA."""
    local: Local = s.method  # type: ignore[assignment]
    b = min(s.cfg.train.batch_size, len(s.data.train))
    h, y = s.data.train_batch(torch.arange(b, device=s.device), (s.cfg.seed, 0, 0))
    cuda = s.device.type == "cuda"
    clock = time.perf_counter if cuda else time.process_time
    with torch.random.fork_rng(devices=[s.device] if cuda else []):
        twins = [copy.deepcopy(trainee).train() for trainee in local.trainees]
        optimizers = [build_optimizer([twin], s.cfg.train) for twin in twins]
        inputs = []
        for twin, opt in zip(twins, optimizers, strict=True):  # the warm-up round
            inputs.append(h)
            h = train_step(twin, opt, h, y)
        times: list[list[float]] = [[] for _ in twins]
        for _ in range(batches):
            for i, (twin, opt) in enumerate(zip(twins, optimizers, strict=True)):
                t0 = clock()
                train_step(twin, opt, inputs[i], y)
                if cuda:
                    torch.cuda.synchronize(s.device)
                times[i].append(clock() - t0)
    return [statistics.median(t) for t in times]


def train_step(trainee: nn.Module, opt: torch.optim.Optimizer, h: Tensor, y: Tensor) -> Tensor:
    """One training step of a stage with its aux net on ``h [b, *in]``, ``y [b]``; its output
    ``[b, *out]``, detached."""
    out, logits = trainee(h)
    opt.zero_grad(set_to_none=True)
    (F.cross_entropy(logits, y) + out.aux_loss).backward()
    opt.step()
    return out.x.detach()


def split_stages(costs: list[float], n: int) -> list[range]:
    """``n`` contiguous, non-empty groups of stages whose largest total cost is the smallest
    possible (ties: the earliest boundaries)."""
    prefix = [0, *accumulate(costs)]

    @cache
    def best(k: int, end: int) -> tuple[float, tuple[int, ...]]:
        """Stages ``[0, end)`` in ``k`` groups: (largest group cost, first stage of each group)."""
        if k == 1:
            return prefix[end], (0,)
        options = []
        for start in range(k - 1, end):  # the last group is [start, end)
            worst, starts = best(k - 1, start)
            options.append((max(worst, prefix[end] - prefix[start]), (*starts, start)))
        return min(options)

    bounds = [*best(n, len(costs))[1], len(costs)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


def make_plan(s: Setup, groups: int, replicas: int) -> Plan:
    """Measure and count the stage costs of ``s`` and split them into ``groups`` by the rule
    ``train.pipeline.balance`` names (the time is measured either way: the shares and the
    ceiling are always of the measured time)."""
    params = stage_params(s.method)  # type: ignore[arg-type]
    pipeline = s.cfg.train.pipeline
    seconds = stage_seconds(s, pipeline.timing_batches)
    costs = seconds if pipeline.balance == "time" else [float(p) for p in params]
    ranges = split_stages(costs, groups)
    bounds = [[r.start, r.stop - 1] for r in ranges]
    return Plan(bounds, pipeline.balance, seconds, params, replicas)


def read_plan(run_dir: Path, stages: int, groups: int, replicas: int) -> Plan | None:
    """The plan a run recorded, if it has one for this many groups and replicas."""
    path = run_dir / PLAN
    if not path.is_file():
        return None
    raw = read_json(path)
    try:
        plan = Plan(
            [[int(a), int(b)] for a, b in raw["groups"]],
            str(raw["balance"]),
            [float(c) for c in raw["stage_seconds"]],
            [int(p) for p in raw["stage_params"]],
            int(raw["replicas"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise NeuroplexError(f"{path}: not a pipeline plan ({type(e).__name__}: {e})") from None
    if [i for r in plan.ranges for i in r] != list(range(stages)):
        raise NeuroplexError(f"{path}: groups {plan.groups} do not cover stages 0-{stages - 1}")
    if len(plan.groups) != groups or plan.replicas != replicas:
        return None  # launched with another layout: plan again
    return plan


def write_plan(run_dir: Path, plan: Plan) -> None:
    atomic_write_json(run_dir / PLAN, plan.record())
