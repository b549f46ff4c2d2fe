"""Which path a :class:`~neuroplex.wiring.Wiring` runs on in SparseLinear, and the block
structure the block paths need (see neuroplex.layers.sparse for the paths).

Rule (``choose_path``): take the block path while its executed density (dummies and padding
included) is at most ``_density_limit``, else masked-dense. Block-window: 0.75 for blocks of
64+ units, else 0.5; block-gather: 0.5 for blocks of 64+ units, else 0.25.

Re-derived on this machine (2026-12-07, idle 2-core Intel Xeon, torch 2.13, the rewritten
gather kernel; ``neuroplex bench sparse``, 4096x4096, forward + backward with the input
gradient, process CPU time; docs/bench/sparse_rule_t1.md, sparse_rule_t2.md,
sparse_rule_b2048_t2.md). Time relative to ``nn.Linear``, batch 256 with 1 / 2 threads, then
batch 2048 with 2 (blocks of 128 at density 0.75: 1 / 2 threads):

    pattern  s    density  block path (b 256)  masked (b 256)  block / masked (b 2048)
    ring     32   0.75     window 1.17 / 1.20  1.31 / 1.36     1.11 / 1.06    -> masked
    ring     64   0.75     window 1.19 / 1.14  1.36 / 1.35     1.08 / 1.07    -> window
    random   32   0.50     gather 0.89 / 1.19  1.31 / 1.33     1.23 / 1.03    -> masked
    random   64   0.50     gather 0.79 / 0.87  1.32 / 1.35     0.92 / 1.12    -> gather
    random   64   0.75     gather 1.31 / 1.24  1.34 / 1.40     1.42 / 1.04    -> masked
    random   128  0.75     gather 1.14 / 1.02  1.31 / 1.37     1.05-1.12 / 1.04-1.06 -> masked

A limit is raised only where the block path wins at both batch sizes: the gather path now
runs blocks of 64 up to density 0.5 (it was 0.25; on the AMD machine of 2 Dec, with the old
kernel, it lost there at batch 2048). Window at blocks of 32 and gather at blocks of 128, both
at density 0.75, win by 12-25% at batch 256 and lose by up to 6% at batch 2048, so those
limits stay. Below every limit the block path won in every cell measured, or tied within 1%
(window at blocks of 64, density 0.75, batch 2048: 1.08 against 1.07).

Shape legend: ``g`` ensembles (blocks) per side, ``s`` block size, ``k`` input blocks per
output block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neuroplex.wiring import Wiring, WiringError

PATHS = ("auto", "dense", "masked-dense", "block-window", "block-gather")


@dataclass(frozen=True)
class Blocks:
    """Static block structure of a block path (padded sizes, weight block order)."""

    g_in: int
    g_out: int
    s_in: int
    s_out: int
    k: int  # input blocks per output block (window length / padded fan-in)
    block_in: np.ndarray  # [g_out*k] input ensemble of each weight block, -1 for a dummy
    block_out: np.ndarray  # [g_out*k] output ensemble of each weight block
    order: np.ndarray | None  # [g] cyclic ensemble order (block-window), else None


def _cyclic_order(sets: list[set[int]], g: int) -> np.ndarray | None:
    """An order ``c`` with ``sets[c[q]] == {c[q], ..., c[q+k-1]}`` (indices mod ``g``), or None.

    Tries the order found by following each ensemble's successor (the member ``i`` of its set
    whose own set holds the rest), then the identity; returns the first that verifies.
    """
    k = len(sets[0])
    if any(len(s) != k for s in sets):
        return None
    candidates = [np.arange(g)]
    succ = [[i for i in s - {j} if s - {j} <= sets[i]] for j, s in enumerate(sets)]
    if 1 < k < g and all(len(c) == 1 for c in succ):
        order = [0]
        for _ in range(g - 1):
            order.append(succ[order[-1]][0])
        if len(set(order)) == g:  # one cycle through every ensemble
            candidates.insert(0, np.array(order))
    for order in candidates:
        if all(sets[order[q]] == {int(order[(q + t) % g]) for t in range(k)} for q in range(g)):
            return order
    return None


def block_plan(wiring: Wiring, window: bool) -> Blocks | None:
    """Block structure for the window path (None if it does not apply) or the gather path."""
    g_in, g_out = len(wiring.in_sizes), len(wiring.out_sizes)
    sets: list[set[int]] = [set() for _ in range(g_out)]
    for i, j in wiring.block_pairs:
        sets[j].add(i)
    sizes = (g_in, g_out, max(wiring.in_sizes), max(wiring.out_sizes))
    if window:
        order = _cyclic_order(sets, g_out) if g_in == g_out else None
        if order is None:
            return None
        k = len(sets[0])
        pos = np.arange(g_out)[:, None] + np.arange(k)[None]  # [g, k] input positions
        return Blocks(*sizes, k, order[pos % g_in].ravel(), np.repeat(order, k), order)
    k = max(len(s) for s in sets)
    block_in = np.full((g_out, k), -1)
    for j, s in enumerate(sets):
        block_in[j, : len(s)] = sorted(s, key=lambda i, j=j: ((i - j) % g_in, i))
    return Blocks(*sizes, k, block_in.ravel(), np.repeat(np.arange(g_out), k), None)


def choose_path(wiring: Wiring) -> str:
    """The path ``SparseLinear(path="auto")`` takes for ``wiring`` (see the module docstring)."""
    return _auto(wiring)[0]


def resolve_path(wiring: Wiring, requested: str = "auto") -> tuple[str, str]:
    """The path ``wiring`` runs on given the layer's ``path`` argument ``requested``, and why:
    e.g. ``"block-gather: 8 blocks of 5x32, 1 per output ensemble"`` or ``"masked-dense:
    unit-level mask (not block-structured)"`` (a forced path says so)."""
    path = checked_path(wiring, requested)
    if requested == "auto":
        return _auto(wiring)
    forced = f"(forced by path={requested!r})"
    if path.startswith("block"):
        return (
            path,
            f"{_blocks_text(path, block_plan(wiring, window=path == 'block-window'))} {forced}",
        )
    return path, f"{path} {forced}"


