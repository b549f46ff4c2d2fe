"""``train.precision`` and ``train.compile``: how the methods run forward, loss and backward.

Precision names are Lightning's: ``32`` (float32 throughout), ``bf16-mixed`` (forward and loss
under ``torch.autocast`` in bfloat16; parameters, gradients and optimizer state stay float32),
``16-mixed`` (the same in float16, with a ``GradScaler`` so small gradients do not underflow;
CUDA only: on the CPU it is refused, as fp16 matmuls there are emulated and slower than
float32, and bf16 needs no scaler). Backward runs outside autocast, as PyTorch recommends (its
ops take the dtypes autocast chose in forward).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from neuroplex.errors import ConfigError

AUTOCAST = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


class Precision:
    """Autocast around forward + loss, and (``16-mixed``) loss scaling around backward + step.

    One object per method: ``backward`` scales the loss, ``step`` unscales the gradients of one
    optimizer (before clipping) and steps it, ``update`` adjusts the scale once per batch."""

    def __init__(self, name: str, device: torch.device) -> None:
        if name == "16-mixed" and device.type != "cuda":
            raise ConfigError(
                f"train.precision = '16-mixed' on device {device.type!r}: float16 autocast "
                "needs a CUDA device; use 'bf16-mixed' or '32' on the CPU"
            )
        self.name, self.device_type, self.dtype = name, device.type, AUTOCAST[name]
        self.scaler = torch.amp.GradScaler("cuda") if name == "16-mixed" else None

    def autocast(self) -> AbstractContextManager:
        """Context for forward and loss: autocast in the mixed dtype, or nothing at ``32``."""
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(
        self, optimizer: torch.optim.Optimizer, params: Iterable[Tensor], clip: float | None
    ) -> None:
        """Clip the global gradient norm of ``params`` (``optimizer``'s) to ``clip`` (None: no
        clipping) on the true (unscaled) gradients, then step."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)  # skipped when a gradient is inf/nan

    def update(self) -> None:
        """After every optimizer of the batch has stepped: adjust the loss scale."""
        if self.scaler is not None:
            self.scaler.update()

    def state(self) -> dict[str, Any]:
        """JSON-able scaler state for a checkpoint (empty without a scaler)."""
        return {} if self.scaler is None else dict(self.scaler.state_dict())

    def load_state(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def device_of(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def compile_stages(model: nn.Module) -> None:
    """``train.compile``: compile every stage and the head in place (``nn.Module.compile``, so
    parameter names and checkpoints are unchanged). A stage is compiled on its own because
    local learning cuts the graph between stages anyway, and a rewired stage recompiles alone.
    The activation meter then counts what the compiled graphs save (inductor saves less: 61 kB
    against 70 kB eager on the test config), and compiled dropout draws other random numbers
    than eager."""
    for stage in model.stages:
        stage.compile()
    model.head.compile()
