"""A gated mixture of expert MLPs with sort-based dispatch, load-balance and router z-losses.

Shape legend: ``b`` tokens, ``d`` features (``d_in`` in, ``d_out`` out), ``e`` experts,
``k`` chosen experts per token, ``a = b * k`` assignments, ``c`` capacity per expert,
``h`` expert hidden width.

Dispatch: the ``[b, k]`` choices are flattened choice-major (every token's first choice in token
order, then every second choice, ...), stably sorted by expert, counted with ``bincount``; the
token rows are gathered with ``index_select``, run through the experts, scaled by their gate and
summed back per token with ``index_add``. No loop over tokens, no ``[b, e, c]`` one-hot.

Capacity: expert ``i`` keeps its first ``c = ceil(factor * k * b / e)`` assignments in that
choice-major order (so a first choice always beats a second choice, then earlier tokens win)
and drops the rest. A token that loses only some choices just loses those experts'
contributions; a token that loses all of them passes ``x`` through (``drop="residual"``) or
outputs zeros (``drop="zero"``). Balance losses see the router's choices before any drop.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from neuroplex.layers.output import StageOutput
from neuroplex.layers.routers import ROUTERS, RouterOutput, check_sizes
from neuroplex.wiring import Wiring

BALANCES = ("cv2", "switch")
DROPS = ("residual", "zero")
# Default "loop". Measured fwd+bwd, training, noisy_topk, no capacity, d 256, h 1024, 2 threads,
# models interleaved in one process; speed vs the equal-active dense FFN d -> k*h -> d (> 1 is
# faster). Process CPU time with OMP_WAIT_POLICY=PASSIVE, because other jobs kept both cores
# busy (load 5-7) and wall-clock ratios swung by +-20%; medians of 16 rounds:
#   E  k  tokens   loop  bmm  |  E  k  tokens   loop  bmm  |  E   k  tokens   loop  bmm
#   4  1  1024     0.84  0.83 |  8  1  1024     0.80  0.76 |  32  1  1024     0.42  0.40
#   4  1  4096     0.91  0.88 |  8  1  4096     0.92  0.83 |  32  1  4096     0.56  0.63
#   4  2  1024     0.91  0.91 |  8  2  1024     0.88  0.86 |  32  2  1024     0.64  0.59
#   4  2  4096     0.95  0.96 |  8  2  4096     0.93  0.93 |  32  2  4096     0.81  0.82
# Loop was at least as fast as bmm in 11 of 12 rows (bmm pads every expert to the largest
# count). At 32 experts both pay for 32/k times the dense FFN's weights and weight gradients.
DISPATCHES = ("loop", "bmm")


def cv_squared(v: Tensor) -> Tensor:
    """Squared coefficient of variation ``var(v) / (mean(v)² + 1e-10)`` of ``[e] -> []``.

    Uses the population variance (divide by ``e``, as Shazeer's ``tf.nn.moments``), so a single
    expert gives 0 rather than NaN.
    """
    return v.var(correction=0) / (v.mean() ** 2 + 1e-10)


def switch_balance(counts: Tensor, probs: Tensor) -> Tensor:
    """Switch Transformer balance loss ``e * sum_i f_i * P_i``, ``[e], [b, e] -> []``.

    ``f_i`` is the fraction of assignments to expert ``i``, ``P_i`` its mean router probability.
    """
    f = counts / counts.sum().clamp(min=1)
    return probs.shape[1] * (f * probs.mean(dim=0)).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """Router z-loss ``mean_b logsumexp(logits)²``, ``[b, e] -> []``."""
    return torch.logsumexp(logits, dim=1).square().mean()


def expert_capacity(factor: float | None, k: int, tokens: int, n_experts: int) -> int | None:
    """Per-expert capacity ``ceil(factor * k * tokens / e)``; ``None`` means no limit."""
    return None if factor is None else math.ceil(factor * k * tokens / n_experts)


class MoE(nn.Module):
    """Mixture of ``n_experts`` two-layer MLP experts, ``k`` per token, chosen by a router.

    Args:
        d_in: input features.
        d_out: output features.
        n_experts: number of experts ``e``.
        k: experts per token (``1 <= k <= e``).
        expert_hidden: hidden width ``h`` of each expert ``d_in -> h -> d_out``.
        router: a name in ``ROUTERS`` or a router module (see ``routers.py``).
        capacity_factor: training capacity factor; ``None`` never drops.
        eval_capacity_factor: the same in eval mode.
        drop: what a token whose every choice was dropped outputs: ``"residual"`` (``x``, needs
            ``d_in == d_out``) or ``"zero"``.
        balance: ``"cv2"`` (Shazeer: cv²(importance) + cv²(load)) or ``"switch"``.
        balance_weight: weight of the balance loss in ``aux_loss``.
        z_loss_weight: weight of the router z-loss in ``aux_loss``.
        act_layer: expert activation class, e.g. ``nn.GELU``.
        expert_dropout: dropout on the experts' hidden units (Switch Transformer's "expert
            dropout", a regulariser for experts that each see only part of the data).
        expert_wirings: sparse experts: two ``Wiring`` s (``d_in -> h`` and ``h -> d_out``)
            shared by every expert; their unit masks multiply the expert weights, and each
            hidden or output unit is initialised for its real fan-in.
        dispatch: ``"loop"`` (one matmul per expert on its sorted slice) or ``"bmm"`` (a padded
            ``[e, c, d]`` buffer and batched matmuls; no host sync when a capacity is set).

    Shapes: ``[b, d_in] -> StageOutput(x [b, d_out], aux_loss [], stats)``.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        n_experts: int,
        k: int,
        expert_hidden: int,
        *,
        router: str | nn.Module = "noisy_topk",
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        drop: str = "residual",
        balance: str = "cv2",
        balance_weight: float = 1e-2,
        z_loss_weight: float = 1e-3,
        act_layer: type[nn.Module] = nn.GELU,
        expert_dropout: float = 0.0,
        expert_wirings: tuple[Wiring, Wiring] | None = None,
        dispatch: str = "loop",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_sizes(d_in, n_experts, k)
        for name, value in (("d_out", d_out), ("expert_hidden", expert_hidden)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}.")
        for name, value in (
            ("capacity_factor", capacity_factor),
            ("eval_capacity_factor", eval_capacity_factor),
        ):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive or None, got {value}.")
        if not 0 <= expert_dropout < 1:
            raise ValueError(f"expert_dropout must be in [0, 1), got {expert_dropout}.")
        if drop not in DROPS:
            raise ValueError(f"drop must be one of {', '.join(DROPS)}, got {drop!r}.")
        if drop == "residual" and d_in != d_out:
            raise ValueError(
                f'drop="residual" needs d_in == d_out, got {d_in} and {d_out}; use drop="zero".'
            )
        if balance not in BALANCES:
            raise ValueError(f"balance must be one of {', '.join(BALANCES)}, got {balance!r}.")
        if dispatch not in DISPATCHES:
            raise ValueError(f"dispatch must be one of {', '.join(DISPATCHES)}, got {dispatch!r}.")
        if isinstance(router, str):
            if router not in ROUTERS:
                raise ValueError(f"router must be one of {', '.join(ROUTERS)}, got {router!r}.")
            router = ROUTERS[router](d_in, n_experts, k, device=device, dtype=dtype)
        elif not isinstance(router, nn.Module):
            raise ValueError(f"router must be a name or an nn.Module, got {router!r}.")
        elif getattr(router, "n_experts", n_experts) != n_experts:
            raise ValueError(f"router has {router.n_experts} experts but n_experts is {n_experts}.")
        elif getattr(router, "k", k) != k:
            raise ValueError(f"router chooses k={router.k} experts but k is {k}.")
        self.d_in, self.d_out, self.n_experts, self.k = d_in, d_out, n_experts, k
        self.expert_hidden = expert_hidden
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.drop, self.balance, self.dispatch = drop, balance, dispatch
        self.balance_weight, self.z_loss_weight = balance_weight, z_loss_weight
        self.router = router
        self.expert_dropout = expert_dropout
        # the activation of the hidden units, then their dropout: both dispatch paths apply it
        self.act = act_layer()
        if expert_dropout:
            self.act = nn.Sequential(self.act, nn.Dropout(expert_dropout))
        factory = {"device": device, "dtype": dtype}
        self.w1 = nn.Parameter(torch.empty(n_experts, d_in, expert_hidden, **factory))
        self.b1 = nn.Parameter(torch.empty(n_experts, expert_hidden, **factory))
        self.w2 = nn.Parameter(torch.empty(n_experts, expert_hidden, d_out, **factory))
        self.b2 = nn.Parameter(torch.empty(n_experts, d_out, **factory))
        self.expert_density: float | None = None
        if expert_wirings is not None:
            masks = _expert_masks(expert_wirings, (d_in, expert_hidden, d_out), factory)
            self.register_buffer("mask1", masks[0])  # [d_in, h]
            self.register_buffer("mask2", masks[1])  # [h, d_out]
            self.expert_density = float(
                (masks[0].sum() + masks[1].sum()) / (masks[0].numel() + masks[1].numel())
            )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert's layers drawn as ``nn.Linear`` draws them: U(±1/sqrt(fan_in)); a sparse
        expert counts each unit's fan-in over its real inputs and is zero off its mask."""
        for w, b, mask in ((self.w1, self.b1, "mask1"), (self.w2, self.b2, "mask2")):
            m = getattr(self, mask, None)
            if m is None:
                bound = 1.0 / math.sqrt(w.shape[1])
                nn.init.uniform_(w, -bound, bound)
                nn.init.uniform_(b, -bound, bound)
                continue
            bound = m.sum(0).clamp(min=1).rsqrt()  # [units out]
            with torch.no_grad():
                w.uniform_(-1, 1).mul_(bound * m)
                b.uniform_(-1, 1).mul_(bound)

    def forward(self, x: Tensor) -> StageOutput:
        """``[b, d_in] -> StageOutput(x [b, d_out], aux_loss [], stats)``.

        ``stats`` (detached): ``load`` [e] fraction of assignments per expert before drops,
        ``dropped_frac`` fraction of assignments dropped, ``dropped_tokens`` fraction of tokens
        with every choice dropped, ``gate_entropy`` mean entropy of the full routing
        distribution, ``balance_loss`` and ``z_loss`` unweighted.
        """
        route = self.route(x)
        b, k = route.indices.shape  # k may exceed self.k for dense-to-sparse routers
        e, a = self.n_experts, route.indices.numel()
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        cap = expert_capacity(factor, k, b, e)

        expert = route.indices.t().reshape(-1)  # [a] choice-major: all 1st choices, then 2nd...
        gate = route.gates.t().reshape(-1)  # [a]
        token = torch.arange(b, device=x.device).repeat(k)  # [a]
        order = torch.argsort(expert, stable=True)  # stable keeps choice-major order per expert
        expert, gate, token = expert[order], gate[order], token[order]
        counts = torch.bincount(expert, minlength=e)  # [e] before drops
        rank = torch.arange(a, device=x.device) - (counts.cumsum(0) - counts)[expert]  # [a]

        run = _dispatch_loop if self.dispatch == "loop" else _dispatch_bmm
        y, y_gate, y_token = run(x, expert, gate, token, rank, counts, cap, self._experts())
        out = _GatedCombine.apply(y, y_gate, y_token, b)  # [b, d_out]

        n_drop, all_dropped = x.new_zeros(()), x.new_zeros(b, dtype=torch.bool)
        if cap is not None:
            kept = (rank < cap).long()  # [a]
            n_drop = (a - kept.sum()).to(x.dtype)
            all_dropped = kept.new_zeros(b).index_add(0, token, kept) == 0  # [b]
            if self.drop == "residual":
                out = torch.where(all_dropped[:, None], x, out)

        counts_f = counts.to(x.dtype)
        if self.balance == "cv2":
            importance = x.new_zeros(e).index_add(0, expert, gate)  # [e] gate mass per expert
            balance = cv_squared(importance) + cv_squared(route.load)
        else:
            balance = switch_balance(counts_f, route.probs)
        z = router_z_loss(route.logits)
        aux = self.balance_weight * balance + self.z_loss_weight * z
        stats = {
            "load": (counts_f / max(a, 1)).detach(),
            "dropped_frac": (n_drop / max(a, 1)).detach(),
            "dropped_tokens": all_dropped.to(x.dtype).mean().detach(),
            "gate_entropy": torch.special.entr(route.probs).sum(dim=1).mean().detach(),
            "balance_loss": balance.detach(),
            "z_loss": z.detach(),
        }
        return StageOutput(out, aux, stats)

    def route(self, x: Tensor) -> RouterOutput:
        """The router's choices for ``x [b, d_in]``, experts not run: ``indices, gates [b, k]``
        (best first), ``logits, probs [b, e]``. Deterministic in eval mode (training-mode
        routers draw noise), so analysis reads the routing the forward would use."""
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"MoE expects input [b, {self.d_in}], got {list(x.shape)}.")
        return self.router(x)

    def _experts(self) -> tuple[Tensor, Tensor, Tensor, Tensor, nn.Module]:
        if self.expert_density is None:
            return self.w1, self.b1, self.w2, self.b2, self.act
        return self.w1 * self.mask1, self.b1, self.w2 * self.mask2, self.b2, self.act

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, d_out={self.d_out}, experts={self.n_experts}, k={self.k}, "
            f"hidden={self.expert_hidden}, router={type(self.router).__name__}, "
            f"capacity={self.capacity_factor}/{self.eval_capacity_factor} (train/eval), "
            f"drop={self.drop}, balance={self.balance}, dispatch={self.dispatch}, "
            f"expert_dropout={self.expert_dropout}"
            + ("" if self.expert_density is None else f", expert_density={self.expert_density:.3f}")
        )


