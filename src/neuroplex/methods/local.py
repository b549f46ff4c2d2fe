"""Method ``local``: each stage trained by its own gradient-isolated auxiliary network.

Per batch, stage by stage: detach the input, forward the stage, its auxiliary network's loss,
backward, optimizer step, free. Only one stage's graph is alive at a time — that is where the
activation memory goes — and no gradient crosses a stage boundary. The last stage is trained
through the network's real head.

Auxiliary networks (``train.aux.kind``):
- ``linear``: a linear classifier on the stage output (DGL-style);
- ``mlp``: a 2-layer MLP classifier (InfoPro-like);
- ``augmented``: AugLocal — blocks modelled on a uniformly sampled subset of the layers after the
  stage (own parameters, narrowed to ``aux.width``), depth decaying linearly with the stage index
  (``aux.depth_coeff``; layers picked by ``aux.picks``);
- ``momentum``: MAN — ``head(LB(h) + EMA(h))``: a trainable copy and an EMA copy of the next
  stage's first layer, then the ``mlp`` classifier.

Shape legend: ``b`` batch, ``d`` stage width, ``c`` classes.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neuroplex.config import AuxConfig, Config, DenseStageConfig
from neuroplex.distributed.parallel import data_parallel
from neuroplex.layers import DenseBlock, DenseStage, StageOutput
from neuroplex.network import ACTIVATIONS, NORMS, Network, run_stage
from neuroplex.train.checkpoint import (
    load_module_state,
    load_optimizer_state,
    optimizer_state,
)
from neuroplex.train.method import StepResult
from neuroplex.train.optim import build_optimizer, set_lr
from neuroplex.train.precision import Precision


def redrawn_copy(layer: nn.Module) -> nn.Module:
    """A copy of ``layer`` with its weights drawn afresh (masks and shapes kept).

    MAN's reference code deep-copies the next layer and then runs its model-wide weight init over
    every module, so its copies start from their own draws, not from the layer's weights.
    """
    new = copy.deepcopy(layer)
    for module in new.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return new


def first_layer(stage: nn.Module) -> nn.Module:
    """A dense stage's first block; any other stage counts as one layer."""
    return stage[0] if isinstance(stage, DenseStage) else stage


def mlp_head(d_in: int, hidden: int, n_classes: int) -> nn.Module:
    """The InfoPro-like classifier ``[b, d_in] -> [b, c]``: linear, GELU, linear."""
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, n_classes))


class MomentumAux(nn.Module):
    """MAN aux net: ``head(lb(h) + ema(h))``.

    ``lb`` (the "learnable bias") is a trainable copy of the next stage's first layer, trained
    with this stage; ``ema`` is a copy of the same layer whose weights follow the live layer's
    by an exponential moving average (no gradient); ``head`` is the ``mlp`` classifier.

    Shapes: ``[b, d_s] -> [b, c]`` (the copies map ``d_s -> d_next``).
    """

    def __init__(self, next_layer: nn.Module, d_next: int, n_classes: int, aux: AuxConfig):
        super().__init__()
        self.momentum = aux.momentum
        self.lb = redrawn_copy(next_layer)
        self.ema = redrawn_copy(next_layer).requires_grad_(False)
        self.head = mlp_head(d_next, aux.hidden, n_classes)

    def forward(self, h: Tensor) -> Tensor:
        return self.head(run_stage(self.lb, h).x + run_stage(self.ema, h).x)

    @torch.no_grad()
    def update(self, next_layer: nn.Module) -> None:
        """EMA step on the parameters: ``ema = m * ema + (1 - m) * live`` (buffers stay the
        copy's own, as in the reference)."""
        for ema, live in zip(self.ema.parameters(), next_layer.parameters(), strict=True):
            ema.mul_(self.momentum).add_(live, alpha=1.0 - self.momentum)

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}"


