"""SparseLinear: a linear layer that executes a :class:`~neuroplex.wiring.Wiring`.

Shape legend: ``b`` batch, ``n`` units (``n_in`` in, ``n_out`` out), ``g`` ensembles (blocks)
per side, ``s`` block size (``s_in``, ``s_out``), ``k`` input blocks per output block.

Paths (chosen at construction by :func:`choose_path`, shown by ``extra_repr``):

- ``dense``: density 1, plain ``F.linear``.
- ``masked-dense``: ``F.linear(x, W * mask)``; unit-mask wirings, and block wirings where
  blocks would lose (see the rule below).
- ``block-window``: every output ensemble reads ``k`` consecutive input ensembles of one cyclic
  ensemble order, starting at its own (``modular`` "ring" and "shuffle"). Laid out in that
  order and extended cyclically, the inputs of each output form one overlapping strided
  window of ``x``: forward, grad-input and grad-weight are one ``bmm`` each, with no copy of
  ``x`` per connection.
- ``block-gather``: any other block wiring. Output ensembles are padded to the largest fan-in
  ``k`` with zero dummy blocks; the ``k`` input blocks of every output are gathered a few slots
  at a time into one reused buffer (at most ``GATHER_BYTES``) and multiplied with ``baddbmm``.

Both block paths store ``weight [g_out, k*s_in, s_out]``: rows ``t*s_in:(t+1)*s_in`` of
``weight[q]`` are the block from input ensemble ``block_in[q*k+t]`` to output ensemble
``block_out[q*k+t]`` (``-1``: a dummy). Unequal ensemble sizes are zero-padded to the largest
size per side; padded and dummy weight entries are masked to zero.

Rule (``choose_path``), from the fwd+bwd benchmark (4096x4096, float32, batch 256 and 2048,
2 threads, blocks of 16..128, densities 0.05..0.75, side by side with masked-dense): take the
block path while its executed density (dummies and padding included) is at most
``_density_limit``: block-window 0.5 (0.75 for blocks of 64+ units), block-gather
``s / 256``; above that it ran slower than masked-dense, so take masked-dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from neuroplex.wiring import Wiring, WiringError

PATHS = ("auto", "dense", "masked-dense", "block-window", "block-gather")
_DIMS = ("k", "g_in", "g_out", "s_in", "s_out")
GATHER_BYTES = 8 * 2**20  # reused gather buffer: cache-sized, never a fresh mmap per call


@dataclass(frozen=True)
class _Blocks:
    """Static block structure of a block path (padded sizes, weight block order)."""

    g_in: int
    g_out: int
    s_in: int
    s_out: int
    k: int  # input blocks per output block (window length / padded fan-in)
    block_in: np.ndarray  # [g_out*k] input ensemble of each weight block, -1 for a dummy
    block_out: np.ndarray  # [g_out*k] output ensemble of each weight block
    order: np.ndarray | None  # [g] cyclic ensemble order (block-window), else None


def _cyclic_order(sets: list[set[int]], g: int) -> np.ndarray | None:
    """An order ``c`` with ``sets[c[q]] == {c[q], ..., c[q+k-1]}`` (indices mod ``g``), or None.

    Tries the order found by following each ensemble's successor (the member ``i`` of its set
    whose own set holds the rest), then the identity; returns the first that verifies.
    """
    k = len(sets[0])
    if any(len(s) != k for s in sets):
        return None
    candidates = [np.arange(g)]
    succ = [[i for i in s - {j} if s - {j} <= sets[i]] for j, s in enumerate(sets)]
    if 1 < k < g and all(len(c) == 1 for c in succ):
        order = [0]
        for _ in range(g - 1):
            order.append(succ[order[-1]][0])
        if len(set(order)) == g:  # one cycle through every ensemble
            candidates.insert(0, np.array(order))
    for order in candidates:
        if all(sets[order[q]] == {int(order[(q + t) % g]) for t in range(k)} for q in range(g)):
            return order
    return None


def _blocks(wiring: Wiring, window: bool) -> _Blocks | None:
    """Block structure for the window path (None if it does not apply) or the gather path."""
    g_in, g_out = len(wiring.in_sizes), len(wiring.out_sizes)
    sets: list[set[int]] = [set() for _ in range(g_out)]
    for i, j in wiring.block_pairs:
        sets[j].add(i)
    sizes = (g_in, g_out, max(wiring.in_sizes), max(wiring.out_sizes))
    if window:
        order = _cyclic_order(sets, g_out) if g_in == g_out else None
        if order is None:
            return None
        k = len(sets[0])
        pos = np.arange(g_out)[:, None] + np.arange(k)[None]  # [g, k] input positions
        return _Blocks(*sizes, k, order[pos % g_in].ravel(), np.repeat(order, k), order)
    k = max(len(s) for s in sets)
    block_in = np.full((g_out, k), -1)
    for j, s in enumerate(sets):
        block_in[j, : len(s)] = sorted(s, key=lambda i, j=j: ((i - j) % g_in, i))
    return _Blocks(*sizes, k, block_in.ravel(), np.repeat(np.arange(g_out), k), None)


def choose_path(wiring: Wiring) -> str:
    """The path ``SparseLinear(path="auto")`` takes for ``wiring`` (see the module docstring)."""
    if wiring.density == 1.0:
        return "dense"
    if not wiring.is_block:
        return "masked-dense"
    blocks = _blocks(wiring, window=True)
    path = "block-gather" if blocks is None else "block-window"
    blocks = blocks or _blocks(wiring, window=False)
    work = len(blocks.block_in) * blocks.s_in * blocks.s_out  # dummies and padding included
    executed = work / (wiring.n_in * wiring.n_out)
    limit = _density_limit(path, min(blocks.s_in, blocks.s_out))
    return path if executed <= limit else "masked-dense"


def _density_limit(path: str, s: int) -> float:
    """Highest executed density at which ``path`` with blocks of ``s`` units still beat
    masked-dense in the benchmark (module docstring)."""
    if path == "block-window":
        return 0.75 if s >= 64 else 0.5
    return s / 256  # block-gather


# ---- kernels -------------------------------------------------------------------------------
def _windows(t: Tensor, g: int, width: int, step: int, offset: int = 0) -> Tensor:
    """``g`` overlapping column windows of ``t [b, m]``, window ``q`` starting at column
    ``offset + q * step``: a ``[g, b, width]`` view, no copy."""
    return t.as_strided((g, t.shape[0], width), (step, t.stride(0), 1), t.storage_offset() + offset)


def _blockwise(t: Tensor, g: int) -> Tensor:
    """``[b, g*s] -> [g, b, s]`` view (no copy)."""
    return t.view(t.shape[0], g, -1).transpose(0, 1)


class _MaskedLinear(torch.autograd.Function):
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


class _WindowMatmul(torch.autograd.Function):
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


class _GatherMatmul(torch.autograd.Function):
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


# ---- the layer -----------------------------------------------------------------------------
class SparseLinear(nn.Module):
    """A linear layer ``[b, n_in] -> [b, n_out]`` whose connectivity is a ``Wiring``.

    The effective weight is a dense ``[n_out, n_in]`` matrix times the wiring's mask
    (:meth:`dense_weight`). Dense paths store ``weight [n_out, n_in]``; block paths store only
    the connected blocks, ``weight [g_out, k*s_in, s_out]`` (module docstring). Masks and block
    indices are buffers, so ``state_dict`` holds them and a layer built from another wiring
    refuses to load it.

    Args:
        wiring: the connectivity.
        bias: learn an additive bias ``[n_out]``.
        path: ``"auto"`` (:func:`choose_path`) or one of ``PATHS`` to force one.

    Init: weight and bias uniform in ``±1/sqrt(fan_in)`` of each output unit, counting only
    its existing connections (``nn.Linear``'s bound with the true fan-in).
    """

    def __init__(
        self, wiring: Wiring, bias: bool = True, *, path: str = "auto", device=None, dtype=None
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.wiring = wiring
        self.in_features, self.out_features = wiring.n_in, wiring.n_out
        self.path = _checked_path(wiring, path)
        self.blocks = None
        fan_in = torch.as_tensor(_fan_in(wiring), dtype=dtype or torch.get_default_dtype())
        self.register_buffer("fan_in", fan_in.to(device), persistent=False)
        if self.path.startswith("block"):
            self.blocks = _blocks(wiring, window=self.path == "block-window")
            self._init_blocks(self.blocks, factory)
        else:
            self.weight = nn.Parameter(torch.empty(wiring.n_out, wiring.n_in, **factory))
        if self.path == "masked-dense":  # 0/1 in the weight's dtype: the fastest multiply
            mask = torch.as_tensor(wiring.to_mask(), dtype=self.weight.dtype)
            self.register_buffer("mask", mask.to(device))
        self.bias = nn.Parameter(torch.empty(wiring.n_out, **factory)) if bias else None
        self.reset_parameters()

    def _init_blocks(self, blocks: _Blocks, factory: dict) -> None:
        """Block weight, structure buffers (persistent) and the index buffers kernels read."""
        g_in, g_out, s_in, s_out, k = blocks.g_in, blocks.g_out, blocks.s_in, blocks.s_out, blocks.k
        self.weight = nn.Parameter(torch.empty(g_out, k * s_in, s_out, **factory))
        self.geo = {"g_in": g_in, "g_out": g_out, "s_in": s_in, "s_out": s_out, "k": k}

        def index(name: str, values, persistent: bool = False) -> None:
            values = torch.as_tensor(np.asarray(values), dtype=torch.long)
            self.register_buffer(name, values.to(factory["device"]), persistent)

        index("block_in", blocks.block_in, True)
        index("block_out", blocks.block_out, True)
        index("in_cols", _columns(self.wiring.in_sizes, s_in))
        index("out_cols", _columns(self.wiring.out_sizes, s_out))
        self.padded = len(self.in_cols) < g_in * s_in or len(self.out_cols) < g_out * s_out
        pad_mask = None
        if self.padded or (blocks.block_in < 0).any():  # zero padded units and dummy blocks
            real = torch.zeros(g_out * s_out, g_in * s_in, dtype=torch.bool)
            real[self.out_cols[:, None].cpu(), self.in_cols[None, :].cpu()] = True
            pad_mask = self._gather_blocks(real.to(factory["device"]))
        self.register_buffer("pad_mask", pad_mask, persistent=False)
        if blocks.order is None:
            index("gather", np.maximum(blocks.block_in, 0).reshape(g_out, k))
            readers = _readers(blocks.block_in, g_in)  # -1: the zero block appended at g_out*k
            index("readers", np.where(readers < 0, g_out * k, readers))
            index("reader_out", np.where(readers < 0, 0, readers // k))
            return
        order, ext = blocks.order, np.arange(g_out + k - 1)
        q, u = np.arange(g_out)[:, None], np.arange(k)[None]  # readers of input position q
        index("order", order)  # ensemble at each cyclic position
        index("position", np.argsort(order))  # cyclic position of each ensemble
        index("ext_in", order[ext % g_in])  # input blocks by position, extended cyclically
        index("ext_out", order[(ext - k + 1) % g_out])  # output blocks from position 1-k
        index("readers", (((q - k + 1 + u) % g_out) * k + k - 1 - u).ravel())

    # ---- weights -------------------------------------------------------------------------
    def _gather_blocks(self, full: Tensor) -> Tensor:
        """Padded ``[g_out*s_out, g_in*s_in]`` -> the weight's layout; dummy blocks zeroed."""
        g = self.geo
        blocks = full.view(g["g_out"], g["s_out"], g["g_in"], g["s_in"]).permute(0, 2, 3, 1)
        blocks = blocks[self.block_out, self.block_in.clamp(min=0)]  # [g_out*k, s_in, s_out]
        blocks = blocks * (self.block_in >= 0).view(-1, 1, 1)
        return blocks.reshape(self.weight.shape)

    def _block_weight(self) -> Tensor:
        """``weight`` with padded and dummy entries zeroed."""
        return self.weight if self.pad_mask is None else self.weight * self.pad_mask

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Uniform in ``±1/sqrt(fan_in)`` per output unit (0 for units with no input)."""
        bound = torch.where(self.fan_in > 0, self.fan_in.clamp(min=1).rsqrt(), 0.0)  # [n_out]
        if self.bias is not None:
            self.bias.uniform_(-1.0, 1.0).mul_(bound)
        if self.blocks is None:
            mask = self.mask if self.path == "masked-dense" else 1.0
            self.weight.uniform_(-1.0, 1.0).mul_(bound[:, None] * mask)
            return
        g = self.geo
        padded = bound.new_zeros(g["g_out"] * g["s_out"]).index_copy_(0, self.out_cols, bound)
        scale = self._gather_blocks(padded[:, None].expand(-1, g["g_in"] * g["s_in"]))
        self.weight.uniform_(-1.0, 1.0).mul_(scale)

    def dense_weight(self) -> Tensor:
        """The effective weight ``[n_out, n_in]`` (masked), differentiable w.r.t. ``weight``."""
        if self.blocks is None:
            return self.weight * self.mask if self.path == "masked-dense" else self.weight
        g, real = self.geo, self.block_in >= 0
        blocks = self._block_weight().reshape(-1, g["s_in"], g["s_out"])[real]  # [p, s_in, s_out]
        full = blocks.new_zeros(g["g_out"], g["g_in"], g["s_out"], g["s_in"])
        full = full.index_put((self.block_out[real], self.block_in[real]), blocks.transpose(1, 2))
        full = full.permute(0, 2, 1, 3).reshape(g["g_out"] * g["s_out"], g["g_in"] * g["s_in"])
        return full.index_select(0, self.out_cols).index_select(1, self.in_cols)

    # ---- forward -------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """``[b, n_in] -> [b, n_out]`` (extra leading dims are flattened, then restored)."""
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        if self.path == "dense":
            y = F.linear(x, self.weight, self.bias)
        elif self.path == "masked-dense":
            y = _MaskedLinear.apply(x, self.weight, self.mask, self.bias)
        else:
            y = self._forward_blocks(x.contiguous())
        return y.view(*lead, self.out_features)

    def _forward_blocks(self, x: Tensor) -> Tensor:
        """Block paths, ``[b, n_in] -> [b, n_out]``; pads unequal ensembles to ``s`` units."""
        g, bias = self.geo, self.bias
        if self.padded:  # [b, n_in] -> [b, g_in*s_in], zeros in the padding
            x = x.new_zeros(x.shape[0], g["g_in"] * g["s_in"]).index_copy(1, self.in_cols, x)
            if bias is not None:
                bias = bias.new_zeros(g["g_out"] * g["s_out"]).index_copy(0, self.out_cols, bias)
        if self.path == "block-window":
            names = ("order", "position", "ext_in", "ext_out", "readers")
            kernel = _WindowMatmul
        else:
            names, kernel = ("gather", "readers", "reader_out"), _GatherMatmul
        geo = g | {name: getattr(self, name) for name in names}
        y = kernel.apply(x, self._block_weight(), bias, geo)
        return y.index_select(1, self.out_cols) if self.padded else y  # [b, n_out]

    def extra_repr(self) -> str:
        ensembles = (len(self.wiring.in_sizes), len(self.wiring.out_sizes))
        text = (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"density={self.wiring.density:.4g}, ensembles={ensembles}, "
        )
        if self.blocks is not None:
            text += f"block={self.geo['s_in']}x{self.geo['s_out']}{' (padded)' * self.padded}, "
        return text + f"bias={self.bias is not None}, path={self.path}"

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        error_msgs = args[-1]
        for name in ("mask", "block_in", "block_out"):
            key, mine = prefix + name, getattr(self, name, None)
            theirs = state_dict.get(key)
            if mine is None or theirs is None:
                continue
            if not torch.equal(theirs.detach().cpu().to(mine.dtype), mine.cpu()):
                error_msgs.append(
                    f"{key} differs: the checkpoint was saved from another wiring (or path); "
                    "build the layer from the same Wiring."
                )
        super()._load_from_state_dict(state_dict, prefix, *args)


def _checked_path(wiring: Wiring, path: str) -> str:
    """The path to run: ``choose_path`` for "auto", else ``path`` once checked to fit."""
    if path not in PATHS:
        raise WiringError(f"path {path!r} is unknown; use one of {', '.join(PATHS)}.")
    if path == "auto":
        return choose_path(wiring)
    if path.startswith("block") and not wiring.is_block:
        raise WiringError(f"path {path!r} needs a block wiring; this one has a unit mask.")
    if path == "block-window" and _blocks(wiring, window=True) is None:
        raise WiringError(
            "path 'block-window' needs every output ensemble to read consecutive ensembles "
            "of one cyclic order starting at its own; use 'block-gather' for this wiring."
        )
    if path == "dense" and wiring.density < 1.0:
        raise WiringError(f"path 'dense' needs density 1; this wiring has {wiring.density:.4g}.")
    return path


def _readers(block_in: np.ndarray, g_in: int) -> np.ndarray:
    """``[g_in, f]`` weight blocks reading each input ensemble, padded with ``-1``."""
    lists = [np.flatnonzero(block_in == i) for i in range(g_in)]
    readers = np.full((g_in, max(1, *map(len, lists))), -1)
    for i, ids in enumerate(lists):
        readers[i, : len(ids)] = ids
    return readers


def _columns(sizes: tuple[int, ...], block: int) -> np.ndarray:
    """Padded column of each unit: unit ``r`` of ensemble ``e`` sits at ``e * block + r``."""
    return np.concatenate([e * block + np.arange(n) for e, n in enumerate(sizes)])


def _fan_in(wiring: Wiring) -> np.ndarray:
    """Real fan-in of each output unit, ``[n_out]``."""
    if not wiring.is_block:
        return wiring.unit_mask.sum(1).astype(np.float64)
    per = np.zeros(len(wiring.out_sizes))
    for i, j in wiring.block_pairs:
        per[j] += wiring.in_sizes[i]
    return np.repeat(per, wiring.out_sizes)
