"""Measure SparseConv's block path (grouped / gathered conv) against the masked dense conv.

For every (channels, map size, ensembles, m) of the grid, both paths of the same modular
wiring run forward + backward on one batch, interleaved round by round in one process and
timed in process CPU time (the machine is shared), 1 torch thread. Prints a markdown table:
milliseconds per step of each path and their ratio. The rule in
``neuroplex.layers.sparse_conv.choose_path`` and the table beside it come from this script.

    python scripts/bench_sparse_conv.py [--batch 128] [--rounds 6]
"""

from __future__ import annotations

import argparse
import time

import torch

from neuroplex import wiring
from neuroplex.layers.sparse_conv import SparseConv

GRID = [  # (c_in, c_out, map side)
    (24, 48, 14),
    (48, 96, 7),
    (64, 64, 16),
    (128, 128, 8),
]
LAYOUTS = [(4, 0), (4, 1), (4, 3), (8, 0), (8, 1), (8, 3)]  # (ensembles, m)


def step_time(layers: dict[str, SparseConv], x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Mean process CPU seconds of forward + backward per layer, interleaved by round."""
    total = dict.fromkeys(layers, 0.0)
    for r in range(rounds + 1):
        for name, layer in layers.items():
            start = time.process_time()
            layer(x).sum().backward()
            if r:  # round 0 warms up
                total[name] += time.process_time() - start
    return {name: t / rounds for name, t in total.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    columns = "c_in -> c_out | map | ensembles | m | density | block ms | masked ms | ratio"
    print(f"| {columns} |")
    print("|---|---|---|---|---|---|---|---|")
    for c_in, c_out, side in GRID:
        x = torch.randn(args.batch, c_in, side, side)
        for ensembles, m in LAYOUTS:
            w = wiring.modular(c_in, c_out, ensembles, m)
            layers = {p: SparseConv(w, 2, 3, path=p) for p in ("block", "masked")}
            t = step_time(layers, x, args.rounds)
            print(
                f"| {c_in} -> {c_out} | {side}x{side} | {ensembles} | {m} | {w.density:.3g} | "
                f"{1e3 * t['block']:.1f} | {1e3 * t['masked']:.1f} | "
                f"{t['block'] / t['masked']:.2f} |"
            )


if __name__ == "__main__":
    main()
