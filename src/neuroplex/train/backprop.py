"""Method ``backprop``: end-to-end gradient descent on the whole network.

A training method is an object with ``step(x, y, lr) -> StepResult`` that the one loop calls,
plus ``state()``/``load_state()`` for checkpoints. Shape legend: ``b`` batch, ``d`` features.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from neuroplex.config import TrainConfig
from neuroplex.network import Network
from neuroplex.train.checkpoint import load_optimizer_state, optimizer_state
from neuroplex.train.optim import build_optimizer, set_lr


class StepResult(NamedTuple):
    loss: Tensor  # scalar, detached: the task loss the method minimised (plus aux losses)
    correct: Tensor  # scalar int: correct predictions of the network's head in this batch
    stats: dict[str, Tensor]  # per-step statistics from the stages


class Backprop:
    """Cross-entropy on the head plus the stages' aux losses, one optimizer for everything."""

    def __init__(self, model: Network, cfg: TrainConfig) -> None:
        self.model, self.cfg = model, cfg
        self.optimizer = build_optimizer([model], cfg)

    def step(self, x: Tensor, y: Tensor, lr: float) -> StepResult:
        """One update on a batch ``x [b, d]``, ``y [b]``."""
        set_lr(self.optimizer, lr)
        out = self.model.forward_stages(x)
        loss = F.cross_entropy(out.logits, y, label_smoothing=self.cfg.label_smoothing)
        loss = loss + out.aux_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        correct = (out.logits.argmax(dim=1) == y).sum()
        stats = {k: v.detach() for k, v in out.stats.items()}
        return StepResult(loss.detach(), correct, stats)

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Optimizer tensors and JSON-able metadata for a checkpoint."""
        tensors, meta = optimizer_state(self.optimizer, "optim.")
        return tensors, {"optimizer": meta}

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        load_optimizer_state(self.optimizer, tensors, meta["optimizer"], "optim.")
