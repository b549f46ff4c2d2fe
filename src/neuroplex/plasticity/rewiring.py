"""Rewiring arithmetic: which connections to prune and regrow, and applying a new wiring to a
SparseLinear or a SparseConv together with its optimizer state. The schedule and the events
live in neuroplex.plasticity.schedule; this file decides and applies one swap.

A SparseConv's units are its channels: its dense weight ``[n_out, n_in, *k]`` carries the
kernel taps after the channel pair, block scores take the RMS over a block's taps too, and
activations ``[p, c, *s]`` are averaged over positions to one value per channel (as the
analysis pools feature maps).

Shape legend: ``n_out`` / ``n_in`` units (channels), ``g_out`` / ``g_in`` ensembles, ``p``
probe samples, ``k`` kernel taps, ``*s`` positions.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from neuroplex.errors import CheckpointError
from neuroplex.layers.sparse import SparseLinear
from neuroplex.layers.sparse_conv import SparseConv
from neuroplex.wiring import Wiring, WiringError

Pair = tuple[int, int]  # (input ensemble, output ensemble)
SparseLayer = SparseLinear | SparseConv


# ---- choosing ------------------------------------------------------------------------------
def unit_drop(weight: Tensor, mask: Tensor, zeta: float, rule: str) -> Tensor:
    """Flat indices of the active connections (``mask``, bool ``[n_out, n_in]``) an event
    drops, by the signed ``weight [n_out, n_in]``:

    - ``magnitude`` (RigL): the ``ceil(zeta * active)`` smallest ``|w|``;
    - ``sign_split`` (SET's reference ``rewireMask``): the ``ceil(zeta * n_pos)`` smallest
      positive weights, the ``ceil(zeta * n_neg)`` negative ones closest to zero, and every
      active weight that is exactly zero (it lies between the reference's two thresholds).
    """
    active = mask.flatten().nonzero().squeeze(1)
    w = weight.flatten()[active]
    if rule == "magnitude":
        n = math.ceil(zeta * len(active))
        return active[torch.argsort(w.abs(), stable=True)[:n]]
    positive, negative = (w > 0).nonzero().squeeze(1), (w < 0).nonzero().squeeze(1)
    smallest = torch.argsort(w[positive], stable=True)[: math.ceil(zeta * len(positive))]
    closest = torch.argsort(w[negative], descending=True, stable=True)
    closest = closest[: math.ceil(zeta * len(negative))]
    drop = torch.cat([positive[smallest], negative[closest], (w == 0).nonzero().squeeze(1)])
    return active[drop.sort().values]


def unit_grow(mask: Tensor, dropped: Tensor, grow_score: Tensor) -> Tensor:
    """Flat indices of ``len(dropped)`` connections to grow: the largest ``grow_score`` (both
    ``[n_out, n_in]``) among those the drop left inactive, the just-dropped ones included —
    RigL and SET's reference both let an event put a connection it dropped straight back."""
    kept = mask.flatten().clone()
    kept[dropped] = False
    free = (~kept).nonzero().squeeze(1)
    best = torch.argsort(grow_score.flatten()[free], descending=True, stable=True)
    return free[best[: len(dropped)]]


def block_swap(
    wiring: Wiring, prune_score: np.ndarray, grow_score: np.ndarray, n: int, regrow: bool
) -> tuple[list[Pair], list[Pair]]:
    """Up to ``n`` connected ensemble pairs to drop, lowest ``prune_score`` first, and for each
    the pair that replaces it *in the same output ensemble*: the highest ``grow_score`` among
    that output's free pairs of the same size in units (scores ``[g_out, g_in]``; ties go to
    the lower index). Free: unconnected and not grown yet, plus with ``regrow`` the ``n``
    dropped pairs themselves (RigL: a swap may put a dropped pair straight back); without it
    a pair with no free replacement is kept and the next weakest one is tried.

    Every output ensemble keeps its fan-in, so a wiring with equal fan-in keeps it (and its
    block path), and the unit-level density stays exactly the same.
    """
    area = np.outer(wiring.out_sizes, wiring.in_sizes)  # [g_out, g_in] units per pair
    connected = np.zeros(area.shape, dtype=bool)
    for i, j in wiring.block_pairs:
        connected[j, i] = True
    order = np.argsort(np.where(connected, prune_score, np.inf), axis=None, kind="stable")
    order = [np.unravel_index(flat, area.shape) for flat in order[: connected.sum()]]
    free = ~connected
    for j, i in order[:n] if regrow else []:
        free[j, i] = True
    pruned, grown = [], []
    for j, i in order:
        candidates = free[j] & (area[j] == area[j, i])
        if len(pruned) == n:
            break
        if not candidates.any():
            continue
        pick = int(np.argmax(np.where(candidates, grow_score[j], -np.inf)))
        free[j, pick] = False
        pruned.append((int(i), int(j)))
        grown.append((pick, int(j)))
    return pruned, grown


def block_rms(dense: Tensor, wiring: Wiring) -> np.ndarray:
    """Root-mean-square of each ``[out ensemble, in ensemble]`` block of ``dense [n_out, n_in]``
    (or ``[n_out, n_in, *k]``: over the block's taps too): ``[g_out, g_in]`` (RMS, not the
    norm, so blocks of different sizes compare fairly)."""
    square = dense.detach().double().square()
    if square.dim() > 2:  # a conv: mean over the taps of each channel pair
        square = square.flatten(2).mean(2)
    return np.sqrt(_block_means(square.cpu().numpy(), wiring))


def ensemble_coactivation(x: Tensor, y: Tensor, wiring: Wiring) -> np.ndarray:
    """Mean |Pearson correlation| over the unit pairs of every (output ensemble, input
    ensemble) block, between input activations ``x [p, n_in]`` and output activations
    ``y [p, n_out]`` on a probe (feature maps ``[p, c, *s]`` averaged over positions first):
    ``[g_out, g_in]``. A constant unit correlates with nothing."""
    xz, yz = _standardized(_pooled(x)), _standardized(_pooled(y))
    return _block_means(np.abs(yz.T @ xz) / len(xz), wiring)  # |corr| [n_out, n_in] -> blocks


def _block_means(a: np.ndarray, wiring: Wiring) -> np.ndarray:
    """Mean of ``a [n_out, n_in]`` over each ensemble block: ``[g_out, g_in]``."""
    rows = np.add.reduceat(a, wiring.out_offsets[:-1], 0)
    sums = np.add.reduceat(rows, wiring.in_offsets[:-1], 1)
    return sums / np.outer(wiring.out_sizes, wiring.in_sizes)


def _pooled(t: Tensor) -> Tensor:
    """``[p, c, *s] -> [p, c]`` (mean over positions); ``[p, n]`` unchanged."""
    return t.flatten(2).mean(2) if t.dim() > 2 else t


def _standardized(t: Tensor) -> np.ndarray:
    a = t.detach().double().cpu().numpy()
    std = a.std(0)
    return np.where(std > 0, (a - a.mean(0)) / np.where(std > 0, std, 1.0), 0.0)


def pairs_wiring(wiring: Wiring, pruned: list[Pair], grown: list[Pair]) -> Wiring:
    """``wiring``'s ensemble pairs minus ``pruned`` plus ``grown``, one edge per pair (hyperedges
    become their pairs: the layer executes pairs anyway)."""
    pairs = (set(wiring.block_pairs) - set(pruned)) | set(grown)
    edges = tuple(((i,), j) for i, j in sorted(pairs, key=lambda p: (p[1], p[0])))
    return Wiring(wiring.in_sizes, wiring.out_sizes, edges)


# ---- applying ------------------------------------------------------------------------------
@torch.no_grad()
def apply_wiring(layer: SparseLayer, wiring: Wiring, optimizer: torch.optim.Optimizer) -> None:
    """Rewire ``layer`` to ``wiring``: surviving connections keep their weight and optimizer
    moments, new ones start at zero weight with zeroed moments (every state tensor shaped like
    the weight: AdamW ``exp_avg`` / ``exp_avg_sq``, SGD ``momentum_buffer``)."""
    state = optimizer.state.get(layer.weight, {})
    shaped = [k for k, v in state.items() if torch.is_tensor(v) and v.shape == layer.weight.shape]
    moments = {k: layer.to_dense(state[k]) for k in shaped}
    old = torch.as_tensor(layer.wiring.to_mask(), device=layer.weight.device)
    layer.set_wiring(wiring)
    kept = old & torch.as_tensor(wiring.to_mask(), device=old.device)
    for k, full in moments.items():
        taps = [1] * (full.dim() - 2)  # a conv's kernel dims
        state[k] = layer.from_dense(full * kept.view(*kept.shape, *taps))


def owner(weight: Tensor, optimizers: list[torch.optim.Optimizer]) -> torch.optim.Optimizer:
    """The optimizer that updates ``weight`` (local learning has one per stage)."""
    for opt in optimizers:
        if any(p is weight for group in opt.param_groups for p in group["params"]):
            return opt
    raise ValueError("no optimizer updates this weight")


# ---- the model's wirings in a checkpoint ---------------------------------------------------
def sparse_layers(model: nn.Module) -> dict[str, SparseLayer]:
    """Every SparseLinear and SparseConv of ``model`` by its module name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseLayer)}


def wiring_state(model: nn.Module) -> dict[str, Any]:
    """JSON-able wiring of every sparse layer (a checkpoint needs it when rewiring changed it)."""
    return {name: json.loads(m.wiring.to_json()) for name, m in sparse_layers(model).items()}


def restore_wirings(model: nn.Module, state: dict[str, Any]) -> None:
    """Rewire ``model``'s sparse layers to the wirings of :func:`wiring_state`, so a freshly
    built model takes a rewired checkpoint's shapes and buffers."""
    layers = sparse_layers(model)
    for name, data in state.items():
        if name not in layers:
            raise CheckpointError(
                f"checkpoint has a wiring for layer {name!r}, which this model lacks; "
                "was it written with another config?"
            )
        try:
            wiring = Wiring.from_json(json.dumps(data), source=f"checkpoint wiring of {name}")
            if wiring != layers[name].wiring:
                layers[name].set_wiring(wiring)
        except WiringError as e:
            raise CheckpointError(str(e)) from None
