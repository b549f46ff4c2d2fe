"""A gated mixture of expert MLPs with sort-based dispatch, load-balance and router z-losses.

Shape legend: ``*`` any leading dimensions, ``b`` tokens (every leading position), ``d``
features (``d_in`` in, ``d_out`` out), ``e`` experts, ``k`` chosen experts per token,
``a = b * k`` assignments, ``c`` capacity per expert, ``h`` expert hidden width.

Dispatch: the ``[b, k]`` choices are flattened choice-major (every token's first choice in token
order, then every second choice, ...), stably sorted by expert and counted; the token rows are
gathered, run through the experts (``moe_kernels.py``), scaled by their gate and summed back per
token. No loop over tokens, no ``[b, e, c]`` one-hot.

Capacity: expert ``i`` keeps its first ``c = ceil(factor * k * b / e)`` assignments in that
choice-major order (so a first choice always beats a second choice, then earlier tokens win)
and drops the rest; ``b`` counts the tokens over all leading dimensions of the call. A token
that loses only some choices just loses those experts' contributions; a token that loses all of
them outputs zeros (``drop="zero"``) or passes ``x`` through (``drop="residual"``). Balance
losses see the router's choices before any drop.

Side results: ``forward`` returns a plain tensor, so the layer drops into ``nn.Sequential`` or a
transformer block. Each call leaves its weighted auxiliary loss in ``moe.aux_loss`` (with its
graph) and its detached routing statistics in ``moe.stats``; :func:`moe_aux_loss` sums the
``aux_loss`` of every MoE in a model and :func:`moe_stats` gathers their ``stats`` by module
name. Both read the latest call of each layer: call them after the forward the loss belongs to.

Precision: under ``torch.autocast`` the router and the aux losses run in float32 (the Switch
Transformer's selective precision: the softmax and top-k decide the routing) and the experts in
the autocast dtype; in a plain dtype everything runs in it, the losses in at least float32.
"""

from __future__ import annotations

import contextlib
import math
from contextlib import nullcontext
from typing import NamedTuple

import torch
from torch import Tensor, nn

from neuroplex.layers.moe_kernels import (
    DISPATCH_KERNELS,
    EAGER_DISPATCHES,
    Experts,
    combine,
    mix_eagerly,
    slab_rows,
)
from neuroplex.layers.routers import ROUTERS, RouterOutput, check_sizes, count_per_expert
from neuroplex.wiring import Wiring

BALANCES = ("cv2", "switch")
DROPS = ("residual", "zero")
# Default "auto": "bmm" where the graph must have static shapes (compiling or exporting with a
# capacity, meta tensors, export without one); on CPU "fused" where the hidden rows of every
# expert together ([tokens * k, h]) take FUSED_MIN_HIDDEN_BYTES or more; "grouped" for
# bfloat16/float16 on CUDA (the kernel F.grouped_mm targets; not measured: no GPU); float32 on
# CPU "bmm" where its slab (every expert padded to the largest count) holds at most
# SLAB_MAX_PADDING times the assignments; else "loop". Compiled without a capacity the choice
# is made behind the graph break (moe_kernels.mix_eagerly), where the counts can be read.
# Eager, fwd+bwd, training, noisy_topk, no capacity, d 256, h 1024, 2 threads, process CPU
# time (OMP_WAIT_POLICY=PASSIVE), medians of 9 interleaved rounds, idle 2-core Intel Xeon,
# 7 Dec 2026; speed vs the equal-active dense FFN d -> k*h -> d (> 1 is faster):
#   E  k  tokens  loop fused bmm |  E  k  tokens  loop fused bmm |  E  k  tokens  loop fused bmm
#   4  1  1024    0.67 0.65 0.76 |  8  1  1024    0.63 0.57 0.68 | 32  1  1024    0.29 0.25 0.31
#   4  1  2048    0.80 0.91 0.85 |  8  1  2048    0.66 0.64 0.75 | 32  1  2048    0.40 0.36 0.43
#   4  1  4096    1.04 1.02 0.88 |  8  1  4096    0.76 0.73 0.72 | 32  1  4096    0.56 0.48 0.51
#   4  2  1024    0.76 0.75 0.82 |  8  2  1024    0.70 0.66 0.77 | 32  2  1024    0.40 0.36 0.44
#   4  2  2048    0.87 1.03 0.90 |  8  2  2048    0.77 0.74 0.82 | 32  2  2048    0.52 0.48 0.53
#   4  2  4096    0.91 1.09 0.90 |  8  2  4096    0.86 1.04 0.87 | 32  2  4096    0.67 0.74 0.69
# Rows move by up to 0.1 between runs. At k 2, 4096 tokens ([tokens * k, h] = 32 MiB) fused
# wins by 10-20%: glibc maps every tensor of 32 MiB or more afresh (its largest mmap
# threshold), and the pages fault on first write, while per-expert pieces are reused from the
# heap; with every allocation from the heap (MALLOC_MMAP_MAX_=0) fused, loop and bmm tie at
# e 8 (0.85) and the dense FFN gains as much. Below 32 MiB fused won only at e 4 (not again in
# other runs: 0.68-0.74 at 16 MiB, e 8), and bmm beat the loop in 14 of 15 rows (again in all
# six e 8 rows of a second run, 15 rounds). On the AMD EPYC of 2 Dec the loop won 11 of 12 of
# these rows against bmm. bfloat16 (padded slices, moe_kernels.PAD_ROWS), e 8 k 2 at 1024 and
# 4096 tokens, e 32 k 2 at 4096: loop 0.45 / 0.58 / 0.43, fused 0.43 / 0.58 / 0.39, bmm
# 0.32 / 0.47 / 0.36, so reduced precision keeps the loop. F.grouped_mm on CPU (torch 2.13)
# was no faster than the loop (its CPU kernel takes no bias and runs the same matmuls per
# group: 8192 sorted rows, fp32 e 8, two layers 317 vs 281 ms).
DISPATCHES = ("auto", "loop", "fused", "grouped", "bmm")
FUSED_MIN_HIDDEN_BYTES = 32 * 2**20
# The router above is balanced (its slab pads 3-23% at init: e 4-32, k 1-2, 1024-4096 tokens);
# a skewed one pads it up to e / k times the assignments, so bmm is taken only while it pads
# at most this much.
SLAB_MAX_PADDING = 1.5


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


