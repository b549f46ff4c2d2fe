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


def _blockwise(t: Tensor, g: int) -> Tensor:
    """``[b, g*s] -> [g, b, s]`` view (no copy)."""
    return t.view(t.shape[0], g, -1).transpose(0, 1)


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


def _gathered(src: Tensor, index: Tensor, s: int):
    """Yield ``(rows, blocks)``: for a few slots ``t`` at a time, the ``src [b, g_src*s]``
    blocks ``index[d, t]`` concatenated per ``d`` as ``blocks [g_dst, b, slots*s]`` (a view of
    one reused buffer of at most ``GATHER_BYTES``), and their ``rows`` in ``[k*s]``."""
    b, (g_dst, k) = src.shape[0], index.shape
    per = max(1, GATHER_BYTES // (src.element_size() * b * g_dst * s))  # slots per chunk
    buf = src.new_empty(b, g_dst * min(per, k), s)
    for t0 in range(0, k, per):
        t1 = min(t0 + per, k)
        part = buf[:, : g_dst * (t1 - t0)]  # [b, g_dst*slots, s], contiguous
        torch.index_select(src.view(b, -1, s), 1, index[:, t0:t1].reshape(-1), out=part)
        yield slice(t0 * s, t1 * s), _blockwise(part.view(b, -1), g_dst)


class GatherMatmul(torch.autograd.Function):
    """Block-gather product; ``x [b, g_in*s_in]`` padded, ``weight [g_out, k*s_in, s_out]``
    with ``weight[j]`` reading input ensembles ``geo["gather"][j]``; ``geo["readers"]``
    ``[g_in, f]`` lists the weight blocks reading each input ensemble, padded with the id of
    a zero block appended after the last one, and ``geo["reader_out"]`` their outputs."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, geo: dict) -> Tensor:
        b, g_out, s_out = x.shape[0], geo["g_out"], geo["s_out"]
        ctx.save_for_backward(x, weight)
        ctx.geo = geo
        y = x.new_zeros(g_out, b, s_out)  # contiguous, as bmm's batched kernel needs
        if bias is not None:
            y += bias.view(g_out, 1, s_out)
        for rows, blocks in _gathered(x, geo["gather"], geo["s_in"]):
            y.baddbmm_(blocks, weight[:, rows])
        return y.transpose(0, 1).reshape(b, g_out * s_out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        geo = ctx.geo
        b, k, g_in, g_out, s_in, s_out = x.shape[0], *(geo[n] for n in _DIMS)
        grad = grad.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # input block i sums grad of its readers @ their blocks^T
            blocks = weight.view(g_out * k, s_in, s_out).transpose(1, 2)
            blocks = torch.cat([blocks, blocks.new_zeros(1, s_out, s_in)])  # + a zero block
            w_t = blocks.index_select(0, geo["readers"].reshape(-1)).view(g_in, -1, s_in)
            gx = x.new_zeros(g_in, b, s_in)
            for rows, blocks in _gathered(grad, geo["reader_out"], s_out):
                gx.baddbmm_(blocks, w_t[:, rows])
            grad_x = gx.transpose(0, 1).reshape(b, g_in * s_in)
        if ctx.needs_input_grad[1]:
            grad_w = torch.empty_like(weight)
            go = _blockwise(grad, g_out)  # [g_out, b, s_out]
            for rows, blocks in _gathered(x, geo["gather"], s_in):
                grad_w[:, rows] = torch.bmm(blocks.transpose(1, 2), go)
        grad_b = grad.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None
