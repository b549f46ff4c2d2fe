"""``neuroplex bench moe``: our MoE against the PyPI MoE layers and the equal-active dense FFN.

Everything runs side by side in one process: for each size (experts ``e``, choices ``k``,
tokens ``t``) every implementation is built with the same ``d``, ``e``, ``k`` and expert hidden
width ``h``, then timed in interleaved rounds (one call of each per round, so machine noise hits
them alike), median over the rounds after warm-up. Implementations:

- ``neuroplex``: ``neuroplex.layers.moe.MoE`` with its default router (noisy top-k; ``--router``
  picks another), no capacity limit;
- ``dense FFN``: ``d -> k*h -> d``, the same *active* parameters and FLOPs, no routing: the limit;
- with ``--compile``, both again under ``torch.compile`` (``... (compiled)``), compared with
  each other;
- ``mixture-of-experts`` and ``st-moe-pytorch`` (extra ``bench``), once configured to drop no
  token (capacity = all tokens, every second choice kept) and once at their defaults (capacity
  factor 1.25, second choice kept at random). Their dispatch builds dense one-hot
  ``[tokens, e, capacity]`` tensors; a size whose tensor would exceed ``max_dispatch_gib`` is
  skipped and the table says why. st-moe-pytorch supports only ``k >= 2``. Peers run in
  float32 eager only.

Every size runs once per ``--dtype`` (float32, bfloat16: modules and inputs in that dtype).
Clock: on CPU the process CPU time (``time.process_time``, every thread), because the machine
these figures come from is shared and wall-clock ratios swing with the load; on CUDA wall time
after ``torch.cuda.synchronize()``, and each row records ``torch.cuda.max_memory_allocated``
of its forward + backward (``peak_mib``).

Shapes: our layer and the FFN take ``[t, d]``; the peers take ``[1, t, d]`` (one group).
"""

from __future__ import annotations

import importlib.util
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from neuroplex.bench import machine, metric_sections, write
from neuroplex.layers.moe import MoE

PEERS = {"mixture-of-experts": "mixture_of_experts", "st-moe-pytorch": "st_moe_pytorch"}


@dataclass
class Candidate:
    """A layer under test: ``call(x) -> (output, aux_loss)``; ``skip`` says why it cannot run."""

    name: str
    module: nn.Module | None
    call: Callable[[Tensor], tuple[Tensor, Tensor]] | None
    skip: str | None = None


def dense_ffn(d: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))


def ours(d: int, h: int, e: int, k: int, router: str, compiled: bool = False) -> Candidate:
    moe = MoE(d, d, e, k, h, router=router, capacity_factor=None)
    run = torch.compile(moe) if compiled else moe

    def call(x: Tensor) -> tuple[Tensor, Tensor]:
        out = run(x)
        return out, moe.aux_loss

    return Candidate("neuroplex" + COMPILED * compiled, moe, call)


def dense(d: int, h: int, k: int, compiled: bool = False) -> Candidate:
    ffn = dense_ffn(d, k * h)
    run = torch.compile(ffn) if compiled else ffn
    return Candidate("dense FFN" + COMPILED * compiled, ffn, lambda x: (run(x), x.new_zeros(())))


COMPILED = " (compiled)"


def peer_dispatch_gib(tokens: int, e: int, capacity_factor: float | None) -> float:
    """Size of one float32 ``[tokens, e, capacity]`` dispatch tensor of the peers, in GiB."""
    capacity = tokens if capacity_factor is None else max(4, int(tokens * capacity_factor / e))
    return tokens * e * min(capacity, tokens) * 4 / 2**30


def peer(
    package: str, d: int, h: int, e: int, k: int, tokens: int, no_drop: bool, max_gib: float
) -> Candidate:
    name = f"{package} ({'no drop' if no_drop else 'default, cf 1.25'})"
    if importlib.util.find_spec(PEERS[package]) is None:
        return Candidate(name, None, None, "not installed (pip install 'neuroplex[bench]')")
    if k not in (1, 2) or (package == "st-moe-pytorch" and k != 2):
        return Candidate(name, None, None, f"k={k} not supported")
    gib = peer_dispatch_gib(tokens, e, None if no_drop else 1.25)
    if gib > max_gib:
        return Candidate(name, None, None, f"one-hot dispatch {gib:.1f} GiB")
    build = build_mixture_of_experts if package == "mixture-of-experts" else build_st_moe
    module = build(d, h, e, k, no_drop)

    def call(x: Tensor) -> tuple[Tensor, Tensor]:
        out, aux, *_ = module(x.unsqueeze(0))
        return out.squeeze(0), aux

    return Candidate(name, module, call)