def _auto(wiring: Wiring) -> tuple[str, str]:
    """``(path, reason)`` of the "auto" rule (module docstring)."""
    if wiring.density == 1.0:
        return "dense", "dense: density 1"
    if not wiring.is_block:
        return "masked-dense", "masked-dense: unit-level mask (not block-structured)"
    blocks = block_plan(wiring, window=True)
    path = "block-gather" if blocks is None else "block-window"
    blocks = blocks or block_plan(wiring, window=False)
    work = len(blocks.block_in) * blocks.s_in * blocks.s_out  # dummies and padding included
    executed = work / (wiring.n_in * wiring.n_out)
    limit = _density_limit(path, min(blocks.s_in, blocks.s_out))
    size = f"{blocks.s_in}x{blocks.s_out}"
    if executed > limit:
        dummies = int((blocks.block_in < 0).sum())
        pads = f" ({dummies} dummy blocks pad unequal fan-in to {blocks.k})" if dummies else ""
        return "masked-dense", (
            f"masked-dense: {path} with blocks of {size} would execute density {executed:.3g}"
            f"{pads}, above {limit}, where masked-dense measured faster"
        )
    return path, _blocks_text(path, blocks)


def _blocks_text(path: str, blocks: Blocks) -> str:
    real = int((blocks.block_in >= 0).sum())  # dummies left out
    size = f"{blocks.s_in}x{blocks.s_out}"
    return f"{path}: {real} blocks of {size}, up to {blocks.k} per output ensemble"


def _density_limit(path: str, s: int) -> float:
    """Highest executed density at which ``path`` with blocks of ``s`` units still beat
    masked-dense in the benchmark (module docstring)."""
    if path == "block-window":
        return 0.75 if s >= 64 else 0.5
    return 0.5 if s >= 64 else 0.25  # block-gather


def checked_path(wiring: Wiring, path: str) -> str:
    """The path to run: ``choose_path`` for "auto", else ``path`` once checked to fit."""
    if path not in PATHS:
        raise WiringError(f"path {path!r} is unknown; use one of {', '.join(PATHS)}.")
    if path == "auto":
        return choose_path(wiring)
    if path.startswith("block") and not wiring.is_block:
        raise WiringError(f"path {path!r} needs a block wiring; this one has a unit mask.")
    if path == "block-window" and block_plan(wiring, window=True) is None:
        raise WiringError(
            "path 'block-window' needs every output ensemble to read consecutive ensembles "
            "of one cyclic order starting at its own; use 'block-gather' for this wiring."
        )
    if path == "dense" and wiring.density < 1.0:
        raise WiringError(f"path 'dense' needs density 1; this wiring has {wiring.density:.4g}.")
    return path


def columns(sizes: tuple[int, ...], block: int) -> np.ndarray:
    """Padded column of each unit: unit ``r`` of ensemble ``e`` sits at ``e * block + r``."""
    return np.concatenate([e * block + np.arange(n) for e, n in enumerate(sizes)])


def fan_in(wiring: Wiring) -> np.ndarray:
    """Real fan-in of each output unit, ``[n_out]``."""
    if not wiring.is_block:
        return wiring.unit_mask.sum(1).astype(np.float64)
    per = np.zeros(len(wiring.out_sizes))
    for i, j in wiring.block_pairs:
        per[j] += wiring.in_sizes[i]
    return np.repeat(per, wiring.out_sizes)
