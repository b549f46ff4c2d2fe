"""Expert kernels of :class:`neuroplex.layers.moe.MoE`: run the experts on expert-sorted rows.

Shape legend: ``b`` tokens, ``d`` features (``d_in`` in, ``d_out`` out), ``e`` experts,
``a`` assignments (``b * k``), ``c`` capacity (rows per expert), ``h`` expert hidden width.

Every dispatch takes the assignments sorted by expert (``expert``, ``gate``, ``token``, and
``rank`` = position within its expert, all ``[a]``), the per-expert ``counts [e]``, the capacity
``cap`` (``None``: no drop) and the expert weights, and returns the expert outputs of the kept
assignments ``[a', d_out]`` with their gates and tokens. Paths:

- ``loop``: one matmul per expert on its contiguous slice (slice sizes are host ints: a sync);
- ``fused``: the same slices, but each expert's whole MLP (both layers and the activation) in
  turn, so no hidden tensor spans every expert's rows (:class:`_ExpertMLP`);
- ``grouped``: the same slices as one ``torch.nn.functional.grouped_mm`` per layer with an
  offsets tensor (no host sync when nothing is dropped);
- ``bmm``: a slab of ``c`` rows per expert gathered into ``[e, c, d_in]``, two batched matmuls;
  with a capacity (or ``c = b`` where no count can be read: meta tensors, ``torch.export``) no
  data-dependent shape at all, so it is the path ``torch.compile(fullgraph=True)`` traces.
"""

from __future__ import annotations

from collections.abc import Callable

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


# CPU bfloat16/float16 matmuls run through oneDNN, which builds a kernel for every new shape
# (~3 ms each, measured on 2 threads); the number of rows each expert gets changes from call
# to call, so each eager expert slice is padded to a multiple of this many rows (zero gates)
# to keep the shapes few and cached.
PAD_ROWS = 32
PADDED_DTYPES = (torch.bfloat16, torch.float16)


def pad_slices(x: Tensor, gate: Tensor, token: Tensor, counts: Tensor) -> tuple[Tensor, ...]:
    """Each expert's slice of the sorted ``gate, token [a]`` padded to a multiple of
    ``PAD_ROWS`` rows (token 0, gate 0) where ``x`` is CPU bfloat16/float16, with the padded
    ``counts [e]``; the inputs unchanged elsewhere. The padded rows add nothing to the output
    and, with gate 0, send no gradient to the weights (``repeat_interleave``: a host sync)."""
    if x.device.type != "cpu" or x.dtype not in PADDED_DTYPES:
        return gate, token, counts
    padded = (counts + PAD_ROWS - 1) // PAD_ROWS * PAD_ROWS  # [e]
    row_expert = torch.repeat_interleave(padded)  # [a_pad] expert of each padded row
    i = torch.arange(row_expert.shape[0], device=x.device) - (padded.cumsum(0) - padded)[row_expert]
    filled = i < counts[row_expert]
    src = ((counts.cumsum(0) - counts)[row_expert] + i).clamp(max=max(gate.shape[0] - 1, 0))
    return torch.where(filled, gate[src], 0), torch.where(filled, token[src], 0), padded


def dispatch_loop(x, expert, gate, token, rank, counts, cap, experts: Experts) -> Routed:
    """One matmul per expert and layer (``counts.tolist()`` syncs with the host: the slice sizes
    must be Python ints; run through :func:`mix_eagerly`)."""
    _, gate, token, counts = keep_within_capacity(expert, gate, token, rank, counts, cap)
    gate, token, counts = pad_slices(x, gate, token, counts)
    return _loop_rows(x, token, counts.tolist(), experts), gate, token


def _loop_rows(x: Tensor, token: Tensor, sizes: list[int], experts: Experts) -> Tensor:
    """The rows ``x[token]``, in consecutive groups of ``sizes[j]`` for expert ``j``, through
    the experts: ``[a', d_out]``."""
    w1, b1, w2, b2, act = experts
    hidden = act(_GroupedLinear.apply(x.index_select(0, token), w1, b1, sizes))  # [a', h]
    return _GroupedLinear.apply(hidden, w2, b2, sizes)


