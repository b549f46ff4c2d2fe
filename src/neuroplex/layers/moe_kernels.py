"""Expert kernels of :class:`neuroplex.layers.moe.MoE`: run the experts on expert-sorted rows.

Shape legend: ``b`` tokens, ``d`` features (``d_in`` in, ``d_out`` out), ``e`` experts,
``a`` assignments (``b * k``), ``c`` capacity (rows per expert), ``h`` expert hidden width.

Every dispatch takes the assignments sorted by expert (``expert``, ``gate``, ``token``, and
``rank`` = position within its expert, all ``[a]``), the per-expert ``counts [e]``, the capacity
``cap`` (``None``: no drop) and the expert weights, and returns the expert outputs of the kept
assignments ``[a', d_out]`` with their gates and tokens. Paths:

- ``loop``: one matmul per expert on its contiguous slice (slice sizes are host ints: a sync);
- ``grouped``: the same slices as one ``torch.nn.functional.grouped_mm`` per layer with an
  offsets tensor (no host sync when nothing is dropped);
- ``bmm``: a slab of ``c`` rows per expert gathered into ``[e, c, d_in]``, two batched matmuls;
  with a capacity (or ``c = b`` where no count can be read: meta tensors, ``torch.export``) no
  data-dependent shape at all, so it is the path ``torch.compile(fullgraph=True)`` traces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

Experts = tuple[Tensor, Tensor, Tensor, Tensor, nn.Module]  # w1 [e,d,h], b1, w2 [e,h,o], b2, act
Routed = tuple[Tensor, Tensor, Tensor]  # expert outputs [a', d_out], gates [a'], tokens [a']


def keep_within_capacity(
    expert: Tensor, gate: Tensor, token: Tensor, rank: Tensor, counts: Tensor, cap: int | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The assignments within capacity (``nonzero``: a host sync), still sorted by expert, and
    the per-expert counts after the drop."""
    if cap is None:
        return expert, gate, token, counts
    keep = (rank < cap).nonzero().squeeze(1)  # [a_kept]
    return expert[keep], gate[keep], token[keep], counts.clamp(max=cap)


@torch.compiler.disable
def dispatch_loop(x, expert, gate, token, rank, counts, cap, experts: Experts) -> Routed:
    """One matmul per expert and layer (``counts.tolist()`` syncs with the host: the slice sizes
    must be Python ints). Under ``torch.compile`` this function runs eagerly: the one graph
    break of the dropless path."""
    _, gate, token, counts = keep_within_capacity(expert, gate, token, rank, counts, cap)
    return _loop_rows(x, token, counts.tolist(), experts), gate, token


def _loop_rows(x: Tensor, token: Tensor, sizes: list[int], experts: Experts) -> Tensor:
    """The rows ``x[token]``, in consecutive groups of ``sizes[j]`` for expert ``j``, through
    the experts: ``[a', d_out]``."""
    w1, b1, w2, b2, act = experts
    hidden = act(_GroupedLinear.apply(x.index_select(0, token), w1, b1, sizes))  # [a', h]
    return _GroupedLinear.apply(hidden, w2, b2, sizes)


GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def dispatch_grouped(x, expert, gate, token, rank, counts, cap, experts: Experts) -> Routed:
    """``grouped_mm`` over the expert slices, delimited by ``offs = cumsum(counts)`` (int32).

    ``grouped_mm`` takes no bias on CPU, so each row adds its expert's bias by ``index_select``.
    """
    w1, b1, w2, b2, act = experts
    if x.dtype not in GROUPED_DTYPES:
        raise ValueError(f'dispatch="grouped" runs float32, bfloat16 or float16, got {x.dtype}.')
    expert, gate, token, counts = keep_within_capacity(expert, gate, token, rank, counts, cap)
    offs = counts.cumsum(0).to(torch.int32)  # [e] end row of each expert
    rows = x.index_select(0, token)  # [a', d_in]
    hidden = act(F.grouped_mm(rows, w1, offs=offs) + b1.index_select(0, expert))  # [a', h]
    y = F.grouped_mm(hidden, w2, offs=offs) + b2.index_select(0, expert)  # [a', d_out]
    return y, gate, token


