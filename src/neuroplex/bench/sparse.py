"""``neuroplex bench sparse``: SparseLinear against masked dense, ``torch.sparse`` CSR and
``nn.Linear``.

One size is (batch ``b``, pattern, block size ``s``, target density): a square ``modular``
wiring of ``width / s`` ensembles with ``m`` chosen so ``(m + 1) / ensembles`` is nearest the
target (the table gives the actual density). Every implementation gets the *same* effective
weight (SparseLinear's masked weight) and bias, so all compute the same output and the timings
compare equal work:

- ``auto``: ``SparseLinear`` on the path it picks itself (the table names it);
- ``block-window`` / ``block-gather``: ``SparseLinear`` forced onto each block path it can
  take (``block-window`` only for cyclic-window wirings: ring and shuffle);
- ``masked``: ``F.linear(x, W * mask, bias)`` with plain autograd;
- ``csr``: ``torch.sparse.mm`` on a CSR weight whose values are the parameter (skipped above
  ``csr_max_batch``: it is many times slower than dense there);
- ``dense``: ``nn.Linear``, the reference of every ratio.

Timing: interleaved rounds in one process (per candidate per round: one forward under
``no_grad``, one forward + backward with the input gradient, as in a hidden layer, and one
without it, as in a first layer), after warm-up. On the CPU each call is timed in *process CPU
time* (``time.process_time``, all threads), which other processes on a shared machine do not
inflate the way they inflate wall time; on CUDA (``device="cuda"``) in wall time between
``torch.cuda.synchronize`` calls. Ratios are medians of the per-round ratio to dense (noise
hits a round's candidates alike); times are medians. Shapes: ``x [b, width]``.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neuroplex import wiring as W
from neuroplex.bench import machine, write
from neuroplex.errors import ConfigError
from neuroplex.layers.sparse import SparseLinear
from neuroplex.layers.sparse_plan import block_plan

IMPLS = ("auto", "block-window", "block-gather", "masked", "csr", "dense")
METRICS = ("fwd", "fwd_bwd", "fwd_bwd_first")
TITLES = (
    ("fwd_bwd", "Forward + backward"),
    ("fwd_bwd_first", "Forward + backward, first layer (no input gradient)"),
    ("fwd", "Forward (no_grad)"),
)


@dataclass
class Candidate:
    """An implementation under test: ``call(x) -> y`` with trainable ``params``; ``skip`` says
    why it cannot run at this size."""

    name: str
    call: Callable[[Tensor], Tensor] | None
    params: list[Tensor]
    path: str | None = None
    skip: str | None = None


def wiring_for(width: int, block: int, density: float, pattern: str, seed: int = 0) -> W.Wiring:
    """Square modular wiring, ``width / block`` ensembles, ``m`` nearest the target density."""
    g = width // block
    m = min(g - 1, max(0, round(density * g) - 1))
    return W.modular(width, width, g, m, pattern, seed=seed)


def candidates(
    wiring: W.Wiring, batch: int, csr_max_batch: int, device: torch.device
) -> list[Candidate]:
    """Every implementation of ``wiring`` on ``device``, all with the auto layer's weight and
    bias."""
    with device:
        return _candidates(wiring, batch, csr_max_batch)


def _candidates(wiring: W.Wiring, batch: int, csr_max_batch: int) -> list[Candidate]:
    auto = SparseLinear(wiring)
    weight, bias = auto.dense_weight().detach(), auto.bias.detach()
    found = [_sparse("auto", auto)]
    for path in ("block-window", "block-gather"):
        found.append(_forced(wiring, path, weight, bias))
    found.append(_masked(wiring, weight, bias))
    if batch > csr_max_batch:
        found.append(Candidate("csr", None, [], skip=f"batch {batch} > --csr-max-batch"))
    else:
        found.append(_csr(wiring, weight, bias))
    dense = nn.Linear(wiring.n_in, wiring.n_out)
    with torch.no_grad():
        dense.weight.copy_(weight)
        dense.bias.copy_(bias)
    found.append(Candidate("dense", dense, list(dense.parameters()), "dense"))
    return found


def _sparse(name: str, layer: SparseLinear) -> Candidate:
    return Candidate(name, layer, list(layer.parameters()), layer.path)


def _forced(wiring: W.Wiring, path: str, weight: Tensor, bias: Tensor) -> Candidate:
    if path == "block-window" and not _windowed(wiring):
        return Candidate(path, None, [], skip="not a cyclic-window wiring")
    layer = SparseLinear(wiring, path=path)
    with torch.no_grad():
        layer.weight.data = layer.from_dense(weight)
        layer.bias.copy_(bias)
    return _sparse(path, layer)


def _windowed(wiring: W.Wiring) -> bool:
    return wiring.is_block and block_plan(wiring, window=True) is not None


def _masked(wiring: W.Wiring, weight: Tensor, bias: Tensor) -> Candidate:
    w, b = nn.Parameter(weight.clone()), nn.Parameter(bias.clone())
    mask = torch.as_tensor(wiring.to_mask(), dtype=weight.dtype, device=weight.device)
    return Candidate("masked", lambda x: F.linear(x, w * mask, b), [w, b], "masked-dense")


def _csr(wiring: W.Wiring, weight: Tensor, bias: Tensor) -> Candidate:
    """``y = (W_csr @ x^T)^T + bias``; the CSR values are the trainable parameter."""
    rows, cols = torch.as_tensor(wiring.to_mask(), device=weight.device).nonzero(as_tuple=True)
    values = nn.Parameter(weight[rows, cols].clone())
    crow = torch.zeros(wiring.n_out + 1, dtype=torch.long, device=weight.device)
    crow[1:] = torch.bincount(rows, minlength=wiring.n_out).cumsum(0)
    b = nn.Parameter(bias.clone())
    shape = (wiring.n_out, wiring.n_in)

    def call(x: Tensor) -> Tensor:
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore")
            matrix = torch.sparse_csr_tensor(crow, cols, values, shape)
            return torch.sparse.mm(matrix, x.t()).t() + b

    return Candidate("csr", call, [values, b], "csr")


def time_rounds(
    runnable: list[Candidate], x: Tensor, repeats: int, warmup: int
) -> dict[str, dict[str, list[float]]]:
    """Seconds per timed round of each metric (``METRICS``) per candidate; ``x [b, width]``."""
    times: dict[str, dict[str, list[float]]] = {c.name: {m: [] for m in METRICS} for c in runnable}
    grad = torch.randn_like(x)  # [b, width]: the layers are square
    hidden = x.detach().requires_grad_(True)
    for i in range(warmup + repeats):
        for c in runnable:
            seconds = time_once(c, hidden, x.detach(), grad)
            if i >= warmup:
                for metric in METRICS:
                    times[c.name][metric].append(seconds[metric])
    return times


def time_once(c: Candidate, hidden: Tensor, first: Tensor, grad: Tensor) -> dict[str, float]:
    """One forward (``no_grad``), one forward + backward into ``hidden`` (which requires a
    gradient) and one from ``first`` (which does not)."""
    assert c.call is not None
    call = c.call
    hidden.grad = None
    for p in c.params:
        p.grad = None
    with torch.no_grad():
        fwd = _timed(lambda: call(hidden), hidden.device)
    fwd_bwd = _timed(lambda: call(hidden).backward(grad), hidden.device)
    for p in c.params:
        p.grad = None
    fwd_bwd_first = _timed(lambda: call(first).backward(grad), hidden.device)
    return {"fwd": fwd, "fwd_bwd": fwd_bwd, "fwd_bwd_first": fwd_bwd_first}


def _timed(work: Callable[[], object], device: torch.device) -> float:
    """Seconds ``work`` takes: process CPU time on the CPU, synchronized wall time on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        work()
        torch.cuda.synchronize(device)
        return time.perf_counter() - t0
    t0 = time.process_time()
    work()
    return time.process_time() - t0


