"""Plasticity: rewiring the sparse layers during training, as a callback of the one loop.

Every ``every`` steps (until ``end_step``), each SparseLinear swaps a fraction ζ of its
connections; ζ starts at ``fraction`` and is cosine-annealed to 0 at ``end_step`` (RigL's
schedule). Kinds (``train.plasticity.kind``):

- ``set`` (SET): drop the ζ·active connections of smallest |w|, regrow as many at random among
  the connections that were inactive;
- ``rigl`` (RigL): the same drop, regrow where the dense gradient |dL/dW| of the last training
  batch is largest;
- ``hebbian`` (G2GNet): per ensemble pair, the mean |correlation| between its input units'
  activations (the layer input) and its output units' (the layer output, before the norm) on
  a probe batch; drop the least co-active connected pairs, add the most co-active unconnected
  ones (correlating ensemble *means* instead did worse: 77.6% vs 84.6% on MNIST-1D, 2000
  steps, seed 0 — a mean over units of mixed-sign weights hides what its units do);
- ``block_set`` / ``block_rigl``: ``set`` / ``rigl`` on whole ensemble pairs, scored by block
  RMS of the weight and of the dense gradient; the wiring stays block-structured.

Grown connections start at weight **zero** with zeroed optimizer moments, for every kind: the
network computes the same function right after an event (no loss spike), and the regrown
weights then grow only as fast as their gradient says (RigL's choice; SET's small random init
would add noise the magnitude criterion then has to undo). Unit-level kinds turn a layer into
a unit mask (masked-dense path); ensemble-level kinds keep a block wiring, and the layer takes
whichever path :func:`~neuroplex.layers.sparse_plan.choose_path` picks for it.

Randomness comes from (seed, step, layer), so a resumed run rewires exactly like an
uninterrupted one without saved generator state. Events are appended to ``plasticity.jsonl``
in the run directory (rank 0). Shape legend: ``b`` batch, ``n_in`` / ``n_out`` units.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from neuroplex.config import BLOCK_KINDS, Config, PlasticityConfig
from neuroplex.data import Split
from neuroplex.errors import ConfigError
from neuroplex.files import append_jsonl
from neuroplex.layers.sparse import SparseLinear
from neuroplex.train.parallel import World
from neuroplex.train.rewiring import (
    apply_wiring,
    block_rms,
    block_swap,
    ensemble_coactivation,
    owner,
    pairs_wiring,
    sparse_layers,
    unit_swap,
)
from neuroplex.wiring import Wiring

LOG = "plasticity.jsonl"


class NullPlasticity:
    """Plasticity switched off."""

    def after_step(self, step: int, run_dir: Path) -> list[dict[str, Any]]:
        return []


class GradientCapture:
    """Keeps each layer's input ``[b, n_in]`` and output gradient ``[b, n_out]`` from the last
    training step (forward hooks), so the dense weight gradient needs no extra pass."""

    def __init__(self, layers: dict[str, SparseLinear]) -> None:
        self.inputs: dict[str, Tensor] = {}
        self.grads: dict[str, Tensor] = {}
        for name, layer in layers.items():
            layer.register_forward_hook(lambda m, args, out, name=name: self._keep(name, args, out))

    def _keep(self, name: str, args: tuple, out: Tensor) -> None:
        if not out.requires_grad:  # evaluation and probes
            return
        self.inputs[name] = args[0].detach()
        out.register_hook(lambda grad: self.grads.__setitem__(name, grad.detach()))

    def dense_grad(self, name: str, layer: SparseLinear) -> Tensor:
        """dL/dW of the full ``[n_out, n_in]`` weight, connected or not."""
        x = self.inputs[name].reshape(-1, layer.in_features)
        return self.grads[name].reshape(-1, layer.out_features).t() @ x


class Plasticity:
    """Rewires ``model``'s SparseLinear layers every ``cfg.every`` steps (module docstring).

    Args:
        cfg: the plasticity section.
        seed: the run's seed.
        model: the network (its SparseLinear layers are rewired).
        optimizers: every optimizer of the method; each layer's owner gets its moments reset.
        probe: the training split (hebbian draws its probe batches from it).
        total_steps: the run's length (``end_step`` when the config leaves it null).
        world: rank 0 writes the log.
    """

    def __init__(
        self,
        cfg: PlasticityConfig,
        seed: int,
        model: nn.Module,
        optimizers: list[torch.optim.Optimizer],
        probe: Split,
        total_steps: int,
        world: World,
    ) -> None:
        self.cfg, self.seed, self.model, self.probe, self.world = cfg, seed, model, probe, world
        self.end_step = cfg.end_step or total_steps
        self.layers = sparse_layers(model)
        self.owners = {name: owner(layer.weight, optimizers) for name, layer in self.layers.items()}
        rigl = cfg.kind in ("rigl", "block_rigl")
        self.capture = GradientCapture(self.layers) if rigl else None

    def fraction_at(self, step: int) -> float:
        """ζ at ``step``: ``fraction * (1 + cos(pi * step / end_step)) / 2``, 0 from end_step."""
        if step >= self.end_step:
            return 0.0
        return self.cfg.fraction * 0.5 * (1.0 + math.cos(math.pi * step / self.end_step))

    def after_step(self, step: int, run_dir: Path) -> list[dict[str, Any]]:
        """Rewire if ``step`` (completed steps) is an event; log and return the events."""
        zeta = self.fraction_at(step)
        if step % self.cfg.every or zeta == 0.0:
            return []
        acts = self._probe(step) if self.cfg.kind == "hebbian" else {}
        events = []
        for index, (name, layer) in enumerate(self.layers.items()):
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 1009 + index)
            event = self._rewire(name, layer, zeta, gen, acts.get(name))
            if event is not None:
                events.append({"step": step, "layer": name, "kind": self.cfg.kind, **event})
        if self.world.is_main:
            for event in events:
                append_jsonl(run_dir / LOG, event)
        return events

    def _rewire(
        self, name: str, layer: SparseLinear, zeta: float, gen: torch.Generator, acts
    ) -> dict[str, Any] | None:
        """One layer's swap; the event record, or None when nothing changed."""
        before = layer.wiring
        if self.cfg.kind in BLOCK_KINDS:
            wiring, detail = self._block_wiring(name, layer, zeta, gen, acts)
        else:
            wiring, detail = self._unit_wiring(name, layer, zeta, gen)
        if wiring is None:
            return None
        apply_wiring(layer, wiring, self.owners[name])
        density = {"density_before": before.density, "density_after": wiring.density}
        return {**detail, **density, "path": layer.path}

    def _unit_wiring(self, name: str, layer: SparseLinear, zeta: float, gen: torch.Generator):
        mask = torch.as_tensor(layer.wiring.to_mask())
        n = math.ceil(zeta * int(mask.sum()))
        if self.capture is None:
            score = torch.rand(mask.shape, generator=gen)
        else:
            score = self.capture.dense_grad(name, layer).detach().abs().cpu()
        magnitude = layer.dense_weight().detach().abs().cpu()
        pruned, grown = unit_swap(magnitude, mask, score, n)
        if len(pruned) == 0:
            return None, {}
        new = mask.flatten().clone()
        new[pruned], new[grown] = False, True
        w = layer.wiring
        wiring = Wiring(w.in_sizes, w.out_sizes, unit_mask=new.view_as(mask).numpy())
        return wiring, {"pruned": len(pruned), "grown": len(grown)}

    def _block_wiring(self, name, layer: SparseLinear, zeta: float, gen: torch.Generator, acts):
        w = layer.wiring
        n = math.ceil(zeta * len(w.block_pairs))
        shape = (len(w.out_sizes), len(w.in_sizes))
        if self.cfg.kind == "hebbian":
            prune = grow = ensemble_coactivation(*acts, w)
        else:
            prune = block_rms(layer.dense_weight(), w)
            if self.capture is None:
                grow = torch.rand(shape, generator=gen, dtype=torch.float64).numpy()
            else:
                grow = block_rms(self.capture.dense_grad(name, layer), w)
        pruned, grown = block_swap(w, prune, grow, n)
        if not pruned:
            return None, {}
        units = sum(w.in_sizes[i] * w.out_sizes[j] for i, j in pruned)
        detail = {"pruned": units, "grown": units}  # unit connections, as for the unit kinds
        detail |= {
            "pruned_pairs": [list(p) for p in pruned],
            "grown_pairs": [list(p) for p in grown],
        }
        return pairs_wiring(w, pruned, grown), detail

    @torch.no_grad()
    def _probe(self, step: int) -> dict[str, tuple[Tensor, Tensor]]:
        """Input and output ``([p, n_in], [p, n_out])`` of every layer on ``probe_size`` training
        samples drawn by (seed, step), in eval mode (no dropout, no random state used)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        idx = torch.randperm(len(self.probe), generator=gen)[: self.cfg.probe_size]
        acts: dict[str, tuple[Tensor, Tensor]] = {}
        hooks = [
            layer.register_forward_hook(lambda m, a, out, n=name: acts.__setitem__(n, (a[0], out)))
            for name, layer in self.layers.items()
        ]
        was_training = self.model.training
        self.model.eval()
        try:
            self.model(self.probe.inputs(idx.to(self.probe.x.device)))
        finally:
            self.model.train(was_training)
            for hook in hooks:
                hook.remove()
        return acts


def build_plasticity(
    cfg: Config,
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    train: Split,
    total_steps: int,
    world: World,
) -> Plasticity | NullPlasticity:
    """The run's plasticity callback (a do-nothing one when ``train.plasticity`` is null)."""
    plasticity = cfg.train.plasticity
    if plasticity is None:
        return NullPlasticity()
    if world.size > 1:
        raise ConfigError(
            f"train.plasticity: rewiring runs on one process only, this run has {world.size} "
            "ranks; set train.plasticity: null or train on one process"
        )
    return Plasticity(plasticity, cfg.seed, model, optimizers, train, total_steps, world)
