"""``neuroplex bench local``: backprop against local learning with each auxiliary network.

Each (stages, method, seed) trains MNIST-1D in its own process (so peak RSS is its own), one after
another on the same machine, and reports test accuracy, exact peak activation memory
(saved-tensor bytes), peak RSS and time per epoch. Writes JSON and a markdown table.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from neuroplex.bench import machine, write
from neuroplex.errors import NeuroplexError

METHODS: dict[str, list[str]] = {
    "backprop": ["train.method=backprop"],
    "local / linear": ["train.method=local", "train.aux.kind=linear"],
    "local / mlp": ["train.method=local", "train.aux.kind=mlp"],
    "local / augmented (spread)": [
        "train.method=local",
        "train.aux.kind=augmented",
        "train.aux.picks=spread",
        "train.aux.depth_coeff=1.0",
    ],
    "local / augmented (reference)": [  # AugLocal's released scripts and code
        "train.method=local",
        "train.aux.kind=augmented",
        "train.aux.picks=end",
        "train.aux.depth_coeff=0.5",
    ],
    "local / momentum": ["train.method=local", "train.aux.kind=momentum"],
}


def base_overrides(stages: int, width: int, steps: int) -> list[str]:
    stage = f"{{kind: dense, width: {width}, dropout: 0.1}}"
    return [
        "data.name=mnist1d",
        f"model.stages=[{', '.join([stage] * stages)}]",
        f"train.steps={steps}",
        "train.batch_size=100",
        "train.lr=3e-3",
    ]


def run_one(
    overrides: list[str], run_dir: Path, config: str | Path | None = None
) -> dict[str, Any]:
    """Train ``config`` (None: the built-in defaults) with ``overrides`` in a fresh process into
    ``run_dir``; its summary."""
    args = [sys.executable, "-m", "neuroplex", "train", *([str(config)] if config else [])]
    args += ["--run-dir", str(run_dir)]
    for item in overrides:
        args += ["--set", item]
    env = {**os.environ, "CI": "1"}  # plain progress lines
    done = subprocess.run(args, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark run failed: {' '.join(args)}\n{done.stderr[-2000:]}")
    return json.loads((run_dir / "summary.json").read_text())


def run(
    stage_counts: list[int],
    seeds: int,
    steps: int,
    width: int,
    out: Path,
    methods: list[str] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Seed by seed (so a cut-short benchmark stays balanced), every stage count and method;
    the JSON and table are rewritten after every run. ``resume`` keeps the runs already in
    ``out`` (same steps and width) and does only the missing ones."""
    result: dict[str, Any] = {"machine": machine(), "steps": steps, "width": width, "runs": []}
    if resume and out.exists():
        result["runs"] = previous_runs(out, steps, width)
    done = {(r["stages"], r["method"], r["seed"]) for r in result["runs"]}
    with tempfile.TemporaryDirectory(prefix="neuroplex-bench-") as tmp:
        for seed in range(seeds):
            for stages in stage_counts:
                for name in methods or list(METHODS):
                    if (stages, name, seed) in done:
                        continue
                    overrides = [*base_overrides(stages, width, steps), *METHODS[name]]
                    run_dir = Path(tmp) / f"{stages}-{name.replace(' / ', '-')}-{seed}"
                    summary = run_one([*overrides, f"seed={seed}"], run_dir)
                    row = {**summary, "stages": stages, "method": name, "seed": seed}
                    result["runs"].append(row)
                    write(result, out, table)
                    print(f"stages={stages} {name} seed={seed}: test_acc={summary['test_acc']}")
    return result


def previous_runs(out: Path, steps: int, width: int) -> list[dict[str, Any]]:
    try:
        old = json.loads(out.read_text())
    except (OSError, ValueError) as e:
        raise NeuroplexError(f"--resume: cannot read {out}: {e}") from None
    if (old.get("steps"), old.get("width")) != (steps, width):
        raise NeuroplexError(
            f"--resume: {out} holds steps={old.get('steps')}, width={old.get('width')}; "
            f"this run asks for steps={steps}, width={width}"
        )
    return old["runs"]


def table(result: dict[str, Any]) -> str:
    lines = [
        f"MNIST-1D, dense stages of width {result['width']}, {result['steps']} steps, "
        f"batch 100 ({result['machine']}).",
        "",
        "| stages | method | test acc (mean ± std, seeds) | activation memory | vs backprop | "
        "peak RSS | time per epoch |",
        "|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in result["runs"]:
        groups.setdefault((r["stages"], r["method"]), []).append(r)
    for (stages, method), runs in groups.items():
        accs = [100 * r["test_acc"] for r in runs]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        act = statistics.mean(r["activation_bytes_peak"] for r in runs)
        bp = groups.get((stages, "backprop"))
        ratio = act / statistics.mean(r["activation_bytes_peak"] for r in bp) if bp else None
        rss = statistics.mean(r["peak_rss_bytes"] for r in runs) / 2**20
        epoch_s = statistics.mean(r["train_time_s"] / r["epochs"] for r in runs)
        lines.append(
            f"| {stages} | {method} | {statistics.mean(accs):.1f}% ± {spread:.1f} ({len(runs)}) | "
            f"{act / 2**20:.2f} MiB | {'—' if ratio is None else f'{ratio:.2f}×'} | "
            f"{rss:.0f} MiB | {epoch_s:.3f} s |"
        )
    return "\n".join(lines) + "\n"
