"""Plasticity: rewiring the sparse layers during training, as a callback of the one loop.

Every ``every`` steps (until ``end_step``), each SparseLinear and SparseConv drops a fraction ζ
of its connections and grows as many; ζ starts at ``fraction`` and is cosine-annealed to 0 at
``end_step`` (RigL's schedule). Kinds (``train.plasticity.kind``):

- ``set`` (SET): drop ζ of the positive and ζ of the negative weights, each sign's closest to
  zero (the thresholds of SET's reference ``rewireMask``, which also drops weights that are
  exactly zero), and regrow as many at random;
- ``rigl`` (RigL): drop the ζ·active connections of smallest |w|, regrow where the dense
  gradient |dL/dW| of the last training batch is largest;
- ``hebbian`` (G2GNet): per ensemble pair, the mean |correlation| between its input units'
  activations (the layer input) and its output units' activations (``hebbian_output``:
  after the block's norm and activation; ``linear``, the layer's own output, is the older
  rule) on a probe batch; drop the least co-active connected pairs and give each output
  ensemble the most co-active pair it lacks (correlating ensemble *means* instead did worse:
  77.6% vs 84.6% on MNIST-1D, 2000 steps, seed 0 — a mean over units of mixed-sign weights
  hides what its units do);
- ``block_set`` / ``block_rigl``: ``set`` / ``rigl`` on whole ensemble pairs, scored by block
  RMS of the weight and of the dense gradient.

``prune_rule`` swaps the drop rule of ``set`` / ``rigl`` (``sign_split`` / ``magnitude``).
The regrowth candidates of every kind but ``hebbian`` include the connections the same event
just dropped, as in RigL (``sparse_optimizers.py``: grow scores are masked only by the kept
connections) and SET's reference: one put straight back keeps its weight and moments (RigL's
``reinit_when_same=False``; SET's reference draws a new weight for it). ``hebbian`` always
replaces what it drops (measured better than letting it keep a pair no other pair beats:
docs/benchmarks.md, "Plasticity"). Block kinds swap pairs within an output ensemble, so every
output keeps its fan-in: a block wiring of equal fan-in stays one and keeps its block path.

Grown connections start at weight **zero** with zeroed optimizer moments, for every kind: the
network computes the same function right after an event (no loss spike), and the regrown
weights then grow only as fast as their gradient says (RigL's choice; SET's small random init
would add noise the magnitude criterion then has to undo). Unit-level kinds turn a layer into
a unit mask (masked-dense path); ensemble-level kinds keep a block wiring, and the layer takes
whichever path :func:`~neuroplex.layers.sparse_plan.choose_path` picks for it. An event's
record counts the connections it removed (``pruned``), added (``grown``) and dropped but put
straight back (``regrown``); ``pruned_pairs`` / ``grown_pairs`` list the ensemble pairs that
changed.

On a SparseConv (channel ensembles) the ensemble-level kinds run unchanged on channels: a
block's weight and dense-gradient RMS span its taps, ``hebbian`` correlates spatially averaged
channel activations, and an event's counts are channel pairs (each carries ``k ** n`` weights).
The unit-level kinds are for SparseLinear only (the config says so).

Randomness comes from (seed, step, layer), so a resumed run rewires exactly like an
uninterrupted one without saved generator state. Events are appended to ``plasticity.jsonl``
in the run directory (rank 0): step, layer, kind, pruned / grown connections, density and
``cross_links`` (links between different ensembles, :attr:`Wiring.cross_links`) before and after,
the layer's execution path. Shape legend: ``b`` batch, ``n_in`` / ``n_out`` units.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from neuroplex.config import BLOCK_KINDS, Config, PlasticityConfig
from neuroplex.data.registry import Split
from neuroplex.distributed.parallel import World
from neuroplex.errors import ConfigError
from neuroplex.files import append_jsonl
from neuroplex.layers.conv import ConvBlock
from neuroplex.layers.sparse import SparseLinear
from neuroplex.layers.sparse_conv import SparseConv
from neuroplex.layers.stages import SparseBlock
from neuroplex.plasticity.rewiring import (
    SparseLayer,
    apply_wiring,
    block_rms,
    block_swap,
    ensemble_coactivation,
    owner,
    pairs_wiring,
    sparse_layers,
    unit_drop,
    unit_grow,
)
from neuroplex.wiring import Wiring

LOG = "plasticity.jsonl"
PAPER_PRUNE_RULE = {"set": "sign_split", "rigl": "magnitude"}  # prune_rule: null


class NullPlasticity:
    """Plasticity switched off."""

    def after_step(self, step: int, run_dir: Path) -> list[dict[str, Any]]:
        return []


class GradientCapture:
    """Keeps each layer's input ``[b, n_in]`` (a conv's ``[b, c_in, *s]``) and output gradient
    from the last training step (forward hooks), so the dense weight gradient needs no extra
    pass."""

    def __init__(self, layers: dict[str, SparseLayer]) -> None:
        self.inputs: dict[str, Tensor] = {}
        self.grads: dict[str, Tensor] = {}
        for name, layer in layers.items():
            layer.register_forward_hook(lambda m, args, out, name=name: self._keep(name, args, out))

    def _keep(self, name: str, args: tuple, out: Tensor) -> None:
        if not out.requires_grad:  # evaluation and probes
            return
        self.inputs[name] = args[0].detach()
        out.register_hook(lambda grad: self.grads.__setitem__(name, grad.detach()))

    def dense_grad(self, name: str, layer: SparseLayer) -> Tensor:
        """dL/dW of the full ``[n_out, n_in]`` (a conv's ``[n_out, n_in, *k]``) weight,
        connected or not."""
        if isinstance(layer, SparseConv):
            return layer.weight_grad(self.inputs[name], self.grads[name])
        x = self.inputs[name].reshape(-1, layer.in_features)
        return self.grads[name].reshape(-1, layer.out_features).t() @ x


class Plasticity:
    """Rewires ``model``'s SparseLinear and SparseConv layers every ``cfg.every`` steps (module
    docstring).

    Args:
        cfg: the plasticity section.
        seed: the run's seed.
        model: the network (its sparse layers are rewired).
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
        self.post = post_synaptic(model, self.layers, cfg.hebbian_output)
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
        self, name: str, layer: SparseLayer, zeta: float, gen: torch.Generator, acts
    ) -> dict[str, Any] | None:
        """One layer's swap; the event record, or None when the event dropped nothing."""
        before = layer.wiring
        if self.cfg.kind in BLOCK_KINDS:
            wiring, detail = self._block_wiring(name, layer, zeta, gen, acts)
        else:
            wiring, detail = self._unit_wiring(name, layer, zeta, gen)
        if wiring is None:
            return None
        apply_wiring(layer, wiring, self.owners[name])
        density = {"density_before": before.density, "density_after": wiring.density}
        cross = {"cross_links_before": before.cross_links, "cross_links_after": wiring.cross_links}
        return {**detail, **density, **cross, "path": layer.path}

    def _unit_wiring(self, name: str, layer: SparseLinear, zeta: float, gen: torch.Generator):
        mask = torch.as_tensor(layer.wiring.to_mask())
        if self.capture is None:
            score = torch.rand(mask.shape, generator=gen)
        else:
            score = self.capture.dense_grad(name, layer).detach().abs().cpu()
        rule = self.cfg.prune_rule or PAPER_PRUNE_RULE[self.cfg.kind]
        dropped = unit_drop(layer.dense_weight().detach().cpu(), mask, zeta, rule)
        if len(dropped) == 0:
            return None, {}
        grown = unit_grow(mask, dropped, score)
        new = mask.flatten().clone()
        new[dropped], new[grown] = False, True
        new = new.view_as(mask)
        pruned, added = int((mask & ~new).sum()), int((new & ~mask).sum())
        w = layer.wiring
        wiring = Wiring(w.in_sizes, w.out_sizes, unit_mask=new.numpy())
        return wiring, {"pruned": pruned, "grown": added, "regrown": len(dropped) - pruned}

    def _block_wiring(self, name, layer: SparseLayer, zeta: float, gen: torch.Generator, acts):
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
        dropped, grown = block_swap(w, prune, grow, n, regrow=self.cfg.kind != "hebbian")
        if not dropped:
            return None, {}
        pruned = [p for p in dropped if p not in grown]  # what changed
        added = [p for p in grown if p not in dropped]
        detail = {"pruned": _units(w, pruned), "grown": _units(w, added)}  # unit connections
        detail |= {
            "regrown": _units(w, dropped) - _units(w, pruned),
            "pruned_pairs": [list(p) for p in pruned],
            "grown_pairs": [list(p) for p in added],
        }
        return pairs_wiring(w, dropped, grown), detail

    @torch.no_grad()
    def _probe(self, step: int) -> dict[str, tuple[Tensor, Tensor]]:
        """Pre- and post-synaptic activations ``([p, n_in], [p, n_out])`` (a conv's
        ``[p, c, *s]``) of every layer on
        ``probe_size`` training samples drawn by (seed, step), in eval mode (no dropout, no
        random state used): the layer's input, and the output of :attr:`post`'s module."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        idx = torch.randperm(len(self.probe), generator=gen)[: self.cfg.probe_size]
        pre: dict[str, Tensor] = {}
        post: dict[str, Tensor] = {}
        hooks = []
        for name, layer in self.layers.items():
            hooks.append(
                layer.register_forward_hook(lambda m, a, o, n=name: pre.__setitem__(n, a[0]))
            )
            hooks.append(
                self.post[name].register_forward_hook(
                    lambda m, a, o, n=name: post.__setitem__(n, o)
                )
            )
        was_training = self.model.training
        self.model.eval()
        try:
            self.model(self.probe.inputs(idx.to(self.probe.x.device)))
        finally:
            self.model.train(was_training)
            for hook in hooks:
                hook.remove()
        return {name: (pre[name], post[name]) for name in self.layers}


def _units(wiring: Wiring, pairs: list[tuple[int, int]]) -> int:
    """Unit connections of the ``(input ensemble, output ensemble)`` pairs."""
    return sum(wiring.in_sizes[i] * wiring.out_sizes[j] for i, j in pairs)


def post_synaptic(
    model: nn.Module, layers: dict[str, SparseLayer], signal: str
) -> dict[str, nn.Module]:
    """The module whose output hebbian correlates with each layer's input: with ``signal``
    ``activation``, the activation of the SparseBlock (ConvBlock) holding the layer (after its
    norm, before a ConvBlock's pool; a layer outside a block falls back to its own output);
    with ``linear``, the layer."""
    if signal == "linear":
        return dict(layers)
    acts = {id(m.linear): m.act for m in model.modules() if isinstance(m, SparseBlock)}
    acts |= {id(m.conv): m.act for m in model.modules() if isinstance(m, ConvBlock)}
    return {name: acts.get(id(layer), layer) for name, layer in layers.items()}


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
