"""Method ``backprop``: end-to-end gradient descent on the whole network.

Shape legend: ``b`` batch, ``d`` features.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from neuroplex.config import Config
from neuroplex.distributed.parallel import data_parallel
from neuroplex.network import Network, NetworkOutput
from neuroplex.train.checkpoint import load_optimizer_state, optimizer_state
from neuroplex.train.method import StepResult
from neuroplex.train.optim import build_optimizer, set_lr
from neuroplex.train.precision import Precision, device_of


class ForwardStages(nn.Module):
    """``forward`` = ``model.forward_stages``, so DistributedDataParallel can wrap it."""

    def __init__(self, model: Network) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> NetworkOutput:
        return self.model.forward_stages(x)


class Backprop:
    """Cross-entropy on the head plus the stages' aux losses, one optimizer for everything."""

    def __init__(self, model: Network, cfg: Config) -> None:
        self.model, self.cfg = model, cfg.train
        self.forward = data_parallel(ForwardStages(model))
        self.optimizer = build_optimizer([model], cfg.train)
        self.optimizers = [self.optimizer]
        self.precision = Precision(cfg.train.precision, device_of(model))

    def step(self, x: Tensor, y: Tensor, lr: float) -> StepResult:
        """One update on a batch ``x [b, d]``, ``y [b]``."""
        set_lr(self.optimizer, lr)
        with self.precision.autocast():
            out = self.forward(x)
            loss = F.cross_entropy(out.logits, y, label_smoothing=self.cfg.label_smoothing)
            loss = loss + out.aux_loss
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.backward(loss)
        self.precision.step(self.optimizer, self.model.parameters(), self.cfg.grad_clip)
        self.precision.update()
        correct = (out.logits.argmax(dim=1) == y).sum()
        stats = {k: v.detach() for k, v in out.stats.items()}
        return StepResult(loss.detach(), correct, stats)

    def modules(self) -> list[nn.Module]:
        return [self.model]

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Optimizer tensors and JSON-able metadata for a checkpoint."""
        tensors, meta = optimizer_state(self.optimizer, "optim.")
        return tensors, {"optimizer": meta, "scaler": self.precision.state()}

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        load_optimizer_state(self.optimizer, tensors, meta["optimizer"], "optim.")
        self.precision.load_state(meta.get("scaler", {}))
