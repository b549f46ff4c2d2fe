"""Autograd kernels of SparseLinear's masked-dense and block paths
(layouts in neuroplex.layers.sparse).

Shape legend: ``b`` batch, ``g`` ensembles (blocks) per side, ``s`` block size (``s_in``,
``s_out``), ``k`` input blocks per output block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

_DIMS = ("k", "g_in", "g_out", "s_in", "s_out")
GATHER_BYTES = 8 * 2**20  # reused gather buffer: cache-sized, never a fresh mmap per call


def _windows(t: Tensor, g: int, width: int, step: int, offset: int = 0) -> Tensor:
    """``g`` overlapping column windows of ``t [b, m]``, window ``q`` starting at column
    ``offset + q * step``: a ``[g, b, width]`` view, no copy."""
    return t.as_strided((g, t.shape[0], width), (step, t.stride(0), 1), t.storage_offset() + offset)


class MaskedLinear(torch.autograd.Function):
    """``F.linear(x, weight * mask, bias)`` that masks the weight gradient in place
    (one ``[n_out, n_in]`` temporary fewer than autograd's version)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None) -> Tensor:
        masked = weight * mask
        ctx.save_for_backward(x, masked, mask)
        return F.linear(x, masked, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, masked, mask = ctx.saved_tensors
        grad_x = grad.mm(masked) if ctx.needs_input_grad[0] else None
        grad_w = grad.t().mm(x).mul_(mask) if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(0) if ctx.needs_input_grad[3] else None
        return grad_x, grad_w, None, grad_b


def _blocks_of(t: Tensor, index: Tensor, s: int) -> Tensor:
    """Blocks ``index`` of ``t [b, g*s]``, concatenated: ``[b, len(index)*s]``."""
    return t.view(t.shape[0], -1, s).index_select(1, index).view(t.shape[0], -1)


def _to_ensembles(y: Tensor, geo: dict) -> Tensor:
    """``[g, b, s]`` by cyclic position ``-> [b, g*s]`` by ensemble (one copy)."""
    return y.transpose(0, 1).index_select(1, geo["position"]).view(y.shape[1], -1)


class WindowMatmul(torch.autograd.Function):
    """Block-window product; ``x [b, g*s_in]`` padded, ``weight [g, k*s_in, s_out]`` with
    ``weight[q]`` reading the input blocks at cyclic positions ``q .. q+k-1``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, geo: dict) -> Tensor:
        g, k, s_in, s_out = geo["g_out"], geo["k"], geo["s_in"], geo["s_out"]
        ctx.save_for_backward(x, weight)
        ctx.geo = geo
        win = _windows(_blocks_of(x, geo["ext_in"], s_in), g, k * s_in, s_in)  # [g, b, k*s_in]
        bias = None if bias is None else bias.view(g, 1, s_out).index_select(0, geo["order"])
        y = torch.bmm(win, weight) if bias is None else torch.baddbmm(bias, win, weight)
        return _to_ensembles(y, geo)  # [g, b, s_out] by position -> [b, g*s_out]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        geo = ctx.geo
        g, k, s_in, s_out = geo["g_out"], geo["k"], geo["s_in"], geo["s_out"]
        # ge: grad columns by output position q-k+1 .. g-1 (cyclic), [b, (g+k-1)*s_out]
        ge = _blocks_of(grad.contiguous(), geo["ext_out"], s_out)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # input position q is read by output positions q-k+1 .. q: one window of ge
            w_t = weight.view(g, k, s_in, s_out).transpose(2, 3).reshape(g * k, s_out, s_in)
            w_t = w_t.index_select(0, geo["readers"]).view(g, k * s_out, s_in)
            grad_x = _to_ensembles(torch.bmm(_windows(ge, g, k * s_out, s_out), w_t), geo)
        if ctx.needs_input_grad[1]:
            win = _windows(_blocks_of(x, geo["ext_in"], s_in), g, k * s_in, s_in)
            grad_y = _windows(ge, g, s_out, s_out, offset=(k - 1) * s_out)  # [g, b, s_out]
            grad_w = torch.bmm(win.transpose(1, 2), grad_y)
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b, None


def _spans(n: int, per: int):
    """``[i0, i1)`` chunks of ``range(n)``, ``per`` at a time."""
    for i0 in range(0, n, per):
        yield i0, min(i0 + per, n)


def _per_chunk(t: Tensor, rows: int) -> int:
    """How many items of ``rows`` rows of ``t [_, b]`` fit ``GATHER_BYTES`` (at least 1)."""
    return max(1, GATHER_BYTES // (t.element_size() * t.shape[1] * rows))


class GatherMatmul(torch.autograd.Function):
    """Block-gather product, in the transposed layout where a block is contiguous.

    ``x [b, g_in*s_in]`` padded, ``weight [g_out, k*s_in, s_out]`` with ``weight[j]``
    reading input ensembles ``geo["gather"][j]`` (``[g_out, k]``). Working on ``x^T
    [g_in, s_in, b]`` makes every block one contiguous ``s_in*b`` chunk, so gathering the
    ``k`` inputs of a few outputs at a time is a chunk copy and each product one ``bmm``
    (reduction over ``k*s_in``). The input gradient runs per group of input ensembles with the
    same fan-out ``f``: ``geo["fan_order"]`` lists them, ``geo["fan_readers"]`` their reading
    weight blocks (``j*k+t``), ``geo["fan_groups"]`` the ``(count, f)`` of each group: one
    ``bmm`` per group reducing over ``f*s_out``, with no padding to the largest fan-out.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, geo: dict) -> Tensor:
        b, g_out, s_in, s_out = x.shape[0], geo["g_out"], geo["s_in"], geo["s_out"]
        xt = x.t().contiguous()  # [g_in*s_in, b]
        ctx.save_for_backward(xt, weight)
        ctx.geo = geo
        yt = x.new_empty(g_out, s_out, b)
        w_t = weight.transpose(1, 2)  # [g_out, s_out, k*s_in]
        for j0, j1, blocks in _gather_t(xt, geo["gather"], s_in):
            if bias is None:
                torch.bmm(w_t[j0:j1], blocks, out=yt[j0:j1])
            else:
                bias_t = bias.view(g_out, s_out, 1)[j0:j1].expand(-1, -1, b)
                torch.baddbmm(bias_t, w_t[j0:j1], blocks, out=yt[j0:j1])
        return yt.view(g_out * s_out, b).t().contiguous()  # [b, g_out*s_out]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        xt, weight = ctx.saved_tensors
        geo = ctx.geo
        gt = grad.t().contiguous()  # [g_out*s_out, b]
        grad_x = _grad_input(gt, weight, geo) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            g_out, s_out, b = geo["g_out"], geo["s_out"], gt.shape[1]
            grad_w = torch.empty_like(weight)
            go = gt.view(g_out, s_out, b).transpose(1, 2)  # [g_out, b, s_out]
            for j0, j1, blocks in _gather_t(xt, geo["gather"], geo["s_in"]):
                torch.bmm(blocks, go[j0:j1], out=grad_w[j0:j1])
        grad_b = grad.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


def _gather_t(xt: Tensor, gather: Tensor, s: int):
    """Yield ``(j0, j1, blocks)``: for a few outputs ``j0 <= j < j1`` at a time, the blocks
    ``gather[j]`` of ``xt [g*s, b]`` stacked as ``blocks [j1-j0, k*s, b]`` (a view of one
    reused buffer of at most ``GATHER_BYTES``)."""
    (g_dst, k), b = gather.shape, xt.shape[1]
    per = _per_chunk(xt, k * s)
    buf = xt.new_empty(min(per, g_dst) * k, s * b)
    src = xt.view(-1, s * b)  # one row per block
    for j0, j1 in _spans(g_dst, per):
        part = buf[: (j1 - j0) * k]
        torch.index_select(src, 0, gather[j0:j1].reshape(-1), out=part)
        yield j0, j1, part.view(j1 - j0, k * s, b)


def _grad_input(gt: Tensor, weight: Tensor, geo: dict) -> Tensor:
    """``grad [b, g_out*s_out]`` (as ``gt``, transposed) -> ``grad_x [b, g_in*s_in]``: input
    ensemble ``i`` gets the sum over its readers ``r`` of ``grad_out(r) @ block(r)^T``."""
    k, g_in, g_out, s_in, s_out = (geo[n] for n in _DIMS)
    b = gt.shape[1]
    blocks = weight.reshape(g_out * k, s_in, s_out)
    src = gt.view(g_out, s_out * b)  # one row per output block
    fed = sum(count for count, _ in geo["fan_groups"])
    gxt = gt.new_empty(g_in, s_in, b) if fed == g_in else gt.new_zeros(g_in, s_in, b)
    start = read = 0  # first input ensemble and first reader of the group
    for count, f in geo["fan_groups"]:
        ids = geo["fan_readers"][read : read + count * f].view(count, f)
        for i0, i1 in _spans(count, _per_chunk(gt, f * s_out)):
            rd, c = ids[i0:i1], i1 - i0
            go = src.index_select(0, rd.reshape(-1) // k).view(c, f * s_out, b)
            # [c, f, s_in, s_out] -> [c, s_in, f*s_out]: the readers' blocks side by side
            w_t = blocks.index_select(0, rd.reshape(-1)).view(c, f, s_in, s_out)
            w_t = w_t.permute(0, 2, 1, 3).reshape(c, s_in, f * s_out)
            gxt[geo["fan_order"][start + i0 : start + i1]] = torch.bmm(w_t, go)
        start, read = start + count, read + count * f
    return gxt.view(g_in * s_in, b).t().contiguous()
