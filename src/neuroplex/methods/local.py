"""Method ``local``: each stage trained by its own gradient-isolated auxiliary network.

Per batch, stage by stage: detach the input, forward the stage, its auxiliary network's loss,
backward, optimizer step, free. Only one stage's graph is alive at a time — that is where the
activation memory goes — and no gradient crosses a stage boundary. The last stage is trained
through the network's real head.

The auxiliary networks (``train.aux.kind``: linear, mlp, augmented = AugLocal, momentum = MAN)
are built in :mod:`neuroplex.methods.aux`, for vector and feature-map stages alike.

Shape legend: ``b`` batch, ``*in`` / ``*out`` a stage's input / output shape, ``c`` classes.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from neuroplex.config import Config
from neuroplex.distributed.parallel import data_parallel
from neuroplex.layers import StageOutput
from neuroplex.methods.aux import MomentumAux, aux_nets, first_layer
from neuroplex.methods.streams import StageStreams
from neuroplex.network import Network, run_stage
from neuroplex.train.checkpoint import (
    load_module_state,
    load_optimizer_state,
    optimizer_state,
)
from neuroplex.train.method import StepResult
from neuroplex.train.optim import build_optimizer, set_lr
from neuroplex.train.precision import Precision


class StageWithHead(nn.Module):
    """A stage and the classifier that trains it: ``[b, *in] -> (StageOutput, [b, c])``."""

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
        device = next(model.parameters()).device
        self.aux = nn.ModuleList(aux_nets(model, cfg.train.aux, list(cfg.model.stages))).to(device)
        pairs = [
            StageWithHead(stage, head)
            for stage, head in zip(model.stages, [*self.aux, model.head], strict=True)
        ]
        self.trainees = [data_parallel(pair) for pair in pairs]
        self.optimizers = [build_optimizer([pair], cfg.train) for pair in pairs]
        # each stage draws its dropout masks (router noise) from its own stream, so the run is
        # the same however the stages are spread over processes (train.parallel)
        self.streams = StageStreams(cfg.seed, len(pairs), device)
        self.precision = Precision(cfg.train.precision, device)

    def step(self, x: Tensor, y: Tensor, lr: float) -> StepResult:
        """Train each stage on ``x [b, *in]``, ``y [b]`` in turn; return the head's loss."""
        result, _ = self.train_stages(range(len(self.trainees)), x, y, lr)
        return result

    def train_stages(
        self, stages: range, h: Tensor, y: Tensor, lr: float
    ) -> tuple[StepResult, Tensor]:
        """Train ``stages`` (consecutive) in turn on their input ``h [b, *in]``, ``y [b]``.

        Returns the last stage's loss and correct count (its aux net's, or the head's for the
        network's last stage), every stage's statistics, and its detached output ``[b, *out]``.
        """
        self.aux.train(self.model.training)
        stats: dict[str, Tensor] = {}
        for s in stages:
            trainee, opt = self.trainees[s], self.optimizers[s]
            with self.streams.use(s):
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
        tensors.update(self.streams.state())
        metas = []
        for s, opt in enumerate(self.optimizers):
            opt_tensors, meta = optimizer_state(opt, f"optim{s}.")
            tensors.update(opt_tensors)
            metas.append(meta)
        return tensors, {"optimizers": metas, "scaler": self.precision.state()}

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        load_module_state(self.aux, tensors, "aux.")
        self.streams.load_state(tensors)
        for s, (opt, opt_meta) in enumerate(zip(self.optimizers, meta["optimizers"], strict=True)):
            load_optimizer_state(opt, tensors, opt_meta, f"optim{s}.")
        self.precision.load_state(meta.get("scaler", {}))
