"""Stages built from sparse layers and mixtures of experts (dense stages live in dense.py).

Shape legend: ``b`` batch, ``d`` input features, ``h`` width.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from torch import Tensor, nn

from neuroplex.layers.moe import MoE
from neuroplex.layers.moe_conv import ConvMoE
from neuroplex.layers.routers import RouterOutput
from neuroplex.layers.sparse import SparseLinear
from neuroplex.wiring import Wiring


class SparseBlock(nn.Module):
    """SparseLinear(wiring) -> norm -> activation -> dropout. ``[b, n_in] -> [b, n_out]``."""

    def __init__(
        self,
        wiring: Wiring,
        *,
        norm_layer: type[nn.Module] | None = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.linear = SparseLinear(wiring)
        self.norm = norm_layer(wiring.n_out) if norm_layer is not None else nn.Identity()
        self.act = act_layer()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.act(self.norm(self.linear(x))))


class SparseStage(nn.Sequential):
    """SparseBlocks, one per wiring. ``[b, d] -> [b, h]``. ``ensemble_labels`` names the output
    ensemble of every output unit (what functional analysis compares communities with)."""

    def __init__(self, wirings: list[Wiring], **block_kwargs) -> None:
        super().__init__(*(SparseBlock(w, **block_kwargs) for w in wirings))
        last = wirings[-1]
        self.d_out = last.n_out
        self.ensemble_labels = np.repeat(np.arange(len(last.out_sizes)), last.out_sizes)


class GatedStage(nn.Module):
    """A mixture of experts, a norm, dropout: ``drop(norm(moe(x)))``, or with ``residual``
    ``drop(norm(x + moe(x)))`` (the MoE as a residual feed-forward block; needs ``d == h``).
    A ``shared`` expert (DeepSeekMoE's shared-expert isolation) sees every input and is added
    to the routed experts' output: ``moe(x) + shared(x)``.

    ``[b, d] -> [b, h]``, or on a feature map ``[b, c, *s] -> [b, h, *s]``: an :class:`MoE`
    routes every position (its experts are pointwise MLPs over the channels; the shared expert
    too), a :class:`ConvMoE` whole samples. The MoE keeps its aux loss and stats
    (``moe.aux_loss``, ``moe.stats``), which ``network.run_stage`` collects.
    """

    def __init__(
        self,
        moe: MoE | ConvMoE,
        norm_layer: Callable[[int], nn.Module] | None = nn.LayerNorm,
        dropout: float = 0.0,
        residual: bool = False,
        shared: nn.Module | None = None,
        spatial: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        if residual and moe.d_in != moe.d_out:
            raise ValueError(f"residual needs d_in == d_out, got {moe.d_in} and {moe.d_out}.")
        self.moe = moe
        self.shared = shared
        self.d_out = moe.d_out
        self.out_shape = (moe.d_out, *spatial)
        self.per_position = bool(spatial) and isinstance(moe, MoE)
        self.residual = residual
        self.norm = norm_layer(moe.d_out) if norm_layer is not None else nn.Identity()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self._pointwise(self.moe, x)
        if self.shared is not None:
            y = y + self._pointwise(self.shared, x)
        if self.residual:
            y = x + y
        return self.drop(self.norm(y))

    def route(self, x: Tensor) -> RouterOutput:
        """The MoE's routing of the stage input ``x``: one token per sample, or per position
        (sample-major: the tokens of sample 0 first) when it routes positions."""
        return self.moe.route(x.movedim(1, -1) if self.per_position else x)

    def _pointwise(self, f: nn.Module, x: Tensor) -> Tensor:
        """``f`` on the channel axis of every position (``[b, c, *s]``, channels moved last
        and back), or on ``x`` itself."""
        return f(x.movedim(1, -1)).movedim(-1, 1) if self.per_position else f(x)

    def extra_repr(self) -> str:
        return f"residual={self.residual}, per_position={self.per_position}"


def shared_expert(
    d_in: int, hidden: int, d_out: int, act_layer: type[nn.Module], dropout: float = 0.0
) -> nn.Sequential:
    """A dense expert MLP ``[b, d_in] -> [b, d_out]`` through ``hidden`` units (dropout on
    them, like the routed experts' expert dropout)."""
    drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
    return nn.Sequential(nn.Linear(d_in, hidden), act_layer(), drop, nn.Linear(hidden, d_out))