def sizes(
    batches: Sequence[int],
    patterns: Sequence[str],
    blocks: Sequence[int],
    densities: Sequence[float],
) -> Iterator[tuple[int, str, int, float]]:
    for b in batches:
        for pattern in patterns:
            for s in blocks:
                for density in densities:
                    yield b, pattern, s, density


def setup(
    width: int, b: int, pattern: str, s: int, density: float, opts: dict[str, Any]
) -> tuple[W.Wiring, list[Candidate], Tensor]:
    """The wiring, every candidate and the input ``x [b, width]`` of one size (seeded), on
    ``opts["device"]`` (default CPU)."""
    device = torch.device(opts.get("device", "cpu"))
    torch.manual_seed(opts["seed"])
    wiring = wiring_for(width, s, density, pattern, opts["seed"])
    found = candidates(wiring, b, opts["csr_max_batch"], device)
    return wiring, found, torch.randn(b, width).to(device)


def measure_size(
    width: int, b: int, pattern: str, s: int, density: float, opts: dict[str, Any]
) -> list[dict[str, Any]]:
    """One row per implementation: median seconds and median per-round ratio to dense."""
    wiring, found, x = setup(width, b, pattern, s, density, opts)
    runnable = [c for c in found if c.skip is None]
    times = time_rounds(runnable, x, opts["repeats"], opts["warmup"])
    size = {
        "width": width,
        "batch": b,
        "pattern": pattern,
        "block": s,
        "target_density": density,
        "density": wiring.density,
        "ensembles": len(wiring.in_sizes),
        "m": len(wiring.edges) // len(wiring.out_sizes) - 1,
    }
    rows = []
    for c in found:
        row = {**size, "impl": c.name, "path": c.path, "skip": c.skip}
        for m in METRICS:
            mine = times.get(c.name, {}).get(m)
            row[m] = statistics.median(mine) if mine else None
            ratios = [t / d for t, d in zip(mine, times["dense"][m], strict=True)] if mine else []
            row[f"{m}_vs_dense"] = statistics.median(ratios) if ratios else None
        rows.append(row)
    return rows


