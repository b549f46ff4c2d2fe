"""Training-step time of two configs side by side, interleaved in one process.

Builds both runs' setups (data, model, method) and trains them in alternating chunks of
``--chunk`` steps on their own epoch-0 batches (augmented as in training), timing each chunk
in process CPU time (the machine may be shared: CPU time counts only this process's work, and
interleaving puts both configs under the same conditions). 1 torch thread. Prints each
config's seconds per step and their ratio; the first chunk of each warms up and is not counted.

    python scripts/time_side_by_side.py CONFIG_A CONFIG_B [--steps 200] [--chunk 20]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from neuroplex.config import load_config
from neuroplex.train.loop import epoch_batches
from neuroplex.train.optim import lr_at
from neuroplex.train.setup import Setup, build_setup


def train_steps(s: Setup, batches: list, first: int, count: int) -> None:
    """Steps ``first .. first + count - 1`` of epoch 0 (``batches``: its index batches), each
    with its augmentation draw and scheduled learning rate, as the training loop runs them."""
    for step in range(first, first + count):
        x, y = s.data.train_batch(batches[step], (s.cfg.seed, 0, step))
        s.method.step(x, y, lr_at(step, s.total_steps, s.cfg.train))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs=2, type=Path)
    parser.add_argument("--steps", type=int, default=200, help="timed steps per config")
    parser.add_argument("--chunk", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    setups = [build_setup(load_config(c, ["threads=1"])) for c in args.configs]
    batches = [epoch_batches(s, 0, 0) for s in setups]
    spent = [0.0, 0.0]
    for chunk in range(args.steps // args.chunk + 1):
        for i, s in enumerate(setups):
            start = time.process_time()
            train_steps(s, batches[i], chunk * args.chunk, args.chunk)
            if chunk:  # the first chunk warms up
                spent[i] += time.process_time() - start
    per_step = [t / args.steps for t in spent]
    for config, t in zip(args.configs, per_step, strict=True):
        print(f"{config}: {1e3 * t:.1f} ms per training step (process CPU time)")
    print(f"ratio {args.configs[1]} / {args.configs[0]}: {per_step[1] / per_step[0]:.3f}")


if __name__ == "__main__":
    main()
