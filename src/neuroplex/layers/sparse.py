"""SparseLinear: a linear layer that executes a :class:`~neuroplex.wiring.Wiring`.

Shape legend: ``b`` batch, ``n`` units (``n_in`` in, ``n_out`` out), ``g`` ensembles (blocks)
per side, ``s`` block size (``s_in``, ``s_out``), ``k`` input blocks per output block.

Paths (chosen by :func:`~neuroplex.layers.sparse_plan.choose_path`; ``path_reason`` and
``extra_repr`` say which and why; kernels in neuroplex.layers.sparse_kernels):

- ``dense``: density 1, plain ``F.linear``.
- ``masked-dense``: ``F.linear(x, W * mask)``; unit-mask wirings, and block wirings where
  blocks would lose (the rule in neuroplex.layers.sparse_plan). The product ``W * mask`` is
  recomputed in backward rather than saved, so the layer saves no more than ``nn.Linear``.
- ``block-window``: every output ensemble reads ``k`` consecutive input ensembles of one cyclic
  ensemble order, starting at its own (``modular`` "ring" and "shuffle"). Laid out in that
  order (a ring's is its ensemble order: nothing moves), the inputs of each output form one
  overlapping strided window of ``x``: forward, grad-input and grad-weight are one ``bmm``
  each over the windows that do not wrap around (views of ``x``) and one over the ``k-1``
  that do (views of a small copy of the blocks around the wrap), in chunks of batch rows
  whose windows stay in cache.
- ``block-gather``: any other block wiring. Output ensembles are padded to the largest fan-in
  ``k`` with zero dummy blocks. The kernel works on chunks of ``GATHER_ROWS`` batch rows: the
  ``k`` input blocks of a few outputs at a time are copied into one reused buffer (at most
  ``GATHER_BYTES``; from the rows of ``x`` in forward, from ``x^T``, where each block is one
  contiguous chunk, for the weight gradient) and multiplied with one ``bmm`` reducing over
  ``k*s_in``; the input gradient scatter-adds each weight block's contribution onto the block
  it read.

Both block paths store ``weight [g_out, k*s_in, s_out]``: rows ``t*s_in:(t+1)*s_in`` of
``weight[q]`` are the block from input ensemble ``block_in[q*k+t]`` to output ensemble
``block_out[q*k+t]`` (``-1``: a dummy). Unequal ensemble sizes are zero-padded to the largest
size per side; padded and dummy weight entries are masked to zero inside the kernels (the
masked weight is recomputed in backward, not saved).

Rewiring (:meth:`SparseLinear.set_wiring`) rebuilds the path, the index buffers and the weight
layout in place; the ``weight`` Parameter object stays the same, so optimizers keep tracking it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neuroplex.layers.sparse_kernels import GatherMatmul, MaskedLinear, WindowMatmul
from neuroplex.layers.sparse_plan import (
    PATHS,
    Blocks,
    block_plan,
    choose_path,
    columns,
    fan_in,
    resolve_path,
)
from neuroplex.wiring import Wiring, WiringError

__all__ = ["PATHS", "SparseLinear", "choose_path"]


class SparseLinear(nn.Module):
    """A linear layer ``[b, n_in] -> [b, n_out]`` whose connectivity is a ``Wiring``.

    The effective weight is a dense ``[n_out, n_in]`` matrix times the wiring's mask
    (:meth:`dense_weight`). Dense paths store ``weight [n_out, n_in]``; block paths store only
    the connected blocks, ``weight [g_out, k*s_in, s_out]`` (module docstring). Masks and block
    indices are buffers, so ``state_dict`` holds them and a layer built from another wiring
    refuses to load it (rewire it with :meth:`set_wiring` first).

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
        self.in_features, self.out_features = wiring.n_in, wiring.n_out
        self.weight = nn.Parameter(torch.empty(0, **factory))
        self.bias = nn.Parameter(torch.empty(wiring.n_out, **factory)) if bias else None
        self._build(wiring, path)
        self.reset_parameters()

    # ---- structure -----------------------------------------------------------------------
    def _build(self, wiring: Wiring, requested: str) -> None:
        """Set ``wiring``, ``path`` (from the ``requested`` one), ``path_reason``, every
        structure buffer and the weight's layout (values uninitialised); buffers of a previous
        structure are dropped."""
        path, reason = resolve_path(wiring, requested)
        for name in [n for n in self._buffers if n in _STRUCTURE]:
            delattr(self, name)
        self.wiring, self.path, self.blocks = wiring, path, None
        self.path_reason = reason
        device, dtype = self.weight.device, self.weight.dtype
        fan = torch.as_tensor(fan_in(wiring), dtype=dtype).to(device)
        self.register_buffer("fan_in", fan, persistent=False)
        if path.startswith("block"):
            self.blocks = block_plan(wiring, window=path == "block-window")
            self._init_blocks(self.blocks)
            return
        self.weight.data = self.weight.new_empty(wiring.n_out, wiring.n_in)
        if path == "masked-dense":  # 0/1 in the weight's dtype: the fastest multiply
            mask = torch.as_tensor(wiring.to_mask(), dtype=dtype)
            self.register_buffer("mask", mask.to(device))

    def _init_blocks(self, blocks: Blocks) -> None:
        """Block weight layout, structure buffers (persistent) and the index buffers kernels
        read."""
        g_in, g_out, s_in, s_out, k = blocks.g_in, blocks.g_out, blocks.s_in, blocks.s_out, blocks.k
        device = self.weight.device
        self.weight.data = self.weight.new_empty(g_out, k * s_in, s_out)
        self.geo = {"g_in": g_in, "g_out": g_out, "s_in": s_in, "s_out": s_out, "k": k}

        def index(name: str, values, persistent: bool = False) -> None:
            values = torch.as_tensor(np.asarray(values), dtype=torch.long)
            self.register_buffer(name, values.to(device), persistent)

        index("block_in", blocks.block_in, True)
        index("block_out", blocks.block_out, True)
        index("in_cols", columns(self.wiring.in_sizes, s_in))
        index("out_cols", columns(self.wiring.out_sizes, s_out))
        self.padded = len(self.in_cols) < g_in * s_in or len(self.out_cols) < g_out * s_out
        pad_mask = None
        if self.padded or (blocks.block_in < 0).any():  # zero padded units and dummy blocks
            real = torch.zeros(g_out * s_out, g_in * s_in, dtype=torch.bool)
            out_cols = torch.as_tensor(columns(self.wiring.out_sizes, s_out))
            in_cols = torch.as_tensor(columns(self.wiring.in_sizes, s_in))
            real[out_cols[:, None], in_cols[None, :]] = True  # on the CPU: meta has no values
            pad_mask = self._gather_blocks(real.to(device))
        self.register_buffer("pad_mask", pad_mask, persistent=False)
        if blocks.order is None:
            index("gather", np.maximum(blocks.block_in, 0).reshape(g_out, k))
            return
        order = blocks.order
        if (order == np.arange(g_out)).all():  # kernels move no block (geo holds None)
            return
        index("order", order)  # ensemble at each cyclic position
        index("position", np.argsort(order))  # cyclic position of each ensemble

    @torch.no_grad()
    def set_wiring(self, wiring: Wiring, path: str = "auto") -> None:
        """Rewire to ``wiring`` (same widths) in place: path, buffers and weight layout are
        rebuilt; weights on connections both wirings share are kept, new connections start at
        zero. The ``weight`` Parameter stays the same object (its data is replaced, its
        gradient dropped)."""
        if (wiring.n_in, wiring.n_out) != (self.in_features, self.out_features):
            raise WiringError(
                f"wiring is {wiring.n_in} -> {wiring.n_out} units but the layer is "
                f"{self.in_features} -> {self.out_features}; rewire with the same widths."
            )
        full = self.to_dense(self.weight.detach())  # keeps the old storage alive
        self._build(wiring, path)
        self.weight.data = self.from_dense(full)
        self.weight.grad = None  # a gradient in the old layout means nothing now

    # ---- weights -------------------------------------------------------------------------
    def num_connections(self) -> int:
        """Weights that exist: the wiring's unit-level connections. The stored ``weight`` may
        hold more entries (the full ``[n_out, n_in]`` matrix on masked-dense, padding and dummy
        blocks on block paths), but those are held at zero and never trained."""
        return int(fan_in(self.wiring).sum())

    def _gather_blocks(self, full: Tensor) -> Tensor:
        """Padded ``[g_out*s_out, g_in*s_in]`` -> the weight's layout; dummy blocks zeroed."""
        g = self.geo
        blocks = full.view(g["g_out"], g["s_out"], g["g_in"], g["s_in"]).permute(0, 2, 3, 1)
        blocks = blocks[self.block_out, self.block_in.clamp(min=0)]  # [g_out*k, s_in, s_out]
        blocks = blocks * (self.block_in >= 0).view(-1, 1, 1)
        return blocks.reshape(g["g_out"], g["k"] * g["s_in"], g["s_out"])

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
        return self.to_dense(self.weight)

    def to_dense(self, t: Tensor) -> Tensor:
        """A tensor in the weight's layout (the weight, its gradient, an optimizer moment)
        -> ``[n_out, n_in]``, zero where the wiring has no connection."""
        if self.blocks is None:
            return t * self.mask if self.path == "masked-dense" else t
        g, real = self.geo, self.block_in >= 0
        if self.pad_mask is not None:
            t = t * self.pad_mask
        blocks = t.reshape(-1, g["s_in"], g["s_out"])[real]  # [p, s_in, s_out]
        full = blocks.new_zeros(g["g_out"], g["g_in"], g["s_out"], g["s_in"])
        full = full.index_put((self.block_out[real], self.block_in[real]), blocks.transpose(1, 2))
        full = full.permute(0, 2, 1, 3).reshape(g["g_out"] * g["s_out"], g["g_in"] * g["s_in"])
        return full.index_select(0, self.out_cols).index_select(1, self.in_cols)

    def from_dense(self, full: Tensor) -> Tensor:
        """``[n_out, n_in]`` -> a new tensor in the weight's layout, zero where the wiring has
        no connection (the inverse of :meth:`to_dense` on connected entries)."""
        if self.blocks is None:
            return full * self.mask if self.path == "masked-dense" else full.clone()
        g = self.geo
        padded = full.new_zeros(g["g_out"] * g["s_out"], g["g_in"] * g["s_in"])
        padded[self.out_cols[:, None], self.in_cols[None, :]] = full
        return self._gather_blocks(padded)

    # ---- forward -------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """``[*, n_in] -> [*, n_out]`` (leading dims are flattened to ``b``, then restored).

        Under ``torch.autocast`` the kernels run in the autocast dtype, as ``nn.Linear`` does:
        input, weight and bias are cast to it (differentiably, so the parameters' gradients
        keep their own dtype) before the custom kernels, which autocast does not reach."""
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        if self.path == "dense":
            return F.linear(x, self.weight, self.bias).view(*lead, self.out_features)
        x, weight, bias = _autocast(x, self.weight, self.bias)
        if self.path == "masked-dense":
            y = MaskedLinear.apply(x, weight, self.mask.to(weight.dtype), bias)
        else:
            y = self._forward_blocks(x.contiguous(), weight, bias)
        return y.view(*lead, self.out_features)

    def _forward_blocks(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """Block paths, ``[b, n_in] -> [b, n_out]``; pads unequal ensembles to ``s`` units."""
        g = self.geo
        if self.padded:  # [b, n_in] -> [b, g_in*s_in], zeros in the padding
            padded = x.new_zeros(x.shape[0], g["g_in"] * g["s_in"])
            padded[:, self.in_cols] = x  # index_put saves no copy of x (index_copy would)
            x = padded
            if bias is not None:
                bias = bias.new_zeros(g["g_out"] * g["s_out"]).index_copy(0, self.out_cols, bias)
        if self.path == "block-window":
            names = ("order", "position")
            kernel = WindowMatmul
        else:
            names, kernel = ("gather",), GatherMatmul
        geo = g | {name: getattr(self, name, None) for name in (*names, "pad_mask")}
        y = kernel.apply(x, weight, bias, geo)
        return y.index_select(1, self.out_cols) if self.padded else y  # [b, n_out]

    def extra_repr(self) -> str:
        ensembles = (len(self.wiring.in_sizes), len(self.wiring.out_sizes))
        text = (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"density={self.wiring.density:.4g}, ensembles={ensembles}, "
        )
        if self.blocks is not None:
            text += f"block={self.geo['s_in']}x{self.geo['s_out']}{' (padded)' * self.padded}, "
        return text + f"bias={self.bias is not None}, path={self.path_reason}"

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
                    "build the layer from the same Wiring (or rewire it with set_wiring)."
                )
        super()._load_from_state_dict(state_dict, prefix, *args)


def _autocast(x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, ...]:
    """``x``, ``weight`` and ``bias`` in the autocast dtype of ``x``'s device when autocast is
    on there (what autocast does to ``F.linear``'s operands), else unchanged."""
    device = x.device.type
    if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device)
    return x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


# every buffer _build may register: a rebuild drops them all before registering its own
_STRUCTURE = frozenset(
    ("fan_in", "mask", "block_in", "block_out", "in_cols", "out_cols", "pad_mask")
    + ("gather", "order", "position")
)
