"""The named tuple a layer or stage returns when it has side results (aux losses, statistics)."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class StageOutput(NamedTuple):
    """What a stage with side results returns; the training loop adds ``aux_loss``."""

    x: Tensor  # [b, d_out]
    aux_loss: Tensor  # scalar, already weighted, added to the training loss
    stats: dict[str, Tensor]  # per-step statistics to log (e.g. expert load)