def check_options(
    width: int, blocks: Sequence[int], densities: Sequence[float], patterns: Sequence[str]
) -> None:
    """One-line ConfigError for an option the benchmark cannot run."""
    for s in blocks:
        if not 1 <= s <= width:
            raise ConfigError(f"--block = {s}: must be between 1 and --width ({width})")
    for d in densities:
        if not 0 < d <= 1:
            raise ConfigError(f"--density = {d}: must be in (0, 1]")
    for p in patterns:
        if p not in W.PATTERNS:
            raise ConfigError(f"--pattern = {p!r}: must be one of {', '.join(W.PATTERNS)}")


def check_device(device: str) -> None:
    """One-line ConfigError for ``--device`` other than cpu, or cuda without a GPU."""
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device = {device!r}: must be 'cpu' or 'cuda'")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device = 'cuda': no CUDA device is available; use --device cpu")


def run(
    *,
    width: int = 4096,
    batches: Sequence[int] = (256, 2048),
    patterns: Sequence[str] = ("ring", "shuffle", "random"),
    blocks: Sequence[int] = (16, 32, 64, 128),
    densities: Sequence[float] = (0.5, 0.25, 0.1, 0.05),
    repeats: int = 5,
    warmup: int = 2,
    threads: int = 2,
    csr_max_batch: int = 256,
    seed: int = 0,
    device: str = "cpu",
    out: Path | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every size, one after another; JSON and table rewritten after each size."""
    check_options(width, blocks, densities, patterns)
    check_device(device)
    torch.set_num_threads(threads)
    opts = {"repeats": repeats, "warmup": warmup, "csr_max_batch": csr_max_batch, "seed": seed}
    opts["device"] = device
    clock = "CUDA-synchronized wall time" if device == "cuda" else "process CPU time"
    result: dict[str, Any] = {"machine": machine(), "threads": threads, "clock": clock, **opts}
    result["rows"] = []
    for b, pattern, s, density in sizes(batches, patterns, blocks, densities):
        result["rows"] += measure_size(width, b, pattern, s, density, opts)
        echo(f"batch={b} pattern={pattern} block={s} density={density} done")
        if out is not None:
            write(result, out, table)
    return result


def table(result: dict[str, Any]) -> str:
    """Markdown: a forward + backward table, then a forward-only table."""
    width = result["rows"][0]["width"] if result["rows"] else "?"
    where = f"{result.get('device', 'cpu')}, {result['machine']}, {result['threads']} threads"
    head = (
        f"{width}×{width}, float32, {where}, timed in {result.get('clock', 'wall time')}, "
        f"median of {result['repeats']} interleaved rounds after {result['warmup']} warm-up. "
        "Each cell is "
        "the time relative to `nn.Linear` (median of per-round ratios); ideal = density. "
        "`auto` = the path SparseLinear picks itself, `window`/`gather` = its block paths "
        "forced, `masked` = `F.linear(x, W * mask)`, `CSR` = `torch.sparse.mm`; — = not run "
        "(window: not a cyclic-window wiring; CSR: batch above --csr-max-batch). Forward + "
        "backward includes the input gradient, except in the first-layer table."
    )
    parts = [head]
    for metric, title in TITLES:
        parts += ["", f"**{title}**", "", metric_table(result["rows"], metric)]
    return "\n".join(parts)


_COLUMNS = (("auto", "auto"), ("block-window", "window"), ("block-gather", "gather"))
_COLUMNS += (("masked", "masked"), ("csr", "CSR"))


def metric_table(rows: list[dict[str, Any]], metric: str) -> str:
    names = " | ".join(title for _, title in _COLUMNS)
    lines = [
        f"| b | pattern | s | density=ideal | auto path | dense (ms) | {names} "
        "| auto÷masked | auto÷ideal |",
        "|---" * (8 + len(_COLUMNS)) + "|",
    ]
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        key = (r["batch"], r["pattern"], r["block"], r["density"])
        groups.setdefault(key, {})[r["impl"]] = r
    for (b, pattern, s, density), impls in groups.items():
        ratio = {name: impls[name][f"{metric}_vs_dense"] for name in impls}
        auto = ratio["auto"]
        cells = [str(b), pattern, str(s), f"{density:.3f}", impls["auto"]["path"]]
        cells.append(f"{1000 * impls['dense'][metric]:.1f}")
        cells += [_cell(ratio.get(name)) for name, _ in _COLUMNS]
        cells += [_cell(auto / ratio["masked"]), _cell(auto / density)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"