def build_mixture_of_experts(d: int, h: int, e: int, k: int, no_drop: bool) -> nn.Module:
    """mixture-of-experts 0.2.3 (top-2 gating; ``second_policy="none"`` makes it top-1).

    No drop: capacity factor ``e`` gives capacity = all tokens, policy ``all`` keeps every
    second choice. Defaults: capacity factor 1.25, second choice kept at random.
    """
    from mixture_of_experts import MoE as PeerMoE

    policy = "none" if k == 1 else ("all" if no_drop else "random")
    factor = float(e) if no_drop else 1.25
    return PeerMoE(
        dim=d,
        num_experts=e,
        hidden_dim=h,
        activation=nn.GELU,
        second_policy_train=policy,
        second_policy_eval=policy,
        capacity_factor_train=factor,
        capacity_factor_eval=factor,
    )


def build_st_moe(d: int, h: int, e: int, k: int, no_drop: bool) -> nn.Module:
    """st-moe-pytorch 0.1.8 with plain ``d -> h -> d`` GELU experts (its default expert is a
    GEGLU of another width; ours is the same as the other implementations').

    No drop: capacity factor ``e`` and a near-zero second-choice threshold (always routed).
    """
    extra = {"capacity_factor_train": float(e), "threshold_train": 1e-9} if no_drop else {}
    with warnings.catch_warnings():  # its beartype hints warn about typing.Tuple
        warnings.simplefilter("ignore")
        from st_moe_pytorch import MoE as PeerMoE

        return PeerMoE(
            dim=d,
            num_experts=e,
            gating_top_n=k,
            experts=nn.ModuleList(dense_ffn(d, h) for _ in range(e)),
            **extra,
        )


@dataclass
class Setup:
    """What every size of one run shares."""

    router: str = "noisy_topk"
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    compiled: bool = False
    max_gib: float = 2.0


def candidates(d: int, h: int, e: int, k: int, tokens: int, setup: Setup) -> list[Candidate]:
    found = [ours(d, h, e, k, setup.router), dense(d, h, k)]
    if setup.compiled:
        found += [ours(d, h, e, k, setup.router, compiled=True), dense(d, h, k, compiled=True)]
    for package in PEERS:
        for no_drop in (True, False):
            c = peer(package, d, h, e, k, tokens, no_drop, setup.max_gib)
            if c.skip is None and (setup.dtype != torch.float32 or setup.device.type != "cpu"):
                c = Candidate(c.name, None, None, "float32 on CPU only")
            found.append(c)
    for c in found:
        if c.module is not None:
            c.module.to(setup.device, setup.dtype)
    return found


def time_rounds(
    runnable: list[Candidate], x: Tensor, repeats: int, warmup: int
) -> dict[str, dict[str, float]]:
    """Median seconds of forward (``no_grad``) and forward+backward per candidate (and, on
    CUDA, the largest ``peak_mib`` of its forward + backward).

    All modules in training mode. Each round calls every candidate once, in turn.
    """
    times: dict[str, dict[str, list[float]]] = {
        c.name: {"fwd": [], "fwd_bwd": [], "peak_mib": []} for c in runnable
    }
    for i in range(warmup + repeats):
        for c in runnable:
            measured = time_once(c, x)
            if i >= warmup:
                for metric, value in measured.items():
                    times[c.name][metric].append(value)
    return {
        n: {m: statistics.median(v) if m != "peak_mib" else max(v) for m, v in t.items() if v}
        for n, t in times.items()
    }


