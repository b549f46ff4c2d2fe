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
CHUNK_ROWS = 128  # batch rows per chunk of the block-window products (best of 64-512, b 2048)
# batch rows per chunk of the block-gather kernel: random wiring, 4096 units in blocks of 64,
# density 0.125, fwd+bwd, Intel Xeon, 7 Dec: at b 2048 (2 threads) 2.07-2.10x the ideal by 128
# or 256 rows, 2.18-2.24x by 512, 2.9x for the whole batch at once (the kernel before chunks);
# at b 256 chunks of 64-256 rows are within noise of each other (1.71-1.85x, 1 and 2 threads)
GATHER_ROWS = 256


def _windows(t: Tensor, g: int, width: int, step: int) -> Tensor:
    """``g`` overlapping column windows of ``t [b, m]``, window ``q`` starting at column
    ``q * step``: a ``[g, b, width]`` view, no copy (``unfold`` rather than ``as_strided``,
    which needs the storage offset and breaks ``torch.compile``'s graph)."""
    return t.unfold(1, width, step)[:, :g].transpose(0, 1)


class MaskedLinear(torch.autograd.Function):
    """``F.linear(x, weight * mask, bias)`` for ``x [b, n_in]``, ``weight`` and ``mask``
    ``[n_out, n_in]`` (``mask`` 0/1 in the weight's dtype).

    Saves only ``x`` besides the layer's own ``weight`` and ``mask``: the product
    ``weight * mask`` is a temporary of forward and is recomputed in backward, never kept
    between the two, so the layer holds no more for backward than ``nn.Linear`` of its shape
    (autograd's ``F.linear(x, weight * mask)`` would keep the ``[n_out, n_in]`` product alive).
    The weight gradient is masked in place.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight, mask)
        return F.linear(x, weight * mask, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight, mask = ctx.saved_tensors
        grad_x = grad.mm(weight * mask) if ctx.needs_input_grad[0] else None
        grad_w = grad.t().mm(x).mul_(mask) if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(0) if ctx.needs_input_grad[3] else None
        return grad_x, grad_w, None, grad_b


def _masked(weight: Tensor, geo: dict) -> Tensor:
    """The block weight with padded and dummy entries zeroed (``geo["pad_mask"]``, None when
    there are none): a temporary, recomputed in backward rather than saved."""
    pad = geo["pad_mask"]
    return weight if pad is None else weight * pad


def _masked_grad(grad_w: Tensor, geo: dict) -> Tensor:
    pad = geo["pad_mask"]
    return grad_w if pad is None else grad_w.mul_(pad)


def _blocks_of(t: Tensor, index: Tensor, s: int) -> Tensor:
    """Blocks ``index`` of ``t [b, g*s]``, concatenated: ``[b, len(index)*s]``."""
    b = t.shape[0]
    return t.view(b, t.shape[1] // s, s).index_select(1, index).view(b, len(index) * s)


def _reorder(t: Tensor, index: Tensor | None, s: int) -> Tensor:
    """``t [b, g*s]`` with its blocks taken in ``index`` order (a copy), or ``t`` itself when
    ``index`` is None (the identity: a ring wiring's cyclic order is its ensemble order)."""
    return t if index is None else _blocks_of(t, index, s)


def _cyclic_windows(t: Tensor, k: int, s: int, first: int):
    """Yield ``(q0, q1, windows [q1-q0, b, k*s])`` covering positions ``0 <= q < g``: window
    ``q`` holds blocks ``q+first .. q+first+k-1`` (cyclic) of ``t [b, g*s]``, for ``first`` 0
    (an output's inputs) or ``1-k`` (an input's readers). The ``g-k+1`` windows that do not
    wrap are views of ``t``; the ``k-1`` that do are views of one ``[b, (2k-2)*s]`` copy of the
    blocks around the wrap, so ``t`` itself is never extended (a full copy per product)."""
    g = t.shape[1] // s
    n = g - k + 1
    yield -first, n - first, _windows(t, n, k * s, s)
    if k > 1:
        tail = torch.cat([t[:, n * s :], t[:, : (k - 1) * s]], 1)
        q0 = (n - first) % g
        yield q0, q0 + k - 1, _windows(tail, k - 1, k * s, s)


def _row_chunks(b: int, rows: int):
    """Slices of ``rows`` batch rows covering ``range(b)``; one (empty) slice when ``b == 0``,
    so a sum over the chunks is still written, as zeros."""
    for r0, r1 in _spans(max(b, 1), rows):
        yield slice(r0, r1)


def _window_products(t: Tensor, weight: Tensor, k: int, s: int, first: int) -> Tensor:
    """``[b, g*s_out]``: block ``q`` is window ``q`` of ``t`` (``_cyclic_windows``) times
    ``weight[q] [k*s, s_out]``.

    Runs in chunks of ``CHUNK_ROWS`` rows of the batch, so each chunk's windows, which overlap
    ``k`` times, are reused from cache, and each chunk's product is copied into its blocks of
    the result while it is in cache: ``bmm`` with a strided ``out=`` computes slower (and
    dynamo refuses it), and a whole-batch product transposed afterwards is one more pass over
    the output."""
    b, g, s_out = t.shape[0], weight.shape[0], weight.shape[2]
    out = t.new_empty(b, g, s_out)
    out_t = out.transpose(0, 1)
    for rows in _row_chunks(b, CHUNK_ROWS):
        for q0, q1, win in _cyclic_windows(t[rows], k, s, first):
            out_t[q0:q1, rows].copy_(torch.bmm(win, weight[q0:q1]))
    return out.view(b, g * s_out)


class WindowMatmul(torch.autograd.Function):
    """Block-window product; ``x [b, g*s_in]`` padded, ``weight [g, k*s_in, s_out]`` with
    ``weight[q]`` reading the input blocks at cyclic positions ``q .. q+k-1``. ``geo["order"]``
    (ensemble at each position) and ``geo["position"]`` (its inverse) are None for the
    identity order, where no block is moved at all."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, geo: dict) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.geo = geo
        x_pos = _reorder(x, geo["order"], geo["s_in"])
        y = _window_products(x_pos, _masked(weight, geo), geo["k"], geo["s_in"], 0)
        y = _reorder(y, geo["position"], geo["s_out"])
        return y if bias is None else y.add_(bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        geo = ctx.geo
        k, s_in, s_out = geo["k"], geo["s_in"], geo["s_out"]
        weight = _masked(weight, geo)
        grad_pos = _reorder(grad.contiguous(), geo["order"], s_out)  # by cyclic position
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # input position i is read by output positions i-k+1 .. i: its weight blocks, by
            # reader, are [s_in, k*s_out] (transposed in the product)
            by_input = _by_input(weight, k).transpose(1, 2)
            grad_x = _window_products(grad_pos, by_input, k, s_out, 1 - k)
            grad_x = _reorder(grad_x, geo["position"], s_in)
        if ctx.needs_input_grad[1]:
            grad_w = _window_weight_grad(_reorder(x, geo["order"], s_in), grad_pos, geo)
            grad_w = _masked_grad(grad_w, geo)
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b, None


def _window_weight_grad(x_pos: Tensor, grad_pos: Tensor, geo: dict) -> Tensor:
    """The block-window weight gradient ``[g, k*s_in, s_out]`` from ``x_pos [b, g*s_in]`` and
    ``grad_pos [b, g*s_out]`` (both by cyclic position): ``window_q^T @ grad_q`` summed over
    chunks of ``CHUNK_ROWS`` rows of the batch, so each chunk's windows, which overlap ``k``
    times, are reused from cache (4096 units in blocks of 64, k 8, 1 thread: 106-109 GFLOP/s
    at b 2048 against 61-62 for the whole batch at once). Per input block (``x_i^T`` times
    its readers' gradient window) ran 10-15% faster but needs the result moved into this
    layout, one more pass over the weights, which lost at b 256."""
    g, k, s_in, s_out = geo["g_out"], geo["k"], geo["s_in"], geo["s_out"]
    grad_w = x_pos.new_empty(g, k * s_in, s_out)
    grad_y = grad_pos.view(x_pos.shape[0], g, s_out).transpose(0, 1)  # [g, b, s_out], a view
    for rows in _row_chunks(x_pos.shape[0], CHUNK_ROWS):
        for q0, q1, win in _cyclic_windows(x_pos[rows], k, s_in, 0):
            factors = (win.transpose(1, 2), grad_y[q0:q1, rows])
            if rows.start == 0:
                torch.bmm(*factors, out=grad_w[q0:q1])
            else:
                grad_w[q0:q1].baddbmm_(*factors)
    return grad_w


def _by_input(weight: Tensor, k: int) -> Tensor:
    """Window weight blocks by the input that they read: ``weight [g, k*s_in, s_out]`` (block
    ``t`` of output ``q`` reads input ``q+t``) -> ``[g, s_in, k*s_out]`` (block ``u`` of input
    ``i`` is read by output ``i-k+1+u``, so block ``(q, t)`` lands at ``(q+t, k-1-t)``). For
    each ``t`` that is a cyclic shift of the ensembles: two slice copies, one pass over the
    weights (a block permutation by index, then a transposing copy, is two)."""
    g, s_out = weight.shape[0], weight.shape[2]
    by_output = weight.view(g, k, -1, s_out)  # [g, k, s_in, s_out]
    by_input = weight.new_empty(g, by_output.shape[2], k, s_out)
    for t in range(k):
        for outs, ins in ((slice(0, g - t), slice(t, g)), (slice(g - t, g), slice(0, t))):
            by_input[ins, :, k - 1 - t].copy_(by_output[outs, t])
    return by_input.view(g, -1, k * s_out)


def _spans(n: int, per: int):
    """``[i0, i1)`` chunks of ``range(n)``, ``per`` at a time."""
    for i0 in range(0, n, per):
        yield i0, min(i0 + per, n)


def _per_chunk(item_bytes: int) -> int:
    """How many items of ``item_bytes`` each fit ``GATHER_BYTES`` (at least 1)."""
    return max(1, GATHER_BYTES // max(item_bytes, 1))  # an empty batch: items of 0 bytes


class _Buffers:
    """Reused scratch of the gather kernel for chunks of up to ``r`` batch rows: flat storage
    handed out as views, so no chunk allocates (a tensor of 32 MiB or more would be a fresh
    mapping whose pages fault on first write)."""

    def __init__(self, like: Tensor, r: int, geo: dict) -> None:
        k, g_in, g_out, s_in, s_out = (geo[n] for n in _DIMS)
        self.per = _per_chunk(like.element_size() * k * s_in * r)  # outputs per gather
        self.rows = like.new_empty(max(g_in * s_in, g_out * s_out) * r)
        self.blocks = like.new_empty(min(self.per, g_out) * k * s_in * r)  # gathered, products

    def transposed(self, t: Tensor) -> Tensor:
        """``t [r, n]`` copied to ``[n, r]`` (in the row buffer)."""
        out = self.rows[: t.numel()].view(t.shape[1], t.shape[0])
        return out.copy_(t.t())


class GatherMatmul(torch.autograd.Function):
    """Block-gather product: ``x [b, g_in*s_in]`` padded, ``weight [g_out, k*s_in, s_out]``
    with ``weight[j]`` reading input ensembles ``geo["gather"][j]`` (``[g_out, k]``), on chunks
    of ``GATHER_ROWS`` batch rows. Only ``x`` itself is saved (as ``nn.Linear`` saves it).

    Forward gathers the ``k`` input blocks of a few outputs at a time from the rows of ``x``
    (``index_select`` over the block axis) and multiplies them with one ``baddbmm`` (reduction
    over ``k*s_in``, the bias added), whose product is copied straight into those outputs'
    blocks of ``y``.

    The weight gradient works on ``x^T [g_in, s_in, r]`` instead, where each block is one
    contiguous chunk: its ``bmm`` (blocks times the gradient) ran ~20% faster on gathered
    ``x^T`` blocks than on strided row blocks, more than the transpose costs. The forward
    product runs as fast on either, so forward skips the transposes (16.2 -> 11.6 ms at b 256,
    4096 units in blocks of 64, density 0.125, 1 thread).

    The input gradient is the transpose: each output block's gradient times its weight blocks
    gives one contribution per weight block (one ``bmm``, no gather, no weight permutation),
    scatter-added (``index_add_``) onto the input blocks of ``grad_x^T`` that it read. The
    gradient is read in place through strided views (no transposed copy); this measured 6-12%
    faster fwd+bwd than reducing over each input's readers inside the ``bmm``, which needs a
    gather of the gradient and a permuted copy of the weight blocks.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, geo: dict) -> Tensor:
        b, g_out, s_out = x.shape[0], geo["g_out"], geo["s_out"]
        # detached: torch.export traces this with grad mode on, where out= refuses inputs
        # that require grad (autograd never sees these ops: backward is written below)
        x, weight = x.detach(), weight.detach()
        bias = None if bias is None else bias.detach().view(g_out, s_out)
        ctx.save_for_backward(x, weight)
        ctx.geo = geo
        weight = _masked(weight, geo)
        y = x.new_empty(b, g_out, s_out)
        bufs = _Buffers(x, min(b, GATHER_ROWS), geo)
        for rows in _row_chunks(b, GATHER_ROWS):
            for j0, j1, blocks in _gather_rows(x[rows], geo, bufs):
                out = bufs.rows[: blocks.shape[:2].numel() * s_out].view(j1 - j0, -1, s_out)
                if bias is None:
                    torch.bmm(blocks, weight[j0:j1], out=out)
                else:  # [c, r, s_out]: the bias broadcast over the rows
                    bias_c = bias[j0:j1, None].expand(-1, blocks.shape[1], -1)
                    torch.baddbmm(bias_c, blocks, weight[j0:j1], out=out)
                y[rows, j0:j1] = out.transpose(0, 1)
        return y.view(b, g_out * s_out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        geo = ctx.geo
        b, g_out, s_out = x.shape[0], geo["g_out"], geo["s_out"]
        weight = _masked(weight, geo)
        go = grad.contiguous().view(b, g_out, s_out)
        bufs = _Buffers(x, min(b, GATHER_ROWS), geo)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = x.new_empty(x.shape) if need_x else None
        grad_w = torch.empty_like(weight) if need_w else None
        for rows in _row_chunks(b, GATHER_ROWS):
            if need_w:
                _add_weight_grad(grad_w, bufs.transposed(x[rows]), go[rows], geo, bufs, rows)
            if need_x:
                grad_x[rows] = _grad_input(go[rows], weight, geo, bufs)
        if need_w:
            grad_w = _masked_grad(grad_w, geo)
        grad_b = grad.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


def _gather_rows(x: Tensor, geo: dict, bufs: _Buffers):
    """Yield ``(j0, j1, blocks)``: for ``bufs.per`` outputs ``j0 <= j < j1`` at a time, the
    input blocks ``gather[j]`` of ``x [r, g_in*s_in]`` as ``blocks [j1-j0, r, k*s_in]`` (a
    strided view of the reused gather buffer ``[r, (j1-j0)*k, s_in]``)."""
    (g_dst, k), s, r = geo["gather"].shape, geo["s_in"], x.shape[0]
    src = x.view(r, geo["g_in"], s)
    for j0, j1 in _spans(g_dst, bufs.per):
        part = bufs.blocks[: r * (j1 - j0) * k * s].view(r, (j1 - j0) * k, s)
        torch.index_select(src, 1, geo["gather"][j0:j1].reshape(-1), out=part)
        yield j0, j1, part.view(r, j1 - j0, k * s).transpose(0, 1)


def _gather_t(xt: Tensor, geo: dict, bufs: _Buffers):
    """Yield ``(j0, j1, blocks)``: for ``bufs.per`` outputs ``j0 <= j < j1`` at a time, the
    input blocks ``gather[j]`` of ``xt [g_in*s_in, r]`` stacked as ``blocks [j1-j0, k*s_in, r]``
    (a view of the reused gather buffer)."""
    (g_dst, k), s, r = geo["gather"].shape, geo["s_in"], xt.shape[1]
    src = xt.view(geo["g_in"], s * r)  # one row per block
    for j0, j1 in _spans(g_dst, bufs.per):
        part = bufs.blocks[: (j1 - j0) * k * s * r].view((j1 - j0) * k, s * r)
        torch.index_select(src, 0, geo["gather"][j0:j1].reshape(-1), out=part)
        yield j0, j1, part.view(j1 - j0, k * s, r)


def _add_weight_grad(
    grad_w: Tensor, xt: Tensor, go: Tensor, geo: dict, bufs: _Buffers, rows: slice
) -> None:
    """Add one chunk's weight gradient into ``grad_w [g_out, k*s_in, s_out]`` (written by the
    first chunk): ``blocks_j @ go_j`` from ``xt [g_in*s_in, r]`` and ``go [r, g_out, s_out]``
    (read through a strided view)."""
    for j0, j1, blocks in _gather_t(xt, geo, bufs):
        factors = (blocks, go[:, j0:j1].transpose(0, 1))  # [c, k*s_in, r] @ [c, r, s_out]
        if rows.start == 0:
            torch.bmm(*factors, out=grad_w[j0:j1])
        else:
            grad_w[j0:j1].baddbmm_(*factors)


def _grad_input(go: Tensor, weight: Tensor, geo: dict, bufs: _Buffers) -> Tensor:
    """``go [r, g_out, s_out]`` -> ``grad_x [r, g_in*s_in]`` (a transposed view of the row
    buffer): weight block ``(j, t)`` sends ``weight[j, t] @ go[:, j]^T`` to input ensemble
    ``gather[j, t]``; contributions of ``bufs.per`` outputs at a time are summed onto
    ``grad_x^T [g_in, s_in*r]`` (dummy blocks have zero weights, so what they send to ensemble
    0 is zero)."""
    k, g_in, g_out, s_in, _ = (geo[n] for n in _DIMS)
    r = go.shape[0]
    gxt = bufs.rows[: g_in * s_in * r].view(g_in, s_in * r).zero_()
    go_t = go.permute(1, 2, 0)  # [g_out, s_out, r], strided
    for j0, j1 in _spans(g_out, bufs.per):
        part = bufs.blocks[: (j1 - j0) * k * s_in * r].view(j1 - j0, k * s_in, r)
        torch.bmm(weight[j0:j1], go_t[j0:j1], out=part)
        gxt.index_add_(0, geo["gather"][j0:j1].reshape(-1), part.view((j1 - j0) * k, s_in * r))
    return gxt.view(g_in * s_in, r).t()
