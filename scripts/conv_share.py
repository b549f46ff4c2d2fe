"""Share of each stage's convolutions in a config's training step: the floor on its time ratio.

Profiles ``--steps`` training steps (data, augmentation, forward, backward, optimizer; 1 torch
thread, after a warm-up) with ``torch.profiler`` and sums, per stage, the self CPU time of the
convolution ops (forward and backward) that carry that stage's conv weights, matched by weight
shape (stages whose conv weights have the same shape are not told apart). Making a set of
stages' convolutions sparse can at best remove their share, so ``1 - share`` is the lowest
training-step time ratio any sparsity of those convolutions can reach against this config,
whatever the kernel.

    python scripts/conv_share.py CONFIG [--set KEY=VALUE ...] [--steps 20] [--together 1 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from time_side_by_side import train_steps
from torch import nn
from torch.profiler import ProfilerActivity, profile

from neuroplex.config import load_config
from neuroplex.train.loop import epoch_batches
from neuroplex.train.setup import build_setup


def conv_weight_shapes(stage: nn.Module) -> set[tuple[int, ...]]:
    """Shapes of the conv weights in one stage (4-D for 2-D convs, 3-D for 1-D)."""
    return {
        tuple(p.shape)
        for name, p in stage.named_parameters()
        if p.dim() in (3, 4) and name.endswith("weight")
    }


def stage_shares(model: nn.Module, events) -> dict[int, float]:
    """``{stage index: share of the profiled self CPU time}`` of the convolution ops (forward
    and backward: names containing "convolution") whose input shapes include one of that
    stage's conv weight shapes; stages without conv weights are left out. ``events``: profiler
    averages grouped by input shape (``key``, ``input_shapes``, ``self_cpu_time_total``)."""
    total = sum(e.self_cpu_time_total for e in events)
    shares = {}
    for i, stage in enumerate(model.stages):
        shapes = conv_weight_shapes(stage)
        if shapes:
            spent = sum(
                e.self_cpu_time_total
                for e in events
                if "convolution" in e.key and shapes & {tuple(x) for x in e.input_shapes}
            )
            shares[i] = spent / total
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--set", action="append", default=[], help="config override")
    parser.add_argument("--steps", type=int, default=20, help="profiled steps")
    parser.add_argument("--together", type=int, nargs="*", default=[], help="stages summed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    s = build_setup(load_config(args.config, ["threads=1", *args.set]))
    batches = epoch_batches(s, 0, 0)
    train_steps(s, batches, 0, 10)  # warm-up
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        train_steps(s, batches, 10, args.steps)
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"{args.config}: {total / 1e3 / args.steps:.1f} ms per training step (1 thread)")
    shares = stage_shares(s.model, events)
    for i, share in shares.items():
        print(
            f"stage {i} ({type(s.model.stages[i]).__name__}): convolutions {share:.1%} of the step"
        )
    if args.together:
        share = sum(shares.get(i, 0.0) for i in args.together)
        names = ", ".join(map(str, args.together))
        print(f"stages {names}: {share:.1%}; without their convolutions: {1 - share:.2f}x the step")


if __name__ == "__main__":
    main()