def augmented_depth(stage: int, n_stages: int, max_depth: int, coeff: float) -> int:
    """AugLocal's pyramidal depth of stage ``stage``'s aux net (the last stage uses the head).

    With ``t = stage * coeff / (n_stages - 2)``: ``max(1, round(max_depth * (1 - t) + t))``,
    Python's round (half to even) as in the reference: ``max_depth`` at stage 0, decaying
    linearly to ``max_depth - coeff * (max_depth - 1)`` at the second-to-last stage.
    """
    if n_stages <= 2:
        return max_depth
    t = stage * coeff / (n_stages - 2)
    return max(1, round(max_depth * (1 - t) + t))


def augmented_picks(layer: int, n_layers: int, depth: int, rule: str) -> list[int]:
    """Network-wide indices of the later layers an aux net is modelled on, for a stage whose last
    layer is ``layer`` of ``n_layers``; every later layer when ``depth`` covers them all.

    ``end`` (AugLocal's code): ``round(layer + (n_layers - 1 - layer) / depth * i)`` for
    ``i = 1..depth``, uniform steps that end at the last layer. ``spread``: ``depth`` layers
    evenly spaced from the first later layer to the last.
    """
    remaining = n_layers - 1 - layer
    if depth >= remaining:
        return list(range(layer + 1, n_layers))
    if rule == "end":
        return [round(layer + remaining / depth * i) for i in range(1, depth + 1)]
    spaced = np.unique(np.round(np.linspace(0, remaining - 1, depth)).astype(int))
    return [layer + 1 + int(j) for j in spaced]


def network_layers(stage_cfgs: list[Any]) -> list[tuple[str, str]]:
    """(norm, activation) of every layer of the network; a non-dense stage counts as one
    LayerNorm/GELU layer."""
    layers = []
    for cfg in stage_cfgs:
        if isinstance(cfg, DenseStageConfig):
            layers += [(cfg.norm, cfg.activation)] * cfg.layers
        else:
            layers.append(("layernorm", "gelu"))
    return layers


def build_augmented(aux: AuxConfig, stage: int, d_in: int, n_classes: int, stage_cfgs: list[Any]):
    """AugLocal aux net of ``stage``: blocks modelled on the picked later layers (norm and
    activation copied, width ``aux.width``), then a linear classifier. ``[b, d_in] -> [b, c]``."""
    layers = network_layers(stage_cfgs)
    last = len(network_layers(stage_cfgs[: stage + 1])) - 1
    depth = augmented_depth(stage, len(stage_cfgs), aux.max_depth, aux.depth_coeff)
    blocks: list[nn.Module] = []
    d = d_in
    for i in augmented_picks(last, len(layers), depth, aux.picks):
        norm, act = layers[i]
        blocks.append(DenseBlock(d, aux.width, norm_layer=NORMS[norm], act_layer=ACTIVATIONS[act]))
        d = aux.width
    return nn.Sequential(*blocks, nn.Linear(d, n_classes))


def build_aux(
    aux: AuxConfig, stage: int, d_in: int, n_classes: int, model: Network, stage_cfgs: list[Any]
) -> nn.Module:
    """The auxiliary classifier of ``stage`` (``[b, d_in] -> [b, c]``)."""
    if aux.kind == "linear":
        return nn.Linear(d_in, n_classes)
    if aux.kind == "mlp":
        return mlp_head(d_in, aux.hidden, n_classes)
    if aux.kind == "momentum":
        nxt = first_layer(model.stages[stage + 1])
        d_next = nxt.linear.out_features if isinstance(nxt, DenseBlock) else nxt.d_out
        return MomentumAux(nxt, d_next, n_classes, aux)
    return build_augmented(aux, stage, d_in, n_classes, stage_cfgs)