class Plan(NamedTuple):
    """The assignments sorted by expert, as the dispatch kernels take them."""

    expert: Tensor  # [a] long, sorted
    gate: Tensor  # [a]
    token: Tensor  # [a] long
    rank: Tensor  # [a] long, position within its expert (choice-major order)
    counts: Tensor  # [e] long, assignments per expert before drops
    cap: int | None  # capacity per expert; None = no drop


def moe_aux_loss(model: nn.Module) -> Tensor:
    """Sum of the ``aux_loss`` every routed layer (:class:`MoE`, ``ConvMoE``) in ``model`` left
    at its latest call, ``[]`` (0 when there is none); add it to the task loss before
    ``backward``."""
    losses = [
        m.aux_loss for m in model.modules() if isinstance(m, Routed) and m.aux_loss is not None
    ]
    if not losses:
        p = next(model.parameters(), None)
        return torch.zeros((), device=None if p is None else p.device)
    return sum(losses[1:], losses[0])


def take_moe_aux_loss(model: nn.Module) -> Tensor:
    """:func:`moe_aux_loss`, then drop every layer's reference to it: a kept ``aux_loss``
    holds its whole graph (and the activations it saved) alive until the layer's next call,
    and pins the graph's record of the parameters' shapes across a rewiring."""
    loss = moe_aux_loss(model)
    for m in model.modules():
        if isinstance(m, Routed):
            m.aux_loss = None
    return loss