def dispatch_fused(x, expert, gate, token, rank, counts, cap, experts: Experts) -> Routed:
    """Each expert's MLP in turn on its slice (``counts.tolist()``: a host sync, as in the
    loop; run through :func:`mix_eagerly`)."""
    _, gate, token, counts = keep_within_capacity(expert, gate, token, rank, counts, cap)
    gate, token, counts = pad_slices(x, gate, token, counts)
    rows = x.index_select(0, token)  # [a', d_in]
    w1, b1, w2, b2, act = experts
    graph = torch.is_grad_enabled() and any(t.requires_grad for t in (rows, w1, b1, w2, b2))
    return _ExpertMLP.apply(rows, w1, b1, w2, b2, act, counts.tolist(), graph), gate, token


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

    ``c`` is the capacity, or the largest count where counts can be read (eager), or else every
    token (``c = b``: exact, since a token picks an expert at most once, but ``e / k`` times the
    expert FLOPs: meta tensors, ``torch.export`` and ``torch.compile`` without a capacity, all
    with static shapes and no graph break).
    The slab gathers its rows straight from ``x`` by a ``[e, c]`` index (slots past an expert's
    count re-read a token with gate 0), so there is no buffer to scatter into and no gather
    back: the combine adds the slab's rows in place.
    """
    c = slab_rows(x, counts, cap, expert.shape[0])
    return _slab(x, gate, token, counts, c, experts)


def slab_rows(x: Tensor, counts: Tensor, cap: int | None, a: int) -> int:
    """Rows per expert in the slab of :func:`dispatch_bmm` (see there)."""
    b = x.shape[0]
    if cap is not None:
        return min(cap, b)
    unreadable = x.device.type == "meta" or torch.compiler.is_compiling()
    if unreadable or torch.compiler.is_exporting():
        return b
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


DISPATCH_KERNELS = {
    "loop": dispatch_loop,
    "fused": dispatch_fused,
    "grouped": dispatch_grouped,
    "bmm": dispatch_bmm,
}


EAGER_DISPATCHES = ("loop", "fused")  # their slice sizes are host ints: never traced


@torch.compiler.disable
def mix_eagerly(pick: Callable[..., str], x: Tensor, plan: tuple, experts: Experts) -> Tensor:
    """The kernel ``pick(x, plan)`` names, then the combine: ``[b, d_out]``. Eager even under
    ``torch.compile``, where this is the one graph break of the dropless path: ``pick`` runs
    here, where the counts can be read (``auto`` may take bmm's slab of the largest count),
    and the combine behind the same break runs as :class:`_GatedCombine` rather than as
    traced ops (compiled MoE at 4096 tokens, e 8, k 2, fused: 0.97x -> 1.02x the compiled
    dense FFN, 11 interleaved rounds, Intel Xeon, 7 Dec 2026)."""
    y, gate, token = DISPATCH_KERNELS[pick(x, plan)](x, *plan, experts)
    return combine(y, gate.to(y.dtype), token, x.shape[0])


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
        for j, rows in _groups(sizes):
            torch.addmm(b[j], x[rows], w[j], out=out[rows])
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
        _zero_unrouted(ctx.sizes, grad_w, grad_b)
        for j, rows in _groups(ctx.sizes):
            if need_x:
                torch.mm(grad[rows], w[j].t(), out=grad_x[rows])
            if need_w:
                torch.mm(x[rows].t(), grad[rows], out=grad_w[j])
            if need_b:
                torch.sum(grad[rows], dim=0, out=grad_b[j])
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


class _ExpertMLP(torch.autograd.Function):
    """``x [a, d_in]`` in consecutive groups of ``sizes[j]`` rows, group ``j`` through expert
    ``j``'s ``act(x @ w1[j] + b1[j]) @ w2[j] + b2[j]``: ``[a, d_out]``.

    One expert at a time, so each hidden tensor is one expert's ``[rows, h]``, never the
    ``[a, h]`` of every expert at once. On CPU that is the point: a tensor of 32 MiB or more is
    a fresh ``mmap`` on every call (glibc's largest threshold), whose every page faults when it
    is first written, while per-expert pieces are reused from the heap; and the activation
    reads its input while the matmul has just left it in cache. The activation is any module
    (dropout included): it runs under autograd on each piece (``graph``: grad is needed) and
    its gradient is taken by ``torch.autograd.grad`` in backward. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, act: nn.Module, sizes: list[int], graph: bool) -> Tensor:
        out = x.new_empty(x.shape[0], w2.shape[2])
        pre, hidden = [], []  # per non-empty expert: [n_j, h] before and after the activation
        for j, rows in _groups(sizes):
            p = torch.addmm(b1[j], x[rows], w1[j]).requires_grad_(graph)
            with torch.set_grad_enabled(graph):
                a = act(p)
            torch.addmm(b2[j], a.detach(), w2[j], out=out[rows])
            pre.append(p)
            hidden.append(a)
        # the hidden pieces through save_for_backward (so saved-tensor hooks see them); their
        # activations' graphs, which hold the pre-activations, on ctx
        ctx.save_for_backward(x, w1, w2, *(a.detach() for a in hidden))
        ctx.pre, ctx.hidden, ctx.sizes = pre, hidden, sizes
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, w1, w2, *hidden = ctx.saved_tensors
        keep = _keeps_graph()  # backward(retain_graph=True): the pieces' graphs stay for another
        need_x = ctx.needs_input_grad[0]
        grad_x = x.new_empty(x.shape) if need_x else None
        grad_w1, grad_w2 = torch.empty_like(w1), torch.empty_like(w2)
        grad_b1, grad_b2 = (
            w1.new_empty(w1.shape[0], w1.shape[2]),
            w2.new_empty(w2.shape[0], w2.shape[2]),
        )
        _zero_unrouted(ctx.sizes, grad_w1, grad_b1, grad_w2, grad_b2)
        for i, (j, rows) in enumerate(_groups(ctx.sizes)):
            g = grad[rows]  # [n_j, d_out]
            torch.mm(hidden[i].t(), g, out=grad_w2[j])
            torch.sum(g, dim=0, out=grad_b2[j])
            grad_a = torch.mm(g, w2[j].t())  # [n_j, h]
            a, p = ctx.hidden[i], ctx.pre[i]
            if a.requires_grad:
                grad_p = torch.autograd.grad(a, p, grad_a, retain_graph=keep)[0]
            else:
                grad_p = grad_a.zero_()
            torch.mm(x[rows].t(), grad_p, out=grad_w1[j])
            torch.sum(grad_p, dim=0, out=grad_b1[j])
            if need_x:
                torch.mm(grad_p, w1[j].t(), out=grad_x[rows])
        if not keep:  # freed with the rest of the graph's saved tensors, not when ctx dies
            ctx.pre = ctx.hidden = None
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None, None, None


def _keeps_graph() -> bool:
    """Whether the running backward was asked to ``retain_graph`` (a private torch query; if
    it is gone, the graph is kept: memory held longer, never a failed second backward)."""
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if query is None else bool(query())


def _zero_unrouted(sizes: list[int], *grads: Tensor | None) -> None:
    """Zero ``g[j]`` of every gradient ``g`` (None: not needed) for each expert ``j`` with no
    rows: its kernels skip it, and its gradient is zero."""
    for j in (j for j, n in enumerate(sizes) if n == 0):
        for g in grads:
            if g is not None:
                g[j].zero_()


def _groups(sizes: list[int]):
    """``(j, rows)`` for each expert ``j`` with rows, ``rows`` its slice of consecutive groups
    of ``sizes[j]``."""
    start = 0
    for j, n in enumerate(sizes):
        if n:
            yield j, slice(start, start + n)
        start += n
