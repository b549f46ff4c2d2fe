"""Lottery tickets: iterative magnitude pruning with rewinding (``neuroplex prune``).

From a finished run that kept its weights after epoch ``E`` (``train.save_epochs``), each round
``r = 1..R``:

1. per prunable layer (every Linear / SparseLinear of the stages; the head stays dense), keep
   the ``round(n0 * (1 - rate)**r)`` largest-|w| weights of the previous round's trained layer
   (round 0 = the run itself), ``n0`` being the layer's connections in the run — so after R
   rounds each layer is ``1 - (1 - rate)**R`` sparser than the run, within one weight;
2. rewind every weight of the network to its epoch-``E`` value, the pruned ones to zero;
   dense Linear layers become SparseLinear layers with a unit mask (masked-dense path);
3. retrain with the run's config into ``RUN_DIR/prune/round_r`` (an ordinary run directory)
   from epoch ``E`` to the end, as a ticket rewound to step ``t = E * steps_per_epoch`` trains
   in Frankle et al. (2020) and open_lth (``training/train.py``): the learning-rate schedule
   (warmup included) and the data order continue from step ``t``, the optimizer starts fresh,
   and the round's metrics start at epoch ``E + 1``. ``E = 0`` retrains the whole run.

``RUN_DIR/prune/prune.json`` and ``prune.md`` hold the table of sparsity vs test accuracy.
Shape legend: ``n_out`` / ``n_in`` units of a layer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from neuroplex.config import Config, load_config
from neuroplex.errors import CheckpointError, ConfigError
from neuroplex.files import atomic_write_json, atomic_write_text
from neuroplex.layers.sparse import SparseLinear
from neuroplex.network import Network
from neuroplex.train.checkpoint import load_checkpoint, load_module_state
from neuroplex.train.loop import train
from neuroplex.train.progress import NullProgress
from neuroplex.train.rundir import rewind_path
from neuroplex.train.setup import build_setup
from neuroplex.wiring import Wiring

Masks = dict[str, Tensor]  # layer name -> bool [n_out, n_in]


def prunable_layers(model: Network) -> dict[str, nn.Linear | SparseLinear]:
    """The stages' Linear and SparseLinear layers by module name (the head is not pruned)."""
    return {
        f"stages.{name}": m
        for name, m in model.stages.named_modules()
        if isinstance(m, nn.Linear | SparseLinear)
    }


def dense_weights(model: Network) -> dict[str, Tensor]:
    """``[n_out, n_in]`` effective weight of every prunable layer (zero where masked)."""
    layers = prunable_layers(model)
    return {
        name: (m.dense_weight() if isinstance(m, SparseLinear) else m.weight).detach().clone()
        for name, m in layers.items()
    }


def prune_masks(weights: dict[str, Tensor], masks: Masks, keep: dict[str, int]) -> Masks:
    """Each layer's mask narrowed to its ``keep[name]`` largest-|w| connections."""
    out = {}
    for name, mask in masks.items():
        active = mask.flatten().nonzero().squeeze(1)
        order = torch.argsort(weights[name].abs().flatten()[active], descending=True, stable=True)
        new = torch.zeros(mask.numel(), dtype=torch.bool)
        new[active[order[: keep[name]]]] = True
        out[name] = new.view_as(mask)
    return out


@torch.no_grad()
def apply_ticket(model: Network, masks: Masks, rewind: dict[str, Tensor]) -> None:
    """Load the ``rewind`` weights into ``model`` (as built from the run's config), then make
    every prunable layer a unit-mask SparseLinear keeping only ``masks``' connections."""
    load_module_state(model, rewind, "")
    for name, layer in prunable_layers(model).items():
        if name not in masks:
            continue
        if isinstance(layer, SparseLinear):
            w = layer.wiring
            layer.set_wiring(Wiring(w.in_sizes, w.out_sizes, unit_mask=masks[name].numpy()))
            continue
        wiring = Wiring((layer.in_features,), (layer.out_features,), unit_mask=masks[name].numpy())
        sparse = SparseLinear(
            wiring, layer.bias is not None, device=layer.weight.device, dtype=layer.weight.dtype
        )
        sparse.weight.copy_(layer.weight * sparse.mask)
        if layer.bias is not None:
            sparse.bias.copy_(layer.bias)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, sparse)


class Ticket:
    """``prepare`` callback of :func:`~neuroplex.train.loop.train`: applies the ticket and keeps
    the model, whose trained weights the next round prunes."""

    def __init__(self, masks: Masks, rewind: dict[str, Tensor]) -> None:
        self.masks, self.rewind = masks, rewind
        self.model: Network | None = None

    def __call__(self, model: Network) -> None:
        apply_ticket(model, self.masks, self.rewind)
        self.model = model


