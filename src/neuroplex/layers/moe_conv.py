"""Whole samples routed to convolutional experts (sample-level MoE on feature maps).

Shape legend: ``b`` samples, ``c`` input channels, ``s`` spatial positions (``L`` or ``h, w``),
``e`` experts, ``k`` chosen experts per sample, ``a = b * k`` assignments.

"Robust Mixture-of-Expert Training for Convolutional Neural Networks" (Zhang et al., ICCV 2023;
OPTML-Group/Robust-MoE-CNN) routes each sample to one of ``e`` groups of a convolution's output
channels, chosen by a router network on the layer's input, with a straight-through top-1 gate.
Here each expert is its own convolution ``c -> width`` (+ activation), the router sees the
sample's channel means (a global average pool: a linear router, not the authors' small ResNet),
and routing, gates, capacity and the balance and z-losses are those of :class:`~.moe.MoE`
(``k`` experts per sample, outputs weighted by their gates). For the per-position routing of
patch-level MoE use :class:`~.moe.MoE` over the channel axis (``GatedStage`` does that).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from neuroplex.layers.moe import Plan, Routed
from neuroplex.layers.moe_kernels import combine, keep_within_capacity
from neuroplex.layers.routers import RouterOutput

CONVS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d}


class ConvMoE(Routed):
    """``e`` convolutional experts ``Conv(c -> width, kernel, same padding) -> act``, ``k`` per
    sample. ``in_shape = (c, *s)`` one sample's feature map (1-D or 2-D).

    Shapes: ``[b, c, *s] -> [b, width, *s]``; ``aux_loss`` and ``stats`` are left on the layer
    as :class:`~.moe.MoE` leaves them (``moe_aux_loss`` / ``moe_stats`` collect them).
    """

    def __init__(
        self,
        in_shape: tuple[int, ...],
        width: int,
        n_experts: int,
        k: int,
        *,
        kernel: int = 3,
        router: str | nn.Module = "noisy_topk",
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        drop: str = "zero",
        balance: str = "cv2",
        balance_weight: float = 1e-2,
        z_loss_weight: float = 1e-3,
        act_layer: type[nn.Module] = nn.GELU,
        device=None,
        dtype=None,
    ) -> None:
        if len(in_shape) - 1 not in CONVS:
            raise ValueError(f"ConvMoE needs a 1-D or 2-D feature map (c, *s), got {in_shape}.")
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel must be odd and at least 1 (same padding), got {kernel}.")
        super().__init__(
            in_shape[0],
            n_experts,
            k,
            router=router,
            capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor,
            drop=drop,
            balance=balance,
            balance_weight=balance_weight,
            z_loss_weight=z_loss_weight,
            device=device,
            dtype=dtype,
        )
        if drop == "residual" and in_shape[0] != width:
            raise ValueError(f'drop="residual" needs width == channels {in_shape[0]}, got {width}.')
        conv = CONVS[len(in_shape) - 1]
        self.in_shape, self.out_shape = tuple(in_shape), (width, *in_shape[1:])
        self.d_in, self.d_out, self.kernel = in_shape[0], width, kernel
        self.experts = nn.ModuleList(
            nn.Sequential(
                conv(in_shape[0], width, kernel, padding=kernel // 2, device=device, dtype=dtype),
                act_layer(),
            )
            for _ in range(n_experts)
        )

    def forward(self, x: Tensor) -> Tensor:
        """``[b, c, *s] -> [b, width, *s]``; leaves ``aux_loss`` and ``stats`` on the layer."""
        route = self.route(x)
        plan = self._sort(x, route)
        y, gate, token = self._run_experts(x, plan)  # [a', width, *s]
        out = combine(y.flatten(1), gate.to(y.dtype), token, x.shape[0])  # [b, width * s]
        out, n_drop, all_dropped = self._drops(x.flatten(1), out, plan)
        self._store(*self._losses(route, plan, n_drop, all_dropped))
        return out.view(x.shape[0], *self.out_shape)

    def route(self, x: Tensor) -> RouterOutput:
        """The router's choice per sample of ``x [b, c, *s]`` from its channel means ``[b, c]``:
        ``indices, gates [b, k]``, ``logits, probs [b, e]``."""
        if tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(f"ConvMoE expects input [b, {', '.join(map(str, self.in_shape))}], "
                             f"got {list(x.shape)}.")  # fmt: skip
        return self._route(x.flatten(2).mean(dim=2))

    @torch.compiler.disable
    def _run_experts(self, x: Tensor, plan: Plan) -> tuple[Tensor, Tensor, Tensor]:
        """Each expert on its slice of the expert-sorted samples (a loop over experts, whose
        slice sizes are host ints: one sync, one graph break under ``torch.compile``)."""
        _, gate, token, counts = keep_within_capacity(
            plan.expert, plan.gate, plan.token, plan.rank, plan.counts, plan.cap
        )
        rows = x.index_select(0, token).split(counts.tolist())  # e chunks [n_j, c, *s]
        y = torch.cat([f(r) for f, r in zip(self.experts, rows, strict=True) if len(r)])
        return y, gate, token

    def extra_repr(self) -> str:
        return (
            f"in_shape={self.in_shape}, width={self.d_out}, experts={self.n_experts}, "
            f"k={self.k}, kernel={self.kernel}, router={type(self.router).__name__}, "
            f"capacity={self.capacity_factor}/{self.eval_capacity_factor} (train/eval), "
            f"drop={self.drop}, balance={self.balance}"
        )
