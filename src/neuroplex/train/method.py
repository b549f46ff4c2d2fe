"""What a training method is: an object the one loop calls once per batch.

A method owns its optimizers (and, for local learning, its auxiliary networks), so the loop has
no method-specific branches. Shape legend: ``b`` batch, ``d`` features.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn


class StepResult(NamedTuple):
    loss: Tensor  # scalar, detached: the loss of the network's own head on this batch
    correct: Tensor  # scalar int: correct predictions of the network's head in this batch
    stats: dict[str, Tensor]  # per-step statistics (stage stats, per-stage local losses)


class Method(Protocol):
    optimizers: list[torch.optim.Optimizer]  # every optimizer (plasticity resets their moments)

    def step(self, x: Tensor, y: Tensor, lr: float) -> StepResult:
        """One update on a batch ``x [b, d]``, ``y [b]`` at learning rate ``lr``."""
        ...

    def modules(self) -> list[nn.Module]:
        """Every module the method trains (the network, auxiliary networks)."""
        ...

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors (safetensors) and JSON-able metadata to checkpoint."""
        ...

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None: ...
