"""``neuroplex bench ...``: side-by-side measurements that write JSON and a markdown table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from neuroplex.cli.common import user_errors
from neuroplex.errors import NeuroplexError

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: side-by-side measurements.")


@bench_app.command("local")
@user_errors
def bench_local(
    stages: Annotated[list[int], typer.Option(help="stage counts to compare")] = [4, 8],  # noqa: B006
    seeds: Annotated[int, typer.Option(min=1)] = 3,
    steps: Annotated[int, typer.Option(min=1)] = 8000,
    width: Annotated[int, typer.Option(min=1)] = 256,
    method: Annotated[
        list[str] | None, typer.Option(help="methods to run (default: all); repeatable")
    ] = None,
    resume: Annotated[bool, typer.Option(help="keep the runs already in --out")] = False,
    out: Annotated[
        Path, typer.Option(help="JSON output (a .md table is written beside it)")
    ] = Path("docs/bench/local.json"),
) -> None:
    """Backprop vs local learning (each aux kind): accuracy, activation memory, RSS, time."""
    from neuroplex.bench.local import METHODS, run, table

    check_positive("--stages", stages)
    for name in method or []:
        if name not in METHODS:
            raise NeuroplexError(f"--method {name!r}: expected one of {', '.join(METHODS)}")
    print(table(run(stages, seeds, steps, width, out, method, resume)))


@bench_app.command("moe")
@user_errors
def bench_moe(
    experts: Annotated[list[int], typer.Option(help="expert counts")] = [4, 8, 32],  # noqa: B006
    k: Annotated[list[int], typer.Option(help="experts per token")] = [1, 2],  # noqa: B006
    tokens: Annotated[list[int], typer.Option(help="tokens per call")] = [1024, 4096, 16384],  # noqa: B006
    d: Annotated[int, typer.Option(min=1, help="model width")] = 256,
    hidden: Annotated[int, typer.Option(min=1, help="expert hidden width")] = 1024,
    repeats: Annotated[int, typer.Option(min=1, help="timed rounds (median)")] = 5,
    warmup: Annotated[int, typer.Option(min=0, help="untimed rounds first")] = 2,
    threads: Annotated[int, typer.Option(min=1, help="torch threads")] = 2,
    max_dispatch_gib: Annotated[
        float, typer.Option(min=0.0, help="skip a peer whose one-hot dispatch exceeds this")
    ] = 2.0,
    router: Annotated[str, typer.Option(help="our MoE's router")] = "noisy_topk",
    dtype: Annotated[
        list[str], typer.Option(help="float32, bfloat16, float16 or float64; repeatable")
    ] = ["float32"],  # noqa: B006
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    compile: Annotated[
        bool, typer.Option("--compile", help="also time ours and the dense FFN compiled")
    ] = False,
    out: Annotated[
        Path, typer.Option(help="JSON output (a .md table is written beside it)")
    ] = Path("docs/bench/moe.json"),
) -> None:
    """Our MoE vs mixture-of-experts, st-moe-pytorch and the equal-active dense FFN."""
    from neuroplex.bench.moe import run, table
    from neuroplex.layers.routers import ROUTERS

    for name, values in (("--experts", experts), ("--k", k), ("--tokens", tokens)):
        check_positive(name, values)
    check_choice("--router", [router], list(ROUTERS))
    check_choice("--dtype", dtype, ["float32", "bfloat16", "float16", "float64"])
    check_device(device)
    result = run(
        experts,
        k,
        tokens,
        d=d,
        h=hidden,
        repeats=repeats,
        warmup=warmup,
        threads=threads,
        max_gib=max_dispatch_gib,
        router=router,
        dtypes=tuple(dtype),
        device=device,
        compiled=compile,
        out=out,
    )
    print(table(result))


@bench_app.command("pipeline")
@user_errors
def bench_pipeline(
    stages: Annotated[int, typer.Option(min=2, help="dense stages (of --width)")] = 4,
    width: Annotated[int, typer.Option(min=1)] = 512,
    widths: Annotated[
        list[int] | None,
        typer.Option(help="one width per stage instead of --stages/--width, e.g. 1024 256 256"),
    ] = None,
    batch: Annotated[int, typer.Option(min=1)] = 256,
    steps: Annotated[int, typer.Option(min=1)] = 300,
    processes: Annotated[
        list[int], typer.Option(min=1, help="train.parallel values compared (1 = sequential)")
    ] = [1, 2],  # noqa: B006
    balance: Annotated[list[str], typer.Option(help="split rules compared: time, params")] = [  # noqa: B006
        "time"
    ],
    out: Annotated[
        Path, typer.Option(help="JSON output (a .md table is written beside it)")
    ] = Path("docs/bench/pipeline.json"),
    rounds: Annotated[
        int, typer.Option(min=1, help="repeat every run this many times, round-robin (median)")
    ] = 1,
    config: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="benchmark this config's network and data (a YAML file or shipped config name) "
            "instead of the dense stages"
        ),
    ] = None,
) -> None:
    """Local learning throughput: pipelined stage groups (one thread per process) vs sequential."""
    from neuroplex.bench.pipeline import run, table
    from neuroplex.config import load_config

    sizes = widths or [width] * stages
    if any(w < 1 for w in sizes):
        raise NeuroplexError(f"--widths {sizes}: every width must be >= 1")
    n_stages = len(load_config(config).model.stages) if config else len(sizes)
    for n in processes:
        if n > n_stages:
            raise NeuroplexError(f"--processes {n}: must be <= the number of stages ({n_stages})")
    for rule in balance:
        if rule not in ("time", "params"):
            raise NeuroplexError(f"--balance {rule!r}: expected 'time' or 'params'")
    print(table(run(sizes, batch, steps, processes, balance, out, rounds=rounds, config=config)))


@bench_app.command("sparse")
@user_errors
def bench_sparse(
    width: Annotated[int, typer.Option(min=1, help="layer width (square layer)")] = 4096,
    batch: Annotated[list[int], typer.Option(help="batch sizes")] = [256, 2048],  # noqa: B006
    density: Annotated[list[float], typer.Option(help="target densities")] = [  # noqa: B006
        0.5,
        0.25,
        0.1,
        0.05,
    ],
    block: Annotated[list[int], typer.Option(help="block sizes")] = [16, 32, 64, 128],  # noqa: B006
    pattern: Annotated[list[str], typer.Option(help="modular wiring patterns")] = [  # noqa: B006
        "ring",
        "shuffle",
        "random",
    ],
    repeats: Annotated[int, typer.Option(min=1, help="timed rounds (median)")] = 5,
    warmup: Annotated[int, typer.Option(min=0, help="untimed rounds first")] = 2,
    threads: Annotated[int, typer.Option(min=1, help="torch threads")] = 2,
    csr_max_batch: Annotated[
        int, typer.Option(min=0, help="skip torch.sparse CSR above this batch")
    ] = 256,
    seed: Annotated[int, typer.Option(help="seed of weights, inputs and random wirings")] = 0,
    device: Annotated[str, typer.Option(help="cpu (process CPU time) or cuda (wall time)")] = "cpu",
    out: Annotated[
        Path, typer.Option(help="JSON output (a .md table is written beside it)")
    ] = Path("docs/bench/sparse.json"),
) -> None:
    """SparseLinear (auto and each block path) vs masked dense, torch.sparse CSR and nn.Linear."""
    from neuroplex.bench.sparse import run, table

    check_positive("--batch", batch)
    result = run(
        width=width,
        batches=batch,
        patterns=pattern,
        blocks=block,
        densities=density,
        repeats=repeats,
        warmup=warmup,
        threads=threads,
        csr_max_batch=csr_max_batch,
        seed=seed,
        device=device,
        out=out,
    )
    print(table(result))


def check_positive(option: str, values: list[int]) -> None:
    """One-line error for a repeated integer option with a value below 1."""
    if any(v < 1 for v in values):
        raise NeuroplexError(f"{option} {values}: every value must be at least 1")


def check_choice(option: str, values: list[str], allowed: list[str]) -> None:
    """One-line error for an option value outside ``allowed``."""
    for value in values:
        if value not in allowed:
            raise NeuroplexError(f"{option} {value!r}: expected one of {', '.join(allowed)}")


def check_device(device: str) -> None:
    """``cpu``, or ``cuda`` when a CUDA device is present: one line otherwise."""
    import torch

    if device not in ("cpu", "cuda"):
        raise NeuroplexError(f"--device {device!r}: expected cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise NeuroplexError("--device cuda: no CUDA device is available on this machine")
