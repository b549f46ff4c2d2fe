"""Method ``local``: each stage trained by its own gradient-isolated auxiliary network.

Per batch, stage by stage: detach the input, forward the stage, its auxiliary network's loss,
backward, optimizer step, free. Only one stage's graph is alive at a time — that is where the
activation memory goes — and no gradient crosses a stage boundary. The last stage is trained
through the network's real head.

Auxiliary networks (``train.aux.kind``):
- ``linear``: a linear classifier on the stage output (DGL-style);
- ``mlp``: a 2-layer MLP classifier (InfoPro-like);
- ``augmented``: AugLocal — blocks modelled on a uniformly spaced subset of the layers after the
  stage (own parameters, narrowed to ``aux.width``), depth decaying linearly with the stage index;
- ``momentum``: MAN — an EMA copy of the next stage plus a learnable bias, then a classifier.

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
from neuroplex.layers import DenseBlock, StageOutput
from neuroplex.network import ACTIVATIONS, NORMS, Network, run_stage
from neuroplex.train.checkpoint import (
    load_module_state,
    load_optimizer_state,
    optimizer_state,
)
from neuroplex.train.method import StepResult
from neuroplex.train.optim import build_optimizer, set_lr
from neuroplex.train.parallel import data_parallel


class MomentumAux(nn.Module):
    """MAN aux net: ``classifier(ema_stage(h) + bias)``; ``ema_stage`` follows the next stage.

    Shapes: ``[b, d_s] -> [b, c]``.
    """

    def __init__(self, next_stage: nn.Module, d_next: int, n_classes: int, momentum: float):
        super().__init__()
        self.momentum = momentum
        self.ema = copy.deepcopy(next_stage).requires_grad_(False)
        self.bias = nn.Parameter(torch.zeros(d_next))
        self.classifier = nn.Linear(d_next, n_classes)

    def forward(self, h: Tensor) -> Tensor:
        return self.classifier(run_stage(self.ema, h).x + self.bias)

    @torch.no_grad()
    def update(self, next_stage: nn.Module) -> None:
        """EMA step: ``ema = m * ema + (1 - m) * next`` (buffers such as norm stats copied)."""
        for ema, live in zip(self.ema.parameters(), next_stage.parameters(), strict=True):
            ema.lerp_(live, 1.0 - self.momentum)
        for ema, live in zip(self.ema.buffers(), next_stage.buffers(), strict=True):
            ema.copy_(live)

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}"


def augmented_depth(stage: int, n_stages: int, max_depth: int) -> int:
    """AugLocal depth of stage ``stage``'s aux net: ``max_depth`` at stage 0, decaying linearly
    to 1 at the second-to-last stage (the last stage uses the head)."""
    if n_stages <= 2:
        return max_depth
    return 1 + round((max_depth - 1) * (n_stages - 2 - stage) / (n_stages - 2))


def later_layers(stage_cfgs: list[Any], stage: int) -> list[tuple[str, str]]:
    """(norm, activation) of every layer after ``stage``; non-dense stages count as one
    LayerNorm/GELU layer."""
    layers = []
    for cfg in stage_cfgs[stage + 1 :]:
        if isinstance(cfg, DenseStageConfig):
            layers += [(cfg.norm, cfg.activation)] * cfg.layers
        else:
            layers.append(("layernorm", "gelu"))
    return layers


def build_aux(
    aux: AuxConfig, stage: int, d_in: int, n_classes: int, model: Network, stage_cfgs: list[Any]
) -> nn.Module:
    """The auxiliary classifier of ``stage`` (``[b, d_in] -> [b, c]``)."""
    if aux.kind == "linear":
        return nn.Linear(d_in, n_classes)
    if aux.kind == "mlp":
        return nn.Sequential(
            nn.Linear(d_in, aux.hidden), nn.GELU(), nn.Linear(aux.hidden, n_classes)
        )
    if aux.kind == "momentum":
        nxt = model.stages[stage + 1]
        return MomentumAux(nxt, nxt.d_out, n_classes, aux.momentum)
    candidates = later_layers(stage_cfgs, stage)
    depth = min(augmented_depth(stage, len(stage_cfgs), aux.max_depth), len(candidates))
    picks = np.unique(np.round(np.linspace(0, len(candidates) - 1, depth)).astype(int))
    blocks: list[nn.Module] = []
    d = d_in
    for i in picks:
        norm, act = candidates[i]
        blocks.append(DenseBlock(d, aux.width, norm_layer=NORMS[norm], act_layer=ACTIVATIONS[act]))
        d = aux.width
    return nn.Sequential(*blocks, nn.Linear(d, n_classes))


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

    def step(self, x: Tensor, y: Tensor, lr: float) -> StepResult:
        """Train each stage on ``x [b, d]``, ``y [b]`` in turn; return the head's loss."""
        result, _ = self.train_stages(range(len(self.trainees)), x, y, lr)
        for s, aux in enumerate(self.aux):
            if isinstance(aux, MomentumAux):
                aux.update(self.model.stages[s + 1])
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
            out, logits = trainee(h.detach())  # detach: the gradient-isolation boundary
            loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
            set_lr(opt, lr)
            opt.zero_grad(set_to_none=True)
            (loss + out.aux_loss).backward()
            if self.cfg.grad_clip is not None:
                params = [p for g in opt.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
            opt.step()
            stats[f"local.stage{s}_loss"] = loss.detach()
            stats.update({f"stage{s}.{k}": v.detach() for k, v in out.stats.items()})
            h = out.x.detach()
        correct = (logits.argmax(dim=1) == y).sum()
        return StepResult(loss.detach(), correct, stats), h

    def modules(self) -> list[nn.Module]:
        return [self.model, self.aux]

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {f"aux.{k}": v for k, v in self.aux.state_dict().items()}
        metas = []
        for s, opt in enumerate(self.optimizers):
            opt_tensors, meta = optimizer_state(opt, f"optim{s}.")
            tensors.update(opt_tensors)
            metas.append(meta)
        return tensors, {"optimizers": metas}

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        load_module_state(self.aux, tensors, "aux.")
        for s, (opt, opt_meta) in enumerate(zip(self.optimizers, meta["optimizers"], strict=True)):
            load_optimizer_state(opt, tensors, opt_meta, f"optim{s}.")
