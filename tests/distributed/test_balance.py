"""Splitting the stages into groups: the dynamic program against a brute force over every
contiguous split, the recorded plan, and timing that leaves the run untouched."""

import itertools
import json

import numpy as np
import pytest
import torch

from neuroplex.distributed.balance import (
    PLAN,
    Plan,
    make_plan,
    read_plan,
    split_stages,
    stage_params,
    stage_seconds,
    write_plan,
)
from neuroplex.errors import NeuroplexError
from neuroplex.train.setup import build_setup

PLAN_FIELDS = ["groups", "balance", "stage_seconds", "stage_params", "replicas"]


def brute_force(costs: list[float], n: int, transfers: list[list[float]] | None = None) -> float:
    """The smallest largest-group cost over every way to cut ``costs`` into ``n`` contiguous,
    non-empty groups; a group also pays ``transfers[i][0]`` to send stage i's output when it
    ends at stage i, and ``transfers[i][1]`` to receive it when it starts at stage i + 1."""
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(costs)), n - 1):
        bounds = [0, *cuts, len(costs)]
        worst = 0.0
        for a, b in zip(bounds, bounds[1:], strict=False):
            cost = sum(costs[a:b])
            if transfers and a > 0:
                cost += transfers[a - 1][1]
            if transfers and b < len(costs):
                cost += transfers[b - 1][0]
            worst = max(worst, cost)
        best = min(best, worst)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_the_split_of_a_synthetic_cost_table_is_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    costs = [float(c) for c in rng.exponential(size=int(rng.integers(1, 9)))]
    for n in range(1, len(costs) + 1):
        groups = split_stages(costs, n)
        assert len(groups) == n and all(len(g) > 0 for g in groups)
        assert [i for g in groups for i in g] == list(range(len(costs)))  # contiguous, in order
        worst = max(sum(costs[i] for i in g) for g in groups)
        assert worst == pytest.approx(brute_force(costs, n))


@pytest.mark.parametrize("seed", range(20))
def test_the_split_with_transfer_costs_is_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    costs = [float(c) for c in rng.exponential(size=int(rng.integers(2, 9)))]
    transfers = [[float(a), float(b)] for a, b in rng.exponential(0.5, (len(costs) - 1, 2))]
    for n in range(1, len(costs) + 1):
        groups = split_stages(costs, n, transfers)
        bounds = [[g.start, g.stop - 1] for g in groups]
        plan = Plan(bounds, "time", costs, [1] * len(costs), 1, transfers)
        assert max(plan.group_seconds) == pytest.approx(brute_force(costs, n, transfers))


def test_a_costly_boundary_moves_the_split():
    # without transfers the even split is [0, 1] | [2, 3]; sending stage 1's output costs 3 a
    # side, so the cut goes after stage 0 or 2 (earliest: 0)
    costs = [1.0, 1.0, 1.0, 1.0]
    assert split_stages(costs, 2) == [range(0, 2), range(2, 4)]
    transfers = [[0.1, 0.1], [3.0, 3.0], [0.1, 0.1]]
    assert split_stages(costs, 2, transfers) == [range(0, 1), range(1, 4)]
    plan = Plan([[0, 0], [1, 3]], "time", costs, [1, 1, 1, 1], 1, transfers)
    assert plan.group_seconds == pytest.approx([1.1, 3.1])
    assert plan.ceiling == pytest.approx(4.0 / 3.1)


def test_ties_take_the_earliest_boundaries():
    assert split_stages([38, 279, 279, 267], 2) == [range(0, 2), range(2, 4)]
    assert split_stages([5, 1, 1, 1, 1, 1], 2) == [range(0, 1), range(1, 6)]
    assert split_stages([1, 1, 1], 3) == [range(0, 1), range(1, 2), range(2, 3)]
    assert split_stages([1, 2, 3], 1) == [range(0, 3)]


def test_shares_and_ceiling_follow_the_costs():
    plan = Plan([[0, 0], [1, 2]], "time", [2.0, 1.0, 1.0], [10, 20, 30], 1)
    assert plan.ranges == [range(0, 1), range(1, 3)]
    assert plan.shares == pytest.approx([0.5, 0.5])
    assert plan.ceiling == pytest.approx(2.0)


def test_a_recorded_plan_reads_back_and_a_broken_one_is_refused(tmp_path):
    transfers = [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]
    plan = Plan([[0, 1], [2, 3]], "time", [1.0, 2.0, 1.5, 1.0], [1, 2, 3, 4], 2, transfers)
    write_plan(tmp_path, plan)
    record = json.loads((tmp_path / PLAN).read_text())
    assert record["group_seconds"] == pytest.approx([3.3, 2.9])
    assert record["ceiling"] == pytest.approx(5.5 / 3.3)
    assert read_plan(tmp_path, 4, 2, 2) == plan
    old = {k: v for k, v in record.items() if k != "transfer_seconds"}
    (tmp_path / PLAN).write_text(json.dumps(old))  # recorded before transfers were timed
    assert read_plan(tmp_path, 4, 2, 2) == Plan(*[getattr(plan, k) for k in PLAN_FIELDS])
    assert read_plan(tmp_path, 4, 2, 1) is None  # another layout: plan again
    (tmp_path / PLAN).write_text(json.dumps({**record, "groups": [[0, 0], [2, 3]]}))
    with pytest.raises(NeuroplexError, match="do not cover stages 0-3"):
        read_plan(tmp_path, 4, 2, 2)
    (tmp_path / PLAN).write_text(json.dumps({"groups": [[0, 3]]}))
    with pytest.raises(NeuroplexError, match="not a pipeline plan"):
        read_plan(tmp_path, 4, 1, 1)


def test_timing_leaves_parameters_optimizers_and_random_state_untouched(tiny):
    s = build_setup(tiny("train.parallel=2"))
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    aux_before = {k: v.clone() for k, v in s.method.aux.state_dict().items()}
    streams = s.method.streams.state()
    rng = torch.get_rng_state()
    seconds = stage_seconds(s, batches=2)
    assert len(seconds) == 4 and all(t > 0 for t in seconds)
    for key, value in s.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    for key, value in s.method.aux.state_dict().items():
        assert torch.equal(value, aux_before[key]), key
    assert all(not opt.state for opt in s.method.optimizers)  # no step was taken
    assert all(torch.equal(v, streams[k]) for k, v in s.method.streams.state().items())
    assert torch.equal(torch.get_rng_state(), rng)


def test_the_params_rule_counts_stage_and_aux_net_parameters(tiny):
    s = build_setup(tiny("train.parallel=2", "train.pipeline.balance=params"))
    # widths 12 -> 24 -> 16 -> 16 -> 12, 3 classes: linear + layernorm, then the aux/head linear
    expected = [
        12 * 24 + 24 + 2 * 24 + 24 * 3 + 3,
        24 * 16 + 16 + 2 * 16 + 16 * 3 + 3,
        16 * 16 + 16 + 2 * 16 + 16 * 3 + 3,
        16 * 12 + 12 + 2 * 12 + 12 * 3 + 3,
    ]
    assert stage_params(s.method) == expected
    plan = make_plan(s, 2, 1)
    assert plan.balance == "params" and plan.stage_params == expected
    assert plan.ranges == split_stages(expected, 2)
    assert len(plan.stage_seconds) == 4  # measured either way: the shares are of time