class StageWithHead(nn.Module):
    """A stage and the classifier that trains it: ``[b, d_in] -> (StageOutput, [b, c])``."""

    def __init__(self, stage: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.stage, self.head = stage, head

    def forward(self, h: Tensor) -> tuple[StageOutput, Tensor]:
        out = run_stage(self.stage, h)
        return out, self.head(out.x)


class Local:
    """Local learning: one optimizer per stage over the stage and its aux net (the head's for
    the last stage); the learning-rate schedule is the loop's, applied to every stage."""

    def __init__(self, model: Network, cfg: Config) -> None:
        self.model, self.cfg = model, cfg.train
        n_classes = model.head.out_features
        stage_cfgs = list(cfg.model.stages)
        device = next(model.parameters()).device
        aux = [
            build_aux(cfg.train.aux, s, stage.d_out, n_classes, model, stage_cfgs)
            for s, stage in enumerate(model.stages[:-1])
        ]
        self.aux = nn.ModuleList(aux).to(device)
        pairs = [
            StageWithHead(stage, head)
            for stage, head in zip(model.stages, [*self.aux, model.head], strict=True)
        ]
        self.trainees = [data_parallel(pair) for pair in pairs]
        self.optimizers = [build_optimizer([pair], cfg.train) for pair in pairs]
        self.precision = Precision(cfg.train.precision, device)

    def step(self, x: Tensor, y: Tensor, lr: float) -> StepResult:
        """Train each stage on ``x [b, d]``, ``y [b]`` in turn; return the head's loss."""
        result, _ = self.train_stages(range(len(self.trainees)), x, y, lr)
        return result

    def train_stages(
        self, stages: range, h: Tensor, y: Tensor, lr: float
    ) -> tuple[StepResult, Tensor]:
        """Train ``stages`` (consecutive) in turn on their input ``h [b, d_in]``, ``y [b]``.

        Returns the last stage's loss and correct count (its aux net's, or the head's for the
        network's last stage), every stage's statistics, and its detached output ``[b, d_out]``.
        """
        self.aux.train(self.model.training)
        stats: dict[str, Tensor] = {}
        for s in stages:
            trainee, opt = self.trainees[s], self.optimizers[s]
            with self.precision.autocast():
                out, logits = trainee(h.detach())  # detach: the gradient-isolation boundary
                loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
            set_lr(opt, lr)
            opt.zero_grad(set_to_none=True)
            self.precision.backward(loss + out.aux_loss)
            params = [p for g in opt.param_groups for p in g["params"]]
            self.precision.step(opt, params, self.cfg.grad_clip)
            self.update_momentum(s)
            stats[f"local.stage{s}_loss"] = loss.detach()
            stats.update({f"stage{s}.{k}": v.detach() for k, v in out.stats.items()})
            h = out.x.detach()
        self.precision.update()
        correct = (logits.argmax(dim=1) == y).sum()
        return StepResult(loss.detach(), correct, stats), h

    def update_momentum(self, s: int) -> None:
        """MAN: after stage ``s``'s step, its EMA follows the next stage's first layer as it
        stands before that stage's own step in this batch (the reference's order)."""
        if s < len(self.aux) and isinstance(self.aux[s], MomentumAux):
            self.aux[s].update(first_layer(self.model.stages[s + 1]))

    def modules(self) -> list[nn.Module]:
        return [self.model, self.aux]

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {f"aux.{k}": v for k, v in self.aux.state_dict().items()}
        metas = []
        for s, opt in enumerate(self.optimizers):
            opt_tensors, meta = optimizer_state(opt, f"optim{s}.")
            tensors.update(opt_tensors)
            metas.append(meta)
        return tensors, {"optimizers": metas, "scaler": self.precision.state()}

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        load_module_state(self.aux, tensors, "aux.")
        for s, (opt, opt_meta) in enumerate(zip(self.optimizers, meta["optimizers"], strict=True)):
            load_optimizer_state(opt, tensors, opt_meta, f"optim{s}.")
        self.precision.load_state(meta.get("scaler", {}))