def clock(device: torch.device) -> float:
    """Seconds: CUDA wall time after a sync; on CPU the process CPU time (see the module doc)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


def time_once(c: Candidate, x: Tensor) -> dict[str, float]:
    assert c.module is not None and c.call is not None
    c.module.train()
    c.module.zero_grad(set_to_none=True)
    with torch.no_grad():
        t0 = clock(x.device)
        c.call(x)
        fwd = clock(x.device) - t0
    if x.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(x.device)
    t0 = clock(x.device)
    out, aux = c.call(x)
    (out.float().square().mean() + aux).backward()
    measured = {"fwd": fwd, "fwd_bwd": clock(x.device) - t0}
    if x.device.type == "cuda":
        measured["peak_mib"] = torch.cuda.max_memory_allocated(x.device) / 2**20
    return measured


def measure_size(
    d: int, h: int, e: int, k: int, tokens: int, repeats: int, warmup: int, setup: Setup
) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    found = candidates(d, h, e, k, tokens, setup)
    x = torch.randn(tokens, d, device=setup.device, dtype=setup.dtype)
    runnable = [c for c in found if c.skip is None]
    medians = time_rounds(runnable, x, repeats, warmup)
    dtype = str(setup.dtype).removeprefix("torch.")
    size = {"dtype": dtype, "d": d, "h": h, "experts": e, "k": k, "tokens": tokens}
    return [
        {
            **size,
            "impl": c.name,
            "skip": c.skip,
            **medians.get(c.name, {"fwd": None, "fwd_bwd": None}),
        }
        for c in found
    ]


def run(
    experts: list[int],
    ks: list[int],
    tokens: list[int],
    *,
    d: int = 256,
    h: int = 1024,
    repeats: int = 5,
    warmup: int = 2,
    threads: int = 2,
    max_gib: float = 2.0,
    router: str = "noisy_topk",
    dtypes: tuple[str, ...] = ("float32",),
    device: str = "cpu",
    compiled: bool = False,
    out: Path | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every dtype and size, one after another; JSON and table rewritten after each size."""
    torch.set_num_threads(threads)
    result: dict[str, Any] = {
        "machine": machine()
        + (f", {torch.cuda.get_device_name(device)}" if "cuda" in device else ""),
        "threads": threads,
        "repeats": repeats,
        "warmup": warmup,
        "router": router,
        "clock": "CUDA wall time" if "cuda" in device else "process CPU time",
        "rows": [],
    }
    for name in dtypes:
        setup = Setup(router, getattr(torch, name), torch.device(device), compiled, max_gib)
        for e, k, t in ((e, k, t) for e in experts for k in ks for t in tokens if k <= e):
            result["rows"] += measure_size(d, h, e, k, t, repeats, warmup, setup)
            echo(f"{name} experts={e} k={k} tokens={t} done")
            if out is not None:
                write(result, out, table)
    return result


def table(result: dict[str, Any]) -> str:
    """Markdown: a forward + backward table, then a forward-only table."""
    head = (
        f"{result['machine']}, {result['threads']} threads, training mode, router "
        f"{result.get('router', 'softmax_topk')}, {result.get('clock', 'wall time')}, median of "
        f"{result['repeats']} interleaved rounds after {result['warmup']} warm-up. `neuroplex` in "
        "ms; `vs dense` = dense FFN time ÷ ours (≥ 1: as fast as the dense FFN; compiled: "
        "compiled dense ÷ compiled ours); the peers as their time ÷ ours (> 1: slower than ours)."
    )
    return metric_sections(head, lambda metric: metric_table(result, metric))


def metric_table(result: dict[str, Any], metric: str) -> str:
    names = list(dict.fromkeys(r["impl"] for r in result["rows"]))
    mine_names = ("neuroplex", "dense FFN", "neuroplex" + COMPILED, "dense FFN" + COMPILED)
    compiled = "neuroplex" + COMPILED in names
    others = [n for n in names if n not in mine_names]
    extra = " compiled (ms) | compiled vs dense |" if compiled else ""
    lines = [
        "| dtype | experts | k | tokens | neuroplex (ms) | vs dense |"
        + extra
        + "".join(f" {n} |" for n in others),
        "|---" * (6 + 2 * compiled + len(others)) + "|",
    ]
    groups: dict[tuple, dict[str, dict]] = {}
    for r in result["rows"]:
        key = (r.get("dtype", "float32"), r["experts"], r["k"], r["tokens"])
        groups.setdefault(key, {})[r["impl"]] = r
    for key, rows in groups.items():
        cells = [str(v) for v in key] + _versus(rows, "", metric)
        if compiled:
            cells += _versus(rows, COMPILED, metric)
        mine = rows["neuroplex"][metric]
        cells += [_relative(rows.get(n), metric, mine) for n in others]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _versus(rows: dict[str, dict], suffix: str, metric: str) -> list[str]:
    """Our time in ms and the dense FFN's time ÷ ours, both with ``suffix``."""
    mine = rows["neuroplex" + suffix][metric]
    return [f"{1000 * mine:.1f}", f"{rows['dense FFN' + suffix][metric] / mine:.2f}"]


def _relative(row: dict | None, metric: str, mine: float) -> str:
    if row is None:
        return "—"
    if row["skip"] is not None:
        return f"— ({row['skip']})"
    return f"{row[metric] / mine:.1f}×"