def _expert_masks(
    wirings: tuple[Wiring, Wiring], sizes: tuple[int, int, int], factory: dict
) -> tuple[Tensor, Tensor]:
    """Unit masks ``[d_in, h]`` and ``[h, d_out]`` (weight layout) of the two expert wirings."""
    masks = []
    for wiring, n_in, n_out in zip(wirings, sizes[:-1], sizes[1:], strict=True):
        if (wiring.n_in, wiring.n_out) != (n_in, n_out):
            raise ValueError(
                f"expert wiring is {wiring.n_in} -> {wiring.n_out}, expected {n_in} -> {n_out}."
            )
        mask = torch.from_numpy(wiring.to_mask().T.copy())  # bool [n_in, n_out]
        masks.append(mask.to(device=factory["device"], dtype=factory["dtype"] or torch.float32))
    return masks[0], masks[1]


def _dispatch_loop(x, expert, gate, token, rank, counts, cap, experts):
    """One matmul per expert and layer on its contiguous slice of the expert-sorted rows.

    Returns expert outputs ``[a_kept, d_out]`` with the gate and token of each row.
    ``counts.tolist()`` (and ``nonzero`` under a capacity) sync with the host:
    the slice sizes must be Python ints. It is a torch.compile graph break, kept because this
    path is the faster one on CPU (see the benchmark note above ``DISPATCHES``).
    """
    w1, b1, w2, b2, act = experts
    if cap is not None:
        keep = (rank < cap).nonzero().squeeze(1)  # [a_kept], still sorted by expert
        gate, token = gate[keep], token[keep]
        counts = counts.clamp(max=cap)
    sizes = counts.tolist()
    hidden = act(_GroupedLinear.apply(x.index_select(0, token), w1, b1, sizes))  # [a_kept, h]
    y = _GroupedLinear.apply(hidden, w2, b2, sizes)  # [a_kept, d_out]
    return y, gate, token