def dispatch_bmm(x, expert, gate, token, rank, counts, cap, experts: Experts) -> Routed:
    """A slab of ``c`` rows per expert in two batched matmuls: ``[e * c, d_out]``.

    ``c`` is the capacity, or every token (``c = b``: exact, a token picks an expert at most
    once) where counts cannot be read (meta tensors, ``torch.export``), or else the largest
    count. Under ``torch.compile`` with no capacity, ``c = ceil(a / e)``: the slab keeps static
    shapes and compiles with the rest, and :func:`add_overflow` runs the rows past ``c``.
    The slab gathers its rows straight from ``x`` by a ``[e, c]`` index (slots past an expert's
    count re-read a token with gate 0), so there is no buffer to scatter into and no gather
    back: the combine adds the slab's rows in place.
    """
    c = slab_rows(x, counts, cap, expert.shape[0], experts[0].shape[0])
    return _slab(x, gate, token, counts, c, experts)


@torch.compiler.disable
def add_overflow(
    x, expert, gate, token, rank, counts, cap, experts: Experts, slab: Routed
) -> Routed:
    """The slab of :func:`dispatch_bmm` (no capacity, ``c < b``) plus the assignments of rank
    ``>= c`` through the loop (``nonzero`` and ``tolist``: host syncs, hence eager even under
    ``torch.compile``: the one graph break of the dropless path)."""
    c = slab[0].shape[0] // counts.shape[0]
    over = (rank >= c).nonzero().squeeze(1)  # [a_o], still sorted by expert
    if over.numel() == 0:
        return slab
    token_o = token[over]
    y_o = _loop_rows(x, token_o, (counts - c).clamp(min=0).tolist(), experts)  # [a_o, d_out]
    y, slab_gate, slab_token = slab
    return torch.cat([y, y_o]), torch.cat([slab_gate, gate[over]]), torch.cat([slab_token, token_o])


def slab_rows(x: Tensor, counts: Tensor, cap: int | None, a: int, e: int) -> int:
    """Rows per expert in the slab of :func:`dispatch_bmm` (see there)."""
    b = x.shape[0]
    if cap is not None:
        return min(cap, b)
    if x.device.type == "meta" or torch.compiler.is_exporting():
        return b
    if torch.compiler.is_compiling():
        return min(-(-a // e), b)
    return int(counts.max().item()) if a else 0


def _slab(x, gate, token, counts, c: int, experts: Experts) -> Routed:
    """Expert ``j``'s first ``min(count_j, c)`` assignments as rows ``j * c + i`` of
    ``[e * c, d_out]``, with their gates (0 on empty slots) and tokens."""
    w1, b1, w2, b2, act = experts
    e, a = w1.shape[0], gate.shape[0]
    i = torch.arange(c, device=x.device)  # [c]
    pos = (counts.cumsum(0) - counts)[:, None] + i  # [e, c] position among the sorted assignments
    filled = (i < counts[:, None]).reshape(-1)  # [e * c]
    pos = pos.reshape(-1).clamp(max=max(a - 1, 0))
    slab_token = token[pos] if a else token.new_zeros(e * c)
    slab_gate = torch.where(filled, gate[pos], 0) if a else gate.new_zeros(e * c)
    rows = x.index_select(0, slab_token).view(e, c, x.shape[1])  # [e, c, d_in]
    # bmm then an in-place bias add: baddbmm with a broadcast bias took ~1.7x the plain bmm
    hidden = act(torch.bmm(rows, w1).add_(b1[:, None, :]))  # [e, c, h]
    y = torch.bmm(hidden, w2).add_(b2[:, None, :]).reshape(e * c, w2.shape[2])  # [e * c, d_out]
    return y, slab_gate, slab_token


DISPATCH_KERNELS = {"loop": dispatch_loop, "grouped": dispatch_grouped, "bmm": dispatch_bmm}


def combine(y: Tensor, gate: Tensor, token: Tensor, b: int) -> Tensor:
    """``out[t] = sum of gate[r] * y[r]`` over the rows ``r`` of token ``t``: ``[a, d] -> [b, d]``.

    Eager: :class:`_GatedCombine` (fewer temporaries); traced by ``torch.compile`` or export:
    the same sum as plain ops (the compiler fuses them, and a custom autograd function with a
    once-differentiable backward would break the graph).
    """
    if torch.compiler.is_compiling():
        return y.new_zeros(b, y.shape[1]).index_add(0, token, y * gate[:, None])
    return _GatedCombine.apply(y, gate, token, b)


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


class _GatedCombine(torch.autograd.Function):
    """``zeros.index_add(0, token, y * gate[:, None])`` with two fewer ``[a, d]`` temporaries in
    backward (the gate gradient is a row-wise dot product, not a product then a sum), which
    matters because everything around the expert matmuls is memory-bound."""

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