def prune_run(
    run_dir: str | Path,
    rounds: int,
    rate: float,
    rewind_epoch: int,
    progress: Callable[[], NullProgress] = NullProgress,
) -> list[dict[str, Any]]:
    """Run ``rounds`` rounds of pruning on ``run_dir`` (module docstring); return the table rows
    (round 0 = the run itself). ``progress`` makes each round's progress reporter."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    _check_arguments(cfg, run_dir, rounds, rate)
    rewind = load_rewind(run_dir, rewind_epoch)
    model = build_setup(cfg).model
    load_module_state(model, load_checkpoint(run_dir, "last").tensors, "model.")
    weights = dense_weights(model)
    masks = connectivity(model)
    n0 = {name: int(mask.sum()) for name, mask in masks.items()}
    rows = [_row(0, run_dir, masks, _summary(run_dir))]
    for r in range(1, rounds + 1):
        keep = {name: round(n * (1.0 - rate) ** r) for name, n in n0.items()}
        masks = prune_masks(weights, masks, keep)
        ticket = Ticket(masks, rewind)
        out = run_dir / "prune" / f"round_{r}"
        summary = train(cfg, out, progress=progress(), prepare=ticket, start_epoch=rewind_epoch)
        weights = dense_weights(ticket.model)
        rows.append(_row(r, out, masks, summary))
    table = {"rewind_epoch": rewind_epoch, "rate": rate, "rows": rows}
    atomic_write_json(run_dir / "prune" / "prune.json", table)
    atomic_write_text(run_dir / "prune" / "prune.md", markdown_table(rows))
    return rows


def connectivity(model: Network) -> Masks:
    """bool ``[n_out, n_in]`` connections of every prunable layer (all of a Linear's)."""
    return {
        name: torch.as_tensor(m.wiring.to_mask())
        if isinstance(m, SparseLinear)
        else torch.ones(m.out_features, m.in_features, dtype=torch.bool)
        for name, m in prunable_layers(model).items()
    }


def run_config(run_dir: Path) -> Config:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"prune {run_dir}: not a run directory (no config.yaml)")
    return load_config(path)


def _check_arguments(cfg: Config, run_dir: Path, rounds: int, rate: float) -> None:
    if cfg.train.plasticity is not None:
        raise ConfigError(
            f"prune {run_dir}: the run rewired its layers (train.plasticity); lottery-ticket "
            "pruning needs a run with a fixed wiring"
        )
    if not (run_dir / "summary.json").is_file():
        raise ConfigError(f"prune {run_dir}: not a finished run (no summary.json)")
    if (run_dir / "prune").exists():
        raise ConfigError(f"prune {run_dir}: {run_dir / 'prune'} exists; remove it to prune again")
    if rounds < 1 or not 0 < rate < 1:
        raise ConfigError(f"--rounds {rounds} --rate {rate}: need rounds >= 1 and 0 < rate < 1")


def load_rewind(run_dir: Path, epoch: int) -> dict[str, Tensor]:
    """The model weights the run kept after ``epoch`` epochs."""
    path = rewind_path(run_dir, epoch)
    if not path.is_file():
        raise CheckpointError(
            f"--rewind-epoch {epoch}: {run_dir} kept no weights after epoch {epoch} (missing "
            f"{path}); train the run with train.save_epochs: [{epoch}]"
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None


def _summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))


def _row(r: int, run_dir: Path, masks: Masks, summary: dict[str, Any]) -> dict[str, Any]:
    total = sum(m.numel() for m in masks.values())
    active = sum(int(m.sum()) for m in masks.values())
    return {
        "round": r,
        "run_dir": str(run_dir),
        "sparsity": 1.0 - active / total,
        "weights": active,
        "layer_sparsity": {n: 1.0 - float(m.float().mean()) for n, m in masks.items()},
        "test_acc": summary.get("test_acc"),
        "test_acc_at_best_val": summary.get("test_acc_at_best_val"),
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Round, sparsity of the prunable layers, remaining weights and test accuracy."""
    lines = ["| round | sparsity | weights | test acc |", "|---:|---:|---:|---:|"]
    for row in rows:
        acc = "n/a" if row["test_acc"] is None else f"{100 * row['test_acc']:.1f}%"
        lines.append(
            f"| {row['round']} | {100 * row['sparsity']:.1f}% | {row['weights']} | {acc} |"
        )
    return "\n".join(lines) + "\n"