class _GroupedLinear(torch.autograd.Function):
    """``x [a, i]`` in consecutive groups of ``sizes[j]`` rows, group ``j`` times ``w[j]``.

    ``[a, i], w [e, i, o], b [e, o] -> [a, o]``. Forward and backward write each group's matmul
    straight into slices of one output (and of the stacked weight gradients), so there is no
    ``cat`` of per-expert outputs and no stacking of per-expert weight gradients (plain
    autograd over ``w.unbind(0)`` spent a quarter of the step there at 32 experts, k 1, 1024
    tokens). Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor, sizes: list[int]) -> Tensor:
        out = x.new_empty(x.shape[0], w.shape[2])
        start = 0
        for j, n in enumerate(sizes):
            if n > 0:
                rows = slice(start, start + n)
                torch.addmm(b[j], x[rows], w[j], out=out[rows])
            start += n
        ctx.save_for_backward(x, w)
        ctx.sizes = sizes
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, w = ctx.saved_tensors
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        grad_x = x.new_empty(x.shape) if need_x else None
        grad_w = torch.empty_like(w) if need_w else None
        grad_b = w.new_empty(w.shape[0], w.shape[2]) if need_b else None
        start = 0
        for j, n in enumerate(ctx.sizes):
            rows = slice(start, start + n)
            if n == 0:  # an expert with no rows gets zero gradients
                for g in (grad_w, grad_b):
                    if g is not None:
                        g[j].zero_()
                continue
            if need_x:
                torch.mm(grad[rows], w[j].t(), out=grad_x[rows])
            if need_w:
                torch.mm(x[rows].t(), grad[rows], out=grad_w[j])
            if need_b:
                torch.sum(grad[rows], dim=0, out=grad_b[j])
            start += n
        return grad_x, grad_w, grad_b, None


def _dispatch_bmm(x, expert, gate, token, rank, counts, cap, experts):
    """Rows scattered into a zero-padded ``[e, c, d_in]`` buffer, two batched matmuls.

    ``c`` is the capacity, or the largest count when there is none (one ``.item()`` host sync;
    with a capacity this path has no data-dependent shape at all). Dropped assignments go to a
    spare last row and get a zero gate. Returns expert outputs ``[a, d_out]``, gates, tokens.
    """
    w1, b1, w2, b2, act = experts
    e = w1.shape[0]
    c = cap if cap is not None else int(counts.max().item())
    slot = expert * c + rank  # [a] row in the flattened [e * c] buffer
    if cap is not None:
        kept = rank < cap
        slot = torch.where(kept, slot, e * c)  # dropped -> spare row e * c
        gate = gate * kept
    buf = x.new_zeros(e * c + 1, x.shape[1]).index_copy(0, slot, x.index_select(0, token))
    hidden = act(
        torch.baddbmm(b1[:, None, :], buf[: e * c].view(e, c, x.shape[1]), w1)
    )  # [e, c, h]
    y = torch.baddbmm(b2[:, None, :], hidden, w2).reshape(e * c, w2.shape[2])  # [e * c, d_out]
    y = y.index_select(0, slot.clamp(max=e * c - 1))  # [a, d_out]; dropped rows have gate 0
    return y, gate, token


class _GatedCombine(torch.autograd.Function):
    """``out[t] = sum of gate[r] * y[r]`` over the rows ``r`` of token ``t``: ``[a, d] -> [b, d]``.

    The same as ``zeros.index_add(0, token, y * gate[:, None])`` under autograd, with two fewer
    ``[a, d]`` temporaries (the gate gradient is a row-wise dot product, not a product then a
    sum), which matters because everything around the expert matmuls is memory-bound.
    """

    @staticmethod
    def forward(ctx, y: Tensor, gate: Tensor, token: Tensor, b: int) -> Tensor:
        out = y.new_zeros(b, y.shape[1])
        out.index_add_(0, token, y * gate[:, None])
        ctx.save_for_backward(y, gate, token)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        y, gate, token = ctx.saved_tensors
        grad_rows = grad.index_select(0, token)  # [a, d]
        grad_gate = None
        if ctx.needs_input_grad[1]:
            grad_gate = torch.bmm(grad_rows.unsqueeze(1), y.unsqueeze(2)).view(-1)  # [a]
        return grad_rows.mul_(gate[:, None]), grad_gate, None, None