def moe_stats(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """The ``stats`` of every routed layer (:class:`MoE`, ``ConvMoE``) in ``model`` from its
    latest call, keyed by module name (``""`` for ``model`` itself); layers not called yet are
    left out."""
    return {
        name: m.stats
        for name, m in model.named_modules()
        if isinstance(m, Routed) and m.stats is not None
    }


def expert_capacity(factor: float | None, k: int, tokens: int, n_experts: int) -> int | None:
    """Per-expert capacity ``ceil(factor * k * tokens / e)``; ``None`` means no limit."""
    return None if factor is None else math.ceil(factor * k * tokens / n_experts)


def build_router(
    router: str | nn.Module, d_in: int, n_experts: int, k: int, device=None, dtype=None
) -> nn.Module:
    """A router by name from ``ROUTERS``, or a given module checked against ``n_experts``/``k``."""
    if isinstance(router, str):
        if router not in ROUTERS:
            raise ValueError(f"router must be one of {', '.join(ROUTERS)}, got {router!r}.")
        return ROUTERS[router](d_in, n_experts, k, device=device, dtype=dtype)
    if not isinstance(router, nn.Module):
        raise ValueError(f"router must be a name or an nn.Module, got {router!r}.")
    if getattr(router, "n_experts", n_experts) != n_experts:
        raise ValueError(f"router has {router.n_experts} experts but n_experts is {n_experts}.")
    if getattr(router, "k", k) != k:
        raise ValueError(f"router chooses k={router.k} experts but k is {k}.")
    return router


class Routed(nn.Module):
    """What every routed layer shares: the router, capacity, drops, the aux losses and the side
    results it leaves (``aux_loss``, ``stats``). ``d_route`` is the router's input width.

    Subclasses build their experts and call, in ``forward``: :meth:`_route`, :meth:`_sort`, their
    expert kernel, ``combine``, :meth:`_drops`, :meth:`_losses`, :meth:`_store`.
    """

    def __init__(
        self,
        d_route: int,
        n_experts: int,
        k: int,
        *,
        router: str | nn.Module,
        capacity_factor: float | None,
        eval_capacity_factor: float | None,
        drop: str,
        balance: str,
        balance_weight: float,
        z_loss_weight: float,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_sizes(d_route, n_experts, k)
        for name, value in (
            ("capacity_factor", capacity_factor),
            ("eval_capacity_factor", eval_capacity_factor),
        ):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive or None, got {value}.")
        if drop not in DROPS:
            raise ValueError(f"drop must be one of {', '.join(DROPS)}, got {drop!r}.")
        if balance not in BALANCES:
            raise ValueError(f"balance must be one of {', '.join(BALANCES)}, got {balance!r}.")
        self.router = build_router(router, d_route, n_experts, k, device=device, dtype=dtype)
        self.n_experts, self.k = n_experts, k
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.drop, self.balance = drop, balance
        self.balance_weight, self.z_loss_weight = balance_weight, z_loss_weight
        self.aux_loss: Tensor | None = None  # weighted aux loss of the latest call, with its graph
        self.stats: dict[str, Tensor] | None = None  # detached statistics of the latest call

    def _route(self, tokens: Tensor) -> RouterOutput:
        """The router on ``[b, d_in]``; under autocast in float32, outside it."""
        if not _autocast_on(tokens):
            return self.router(tokens)
        p = next(self.router.parameters(), None)
        with _no_autocast(tokens):
            return self.router(tokens.to(torch.float32 if p is None else p.dtype))

    def _sort(self, x: Tensor, route: RouterOutput) -> Plan:
        """The ``[b, k]`` choices as expert-sorted assignments, their counts and the capacity."""
        b, k = route.indices.shape  # k may exceed self.k for dense-to-sparse routers
        e, a = self.n_experts, route.indices.numel()
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        expert = route.indices.t().reshape(-1)  # [a] choice-major: all 1st choices, then 2nd...
        gate = route.gates.t().reshape(-1)  # [a]
        token = torch.arange(b, device=x.device).repeat(k)  # [a]
        order = torch.argsort(expert, stable=True)  # stable keeps choice-major order per expert
        expert, gate, token = expert[order], gate[order], token[order]
        counts = count_per_expert(expert, e)  # [e] before drops
        rank = torch.arange(a, device=x.device) - (counts.cumsum(0) - counts)[expert]  # [a]
        return Plan(expert, gate, token, rank, counts, expert_capacity(factor, k, b, e))

    def _drops(self, x: Tensor, out: Tensor, plan: Plan) -> tuple[Tensor, Tensor, Tensor]:
        """``out [b, d_out]`` with ``x`` for tokens that lost every choice under
        ``drop="residual"``, the number of dropped assignments ``[]`` and those tokens ``[b]``."""
        b = x.shape[0]
        if plan.cap is None:
            return out, x.new_zeros((), dtype=torch.long), x.new_zeros(b, dtype=torch.bool)
        kept = (plan.rank < plan.cap).long()  # [a]
        all_dropped = kept.new_zeros(b).index_add(0, plan.token, kept) == 0  # [b]
        if self.drop == "residual":
            out = torch.where(all_dropped[:, None], x, out)
        return out, kept.numel() - kept.sum(), all_dropped

    def _losses(
        self, route: RouterOutput, plan: Plan, n_drop: Tensor, all_dropped: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted aux loss ``[]`` and the detached stats, in at least float32."""
        ldt = torch.promote_types(route.logits.dtype, torch.float32)
        e, a = self.n_experts, route.indices.numel()
        logits, probs = route.logits.to(ldt), route.probs.to(ldt)
        counts = plan.counts.to(ldt)
        if self.balance == "cv2":  # importance [e]: gate mass per expert
            importance = logits.new_zeros(e).index_add(0, plan.expert, plan.gate.to(ldt))
            balance = cv_squared(importance) + cv_squared(route.load.to(ldt))
        else:
            balance = switch_balance(counts, probs)
        z = router_z_loss(logits)
        aux = self.balance_weight * balance + self.z_loss_weight * z
        stats = {
            "load": (counts / max(a, 1)).detach(),
            "dropped_frac": (n_drop.to(ldt) / max(a, 1)).detach(),
            "dropped_tokens": all_dropped.to(ldt).mean().detach(),
            "gate_entropy": torch.special.entr(probs).sum(dim=1).mean().detach(),
            "balance_loss": balance.detach(),
            "z_loss": z.detach(),
        }
        return aux, stats

    def __getstate__(self) -> dict:
        """Copies and pickles leave out the latest call's side results (they hold a graph)."""
        return {**self.__dict__, "aux_loss": None, "stats": None}

    def _store(self, aux: Tensor, stats: dict[str, Tensor]) -> None:
        if not torch.compiler.is_exporting():  # an exported graph returns the output only
            self.aux_loss, self.stats = aux, stats


class MoE(Routed):
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
        drop: what a token whose every choice was dropped outputs: ``"zero"`` or
            ``"residual"`` (``x``, needs ``d_in == d_out``).
        balance: ``"cv2"`` (Shazeer: cv²(importance) + cv²(load)) or ``"switch"``.
        balance_weight: weight of the balance loss in ``aux_loss``.
        z_loss_weight: weight of the router z-loss in ``aux_loss``.
        act_layer: expert activation class, e.g. ``nn.GELU``.
        expert_dropout: dropout on the experts' hidden units (Switch Transformer's "expert
            dropout", a regulariser for experts that each see only part of the data).
        expert_wirings: sparse experts: two ``Wiring`` s (``d_in -> h`` and ``h -> d_out``)
            shared by every expert; their unit masks multiply the expert weights, and each
            hidden or output unit is initialised for its real fan-in.
        dispatch: ``"auto"`` (see the note above ``DISPATCHES``), ``"loop"`` (one matmul per
            expert on its sorted slice), ``"grouped"`` (``F.grouped_mm`` over the slices) or
            ``"bmm"`` (a slab of ``c`` rows per expert gathered into ``[e, c, d]`` and batched
            matmuls; no host sync when a capacity is set). All give the same outputs and
            gradients.

    Shapes: ``[*, d_in] -> [*, d_out]``; ``aux_loss []`` and ``stats`` are left on the layer.

    ``torch.compile``: with a capacity factor set (in the mode being run) the whole layer
    compiles with ``fullgraph=True``. Without one it has one graph break: the expert loop, whose
    slice sizes are data, or from 512 rows per expert a compiled slab of ``ceil(b * k / e)``
    rows per expert with the overflow past it run eagerly through the loop (the dense-to-sparse
    routers add one more break: their schedule is read as a Python number). ``torch.export``
    traces it for inference; without an eval capacity the exported graph pads every expert to
    all tokens (exact, but ``e / k`` times the expert work).
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
        drop: str = "zero",
        balance: str = "cv2",
        balance_weight: float = 1e-2,
        z_loss_weight: float = 1e-3,
        act_layer: type[nn.Module] = nn.GELU,
        expert_dropout: float = 0.0,
        expert_wirings: tuple[Wiring, Wiring] | None = None,
        dispatch: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            d_in,
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
        for name, value in (("d_out", d_out), ("expert_hidden", expert_hidden)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}.")
        if not 0 <= expert_dropout < 1:
            raise ValueError(f"expert_dropout must be in [0, 1), got {expert_dropout}.")
        if drop == "residual" and d_in != d_out:
            raise ValueError(
                f'drop="residual" needs d_in == d_out, got {d_in} and {d_out}; use drop="zero".'
            )
        if dispatch not in DISPATCHES:
            raise ValueError(f"dispatch must be one of {', '.join(DISPATCHES)}, got {dispatch!r}.")
        self.d_in, self.d_out, self.expert_hidden, self.dispatch = (
            d_in,
            d_out,
            expert_hidden,
            dispatch,
        )
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

    def forward(self, x: Tensor) -> Tensor:
        """``[*, d_in] -> [*, d_out]``. Leaves the weighted aux loss ``[]`` (with its graph) in
        ``self.aux_loss`` and the detached statistics in ``self.stats``: ``load`` [e] fraction
        of assignments per expert before drops, ``dropped_frac`` fraction of assignments
        dropped, ``dropped_tokens`` fraction of tokens with every choice dropped,
        ``gate_entropy`` mean entropy of the full routing distribution, ``balance_loss`` and
        ``z_loss`` unweighted.
        """
        tokens = self._tokens(x)  # [b, d_in]
        route = self._route(tokens)
        xs = tokens.to(_compute_dtype(tokens))  # [b, d_in] in the experts' dtype
        plan = self._sort(xs, route)
        dispatch, experts = self._pick_dispatch(xs, plan), self._experts(xs.dtype)
        # the graph break of an eager kernel is called from forward itself: a break inside a
        # helper would split every frame above it too
        if dispatch in EAGER_DISPATCHES:
            out = mix_eagerly(self._pick_dispatch, xs, plan, experts)  # [b, d_out]
        else:
            y, y_gate, y_token = DISPATCH_KERNELS[dispatch](xs, *plan, experts)
            out = combine(y, y_gate.to(y.dtype), y_token, xs.shape[0])  # [b, d_out]
        out, n_drop, all_dropped = self._drops(xs, out, plan)
        aux, stats = self._losses(route, plan, n_drop, all_dropped)
        self._store(aux, stats)
        return out.view(*x.shape[:-1], self.d_out)

    def route(self, x: Tensor) -> RouterOutput:
        """The router's choices for the tokens of ``x [*, d_in]``, experts not run:
        ``indices, gates [b, k]`` (best first), ``logits, probs [b, e]``, ``b`` = every leading
        position. Deterministic in eval mode (training-mode routers draw noise), so analysis
        reads the routing the forward would use."""
        return self._route(self._tokens(x))

    def _tokens(self, x: Tensor) -> Tensor:
        if x.ndim == 0 or x.shape[-1] != self.d_in:
            raise ValueError(f"MoE expects input [*, {self.d_in}], got {list(x.shape)}.")
        return x.reshape(-1, self.d_in)  # [b, d_in]

    def _pick_dispatch(self, x: Tensor, plan: Plan) -> str:
        """The expert kernel of ``auto`` (the rule and its measurements: above ``DISPATCHES``)."""
        if self.dispatch != "auto":
            return self.dispatch
        compiling, cpu = torch.compiler.is_compiling(), x.device.type == "cpu"
        static = compiling and plan.cap is not None
        if static or x.device.type == "meta" or torch.compiler.is_exporting():
            return "bmm"
        hidden_bytes = x.shape[0] * self.k * self.expert_hidden * x.element_size()
        if cpu and hidden_bytes >= FUSED_MIN_HIDDEN_BYTES:
            return "fused"
        if compiling:  # dropless: eager, where mix_eagerly asks again with readable counts
            return "loop"
        if x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16):
            return "grouped"
        a = plan.expert.shape[0]
        if cpu and x.dtype == torch.float32 and a:
            c = slab_rows(x, plan.counts, plan.cap, a)  # a host sync
            return "bmm" if self.n_experts * c <= SLAB_MAX_PADDING * a else "loop"
        return "loop"

    def _experts(self, dtype: torch.dtype) -> Experts:
        """The expert weights in the compute ``dtype`` (a no-op outside autocast), masked for
        sparse experts."""
        w1, w2 = self.w1, self.w2
        if self.expert_density is not None:
            w1, w2 = w1 * self.mask1, w2 * self.mask2
        return w1.to(dtype), self.b1.to(dtype), w2.to(dtype), self.b2.to(dtype), self.act

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


def _autocast_on(x: Tensor) -> bool:
    kind = x.device.type
    return torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The experts' dtype: the autocast dtype where autocast is on for ``x``'s device, else
    ``x``'s own."""
    return torch.get_autocast_dtype(x.device.type) if _autocast_on(x) else x.dtype


def _no_autocast(x: Tensor) -> contextlib.AbstractContextManager:
    """Autocast off on ``x``'s device: the kernels get operands already in one dtype."""
    return torch.autocast(x.device.type, enabled=False) if _autocast_on(x) else nullcontext()
