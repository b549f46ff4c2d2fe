"""Activation memory of one training step of a config's network, by backprop and by local
learning under several aux settings (the meter's figure: bytes saved for backward, peak).

    python scripts/local_memory.py configs/fmnist_cnn_local.yaml [--set KEY=VALUE ...]... \
        [--variant "train.aux.widen=0.5"]...

Memory does not depend on the pixel values, so the batch is random (the config's batch size,
the data's sample shape given by ``--shape``); no data is read. Prints a Markdown table.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from neuroplex.config import load_config
from neuroplex.methods.local import Local
from neuroplex.network import build_network
from neuroplex.train.memory import ActivationMeter

DEFAULT_VARIANTS = [
    "train.aux.kind=linear",
    "train.aux.kind=mlp",
    "train.aux.kind=momentum",
    "train.aux.kind=augmented train.aux.widen=1.0",
    "train.aux.kind=augmented train.aux.widen=0.5",
    "train.aux.kind=augmented train.aux.widen=0.25",
    "train.aux.kind=augmented train.aux.widen=0.25 train.aux.max_depth=1",
]


def step_peak(config: str, overrides: list[str], shape: tuple[int, ...], classes: int) -> int:
    """Peak saved bytes of one step (``train.method`` from the overrides)."""
    cfg = load_config(config, overrides)
    torch.manual_seed(cfg.seed)
    model = build_network(cfg.model, shape, classes)
    x = torch.randn(cfg.train.batch_size, *shape)
    y = torch.randint(0, classes, (cfg.train.batch_size,))
    if cfg.train.method == "backprop":
        meter = ActivationMeter(model.parameters())
        with meter.track():
            F.cross_entropy(model(x), y).backward()
        return meter.peak
    method = Local(model, cfg)
    meter = ActivationMeter([*model.parameters(), *method.aux.parameters()])
    with meter.track():
        method.step(x, y, lr=0.0)
    return meter.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--variant", action="append", help="space-separated overrides")
    parser.add_argument("--shape", default="1,28,28", help="one sample's shape (1,28,28)")
    parser.add_argument("--classes", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    shape = tuple(int(n) for n in args.shape.split(","))
    base = step_peak(args.config, [*args.overrides, "train.method=backprop"], shape, args.classes)
    print("| method | activation memory | vs backprop |\n|---|---|---|")
    print(f"| backprop | {base / 2**20:.2f} MiB | 1.00× |")
    for variant in args.variant or DEFAULT_VARIANTS:
        overrides = [*args.overrides, "train.method=local", *variant.split()]
        peak = step_peak(args.config, overrides, shape, args.classes)
        print(f"| local, {variant} | {peak / 2**20:.2f} MiB | {peak / base:.2f}× |")


if __name__ == "__main__":
    main()
