"""How the pipeline's stages are split into groups (``train.pipeline.balance``).

Before the first step, each stage with its aux net (the head for the last stage) trains a few
batches on a copy of itself, and the first two stage groups' processes send each other one batch
of every stage's output, as the pipeline will (:func:`transfer_seconds`). ``time`` (default): the
stages are split into contiguous groups that minimise the slowest group's measured time, its
stages' training plus sending its output and receiving its input (a small dynamic program,
:func:`split_stages`). ``params``: the same split with the trainable parameter count as the cost
(the rule before measuring, kept as a fallback and for comparison).

The split is written to ``RUN_DIR/pipeline.json`` with the measured shares, and a resumed run
reads it back: it is part of the run's state. (The parameters do not depend on the split — each
stage draws from its own random stream — but the run's record of how it ran does.)

Shape legend: ``b`` batch.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from neuroplex.distributed.parallel import PipelineWorld, peer_guard
from neuroplex.errors import NeuroplexError
from neuroplex.files import atomic_write_json, read_json
from neuroplex.methods.local import Local
from neuroplex.network import stage_out_shape
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
    # per boundary (after stage i, i < last): measured seconds the sender and the receiver spend
    # on one batch of stage i's output; empty in plans recorded before transfers were measured
    transfer_seconds: list[list[float]] = field(default_factory=list)

    @property
    def ranges(self) -> list[range]:
        return [range(a, b + 1) for a, b in self.groups]

    @property
    def group_seconds(self) -> list[float]:
        """Each group's measured seconds per step: its stages' training, receiving its input
        and sending its output."""
        return [
            group_cost(self.stage_seconds, self.transfer_seconds, r.start, r.stop)
            for r in self.ranges
        ]

    @property
    def shares(self) -> list[float]:
        """Each group's share of the groups' measured time."""
        seconds = self.group_seconds
        total = sum(seconds) or 1.0
        return [t / total for t in seconds]

    @property
    def ceiling(self) -> float:
        """Speedup over one process a perfectly overlapped pipeline reaches with this split
        (the sequential run's cost, no transfers, / the largest group's cost)."""
        return sum(self.stage_seconds) / (max(self.group_seconds) or 1.0)

    def record(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "group_seconds": self.group_seconds,
            "shares": self.shares,
            "ceiling": self.ceiling,
        }


def group_cost(costs: list[float], transfers: list[list[float]], start: int, stop: int) -> float:
    """Cost of the group of stages ``[start, stop)``: theirs, plus receiving the output of stage
    ``start - 1`` and sending the output of stage ``stop - 1`` (``transfers[i]``: the sender's
    and the receiver's cost of stage i's output; none given: free)."""
    cost = sum(costs[start:stop])
    if transfers and start > 0:
        cost += transfers[start - 1][1]
    if transfers and stop < len(costs):
        cost += transfers[stop - 1][0]
    return cost


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


def transfer_seconds(s: Setup, rounds: int) -> list[list[float]] | None:
    """Per boundary (after stage i, i < last): the seconds the sender and the receiver spend
    on one batch of stage i's output ``[b, *shape_out]`` (``b``: a replica's share of the
    batch), sent by rank 0 to the first rank of the next group as the pipeline sends it. Every
    rank calls it; rank 0 gets the table, the others None.

    The clock is as in :func:`stage_seconds`. Each side's figure is its cheapest of ``rounds``
    blocking transfers after a warm-up one, not the median: gloo polls while it waits, so a
    transfer that catches the peer late or a scheduler hiccup costs CPU time the pipeline's
    asynchronous sends, posted ahead, do not pay (on this machine a 1 MiB send took 0.3 ms
    most times and 3-4 ms in one of four)."""
    world: PipelineWorld = s.world  # type: ignore[assignment]
    peer = world.replicas  # group 1, replica 0
    if world.rank not in (0, peer):
        return None
    b = len(world.shard(torch.arange(min(s.cfg.train.batch_size, len(s.data.train)))))
    dtype = next(s.model.parameters()).dtype
    cuda = s.device.type == "cuda"
    clock = time.perf_counter if cuda else time.process_time
    other = peer if world.rank == 0 else 0
    what = f"timing transfers with rank {other}"
    mine = []
    for stage in list(s.model.stages)[:-1]:
        h = torch.zeros(b, *stage_out_shape(stage), dtype=dtype, device=s.device)
        times = []
        for r in range(rounds + 1):
            t0 = clock()
            with peer_guard(world.rank, what, other):
                dist.send(h, peer) if world.rank == 0 else dist.recv(h, 0)
            if cuda:
                torch.cuda.synchronize(s.device)
            if r:  # the first is a warm-up
                times.append(clock() - t0)
        mine.append(min(times))
    table = torch.tensor(mine, dtype=torch.float64, device=s.device)
    with peer_guard(world.rank, what, other):
        if world.rank == peer:
            dist.send(table, 0)
            return None
        theirs = torch.empty_like(table)
        dist.recv(theirs, peer)
    return [[send, receive] for send, receive in zip(mine, theirs.tolist(), strict=True)]


def split_stages(
    costs: list[float], n: int, transfers: list[list[float]] | None = None
) -> list[range]:
    """``n`` contiguous, non-empty groups of stages whose largest cost (:func:`group_cost`, with
    the ``transfers`` its boundaries cost, if given) is the smallest possible (ties: the earliest
    boundaries)."""
    transfers = transfers or []

    @cache
    def best(k: int, end: int) -> tuple[float, tuple[int, ...]]:
        """Stages ``[0, end)`` in ``k`` groups: (largest group cost, first stage of each group)."""
        if k == 1:
            return group_cost(costs, transfers, 0, end), (0,)
        options = []
        for start in range(k - 1, end):  # the last group is [start, end)
            worst, starts = best(k - 1, start)
            cost = group_cost(costs, transfers, start, end)
            options.append((max(worst, cost), (*starts, start)))
        return min(options)

    bounds = [*best(n, len(costs))[1], len(costs)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


def make_plan(
    s: Setup, groups: int, replicas: int, transfers: list[list[float]] | None = None
) -> Plan:
    """Measure and count the stage costs of ``s`` and split them into ``groups`` by the rule
    ``train.pipeline.balance`` names, with the ``transfers`` measured (:func:`transfer_seconds`)
    in the time rule's costs. The time is measured either way: the shares and the ceiling are
    always of the measured time."""
    params = stage_params(s.method)  # type: ignore[arg-type]
    pipeline = s.cfg.train.pipeline
    seconds = stage_seconds(s, pipeline.timing_batches)
    transfers = transfers or []
    if pipeline.balance == "time":
        ranges = split_stages(seconds, groups, transfers)
    else:
        ranges = split_stages([float(p) for p in params], groups)
    bounds = [[r.start, r.stop - 1] for r in ranges]
    return Plan(bounds, pipeline.balance, seconds, params, replicas, transfers)


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
            [[float(a), float(b)] for a, b in raw.get("transfer_seconds", [])],
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
