"""SparseConv: a convolution whose channel connectivity is a Wiring (G2G channel ensembles).

The wiring's units are channels: output channel ``o`` reads input channel ``i`` (through a full
``kernel``-sized filter) when the wiring connects them. Three paths, chosen from the wiring and
a measured rule (:func:`choose_path`; ``extra_repr`` says which runs):

- ``grouped``: every output ensemble reads only its own input ensemble, all of one size
  (modular with ``m = 0``): one grouped convolution, ``groups`` = ensembles.
- ``gathered``: every output ensemble reads ``r`` input ensembles of one size (modular with
  ``m > 0``, block hypergraphs): the input channels of each output ensemble are gathered side by
  side (``[b, g · r · s, *s]``) and run as one grouped convolution — only connected blocks are
  stored and multiplied (``density ×`` the dense multiply-accumulates).
- ``masked``: anything else (unit-level masks, uneven ensembles), and gathered wirings denser
  than 1/4, where the masked dense convolution measured faster (the table at
  ``GATHERED_MAX_DENSITY``): a dense convolution with the unit mask applied to its weight.

2-D maps run channels-last (``torch.channels_last``): the grouped convolutions measured 2-3×
faster in that layout on CPU, the results are the same. Plasticity sees every path through one
dense view of the weight, ``[c_out, c_in, *k]`` (:meth:`SparseConv.to_dense` /
:meth:`SparseConv.from_dense`), as it sees SparseLinear's.

Shape legend: ``b`` batch, ``c`` channels, ``g`` output ensembles, ``r`` input ensembles per
output ensemble, ``s`` channels per ensemble, ``*s`` spatial dimensions (``L`` or ``h, w``),
``k`` kernel size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neuroplex.wiring import Wiring, WiringError

CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d}
WEIGHT_GRADS = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight}
PATHS = ("auto", "block", "masked")  # what a caller may request

# Block path (grouped / gathered conv) vs the masked dense conv: forward + backward of one batch
# of 128, 3x3, channels-last, 1 torch thread, process CPU time with both paths interleaved in one
# process (scripts/bench_sparse_conv.py --rounds 5, x86_64, 2 shared cores):
#
# | c_in -> c_out | map | ensembles | m | density | block ms | masked ms | ratio |
# |---|---|---|---|---|---|---|---|
# | 24 -> 48 | 14x14 | 4 | 0 | 0.25 | 6.4 | 10.4 | 0.62 |
# | 24 -> 48 | 14x14 | 4 | 1 | 0.5 | 11.7 | 9.8 | 1.19 |
# | 24 -> 48 | 14x14 | 4 | 3 | 1 | 19.4 | 10.5 | 1.85 |
# | 24 -> 48 | 14x14 | 8 | 0 | 0.125 | 6.9 | 10.5 | 0.66 |
# | 24 -> 48 | 14x14 | 8 | 1 | 0.25 | 10.4 | 9.8 | 1.06 |
# | 24 -> 48 | 14x14 | 8 | 3 | 0.5 | 21.4 | 10.6 | 2.02 |
# | 48 -> 96 | 7x7 | 4 | 0 | 0.25 | 4.1 | 8.2 | 0.49 |
# | 48 -> 96 | 7x7 | 4 | 1 | 0.5 | 8.0 | 9.0 | 0.89 |
# | 48 -> 96 | 7x7 | 4 | 3 | 1 | 14.8 | 9.3 | 1.59 |
# | 48 -> 96 | 7x7 | 8 | 0 | 0.125 | 3.6 | 8.5 | 0.43 |
# | 48 -> 96 | 7x7 | 8 | 1 | 0.25 | 7.1 | 8.9 | 0.80 |
# | 48 -> 96 | 7x7 | 8 | 3 | 0.5 | 9.8 | 8.6 | 1.14 |
# | 64 -> 64 | 16x16 | 4 | 0 | 0.25 | 13.9 | 33.5 | 0.41 |
# | 64 -> 64 | 16x16 | 4 | 1 | 0.5 | 51.6 | 38.0 | 1.36 |
# | 64 -> 64 | 16x16 | 4 | 3 | 1 | 158.3 | 35.2 | 4.50 |
# | 64 -> 64 | 16x16 | 8 | 0 | 0.125 | 16.7 | 35.6 | 0.47 |
# | 64 -> 64 | 16x16 | 8 | 1 | 0.25 | 30.7 | 34.6 | 0.89 |
# | 64 -> 64 | 16x16 | 8 | 3 | 0.5 | 150.8 | 34.8 | 4.34 |
# | 128 -> 128 | 8x8 | 4 | 0 | 0.25 | 12.7 | 32.3 | 0.39 |
# | 128 -> 128 | 8x8 | 4 | 1 | 0.5 | 22.8 | 32.1 | 0.71 |
# | 128 -> 128 | 8x8 | 4 | 3 | 1 | 49.1 | 31.6 | 1.56 |
# | 128 -> 128 | 8x8 | 8 | 0 | 0.125 | 8.1 | 32.7 | 0.25 |
# | 128 -> 128 | 8x8 | 8 | 1 | 0.25 | 17.0 | 32.1 | 0.53 |
# | 128 -> 128 | 8x8 | 8 | 3 | 0.5 | 31.0 | 32.2 | 0.96 |
#
# Rule: the grouped conv (m = 0) beat the masked one everywhere (0.25-0.66x); a gathered one
# only up to density 1/4 (0.53-1.06x; the gather copies every input channel r times), and lost
# above it in 9 of 12 cases (up to 4.5x slower), so above GATHERED_MAX_DENSITY ``auto`` runs
# masked.
GATHERED_MAX_DENSITY = 0.25


def ensemble_inputs(wiring: Wiring) -> list[list[int]] | None:
    """Input ensembles of each output ensemble (sorted), when every output ensemble reads the
    same number of input ensembles and all ensembles of a side have one size; else None."""
    if not wiring.is_block or len(set(wiring.in_sizes)) > 1 or len(set(wiring.out_sizes)) > 1:
        return None
    inputs: list[set[int]] = [set() for _ in wiring.out_sizes]
    for i, j in wiring.block_pairs:
        inputs[j].add(i)
    return [sorted(ins) for ins in inputs] if len({len(ins) for ins in inputs}) == 1 else None


def gather_index(wiring: Wiring, inputs: list[list[int]]) -> Tensor:
    """Input channels of output ensemble 0's input ensembles, then ensemble 1's, ...
    ``[g * r * s_in]`` (long)."""
    offsets = wiring.in_offsets
    channels = [c for ins in inputs for i in ins for c in range(offsets[i], offsets[i + 1])]
    return torch.tensor(channels, dtype=torch.long)


def choose_path(wiring: Wiring, requested: str = "auto") -> str:
    """``grouped``, ``gathered`` or ``masked`` (module docstring). ``requested``: ``auto`` (the
    measured rule), ``block`` (grouped / gathered whenever the wiring allows) or ``masked``."""
    if requested not in PATHS:
        raise WiringError(f"path = {requested!r}: expected one of {', '.join(PATHS)}")
    inputs = ensemble_inputs(wiring)
    if inputs is None or requested == "masked":
        return "masked"
    if all(ins == [j] for j, ins in enumerate(inputs)):
        return "grouped"
    gathered_slower = requested == "auto" and wiring.density > GATHERED_MAX_DENSITY
    return "masked" if gathered_slower else "gathered"


class SparseConv(nn.Module):
    """Convolution over ``n`` spatial dims (padding ``kernel // 2``) wired by ``wiring``
    (``n_in`` input and ``n_out`` output channels). ``[b, n_in, *s] -> [b, n_out, *s']``.
    ``path``: ``auto`` (the measured rule), ``block`` or ``masked`` (:func:`choose_path`)."""

    def __init__(
        self,
        wiring: Wiring,
        n: int,
        kernel: int = 3,
        stride: int = 1,
        bias: bool = True,
        *,
        path: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.n, self.kernel, self.stride, self.requested = n, kernel, stride, path
        self._build(wiring, device)
        self.weight = nn.Parameter(torch.empty(self._weight_shape(), **factory))
        self.bias = nn.Parameter(torch.empty(wiring.n_out, **factory)) if bias else None
        self.reset_parameters()

    def _build(self, wiring: Wiring, device=None) -> None:
        """Path, groups and the derived (non-persistent) buffers for ``wiring``."""
        self.wiring = wiring
        self.path = choose_path(wiring, self.requested)
        self.groups = 1 if self.path == "masked" else len(wiring.out_sizes)
        for name in ("mask", "index", "columns"):
            self._buffers.pop(name, None)
        if self.path == "masked":
            mask = torch.as_tensor(wiring.to_mask(), device=device)
            self.register_buffer("mask", mask, persistent=False)
            return
        index = gather_index(wiring, ensemble_inputs(wiring)).to(device)
        if self.path == "gathered":
            self.register_buffer("index", index, persistent=False)
        # input channel of every stored filter: [c_out, r * s_in]
        columns = index.view(self.groups, -1).repeat_interleave(wiring.out_sizes[0], 0)
        self.register_buffer("columns", columns, persistent=False)

    def _weight_shape(self) -> tuple[int, ...]:
        """``[c_out, c_in, *k]`` on the masked path, ``[c_out, r * s_in, *k]`` on the others."""
        per_group = self.wiring.n_in if self.path == "masked" else self.columns.shape[1]
        return (self.wiring.n_out, per_group, *[self.kernel] * self.n)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``nn.Conv``'s default init (uniform ``±1/sqrt(fan_in)``), with the fan-in of the
        connections that exist (the mean over output channels on the masked path)."""
        masked = self.path == "masked"
        links = self.wiring.to_mask().sum(1).mean() if masked else self.weight.shape[1]
        bound = 1 / math.sqrt(max(1.0, float(links)) * self.kernel**self.n)
        self.weight.uniform_(-bound, bound)
        if masked:
            self.weight.mul_(self._mask_view())
        if self.bias is not None:
            self.bias.uniform_(-bound, bound)

    def _mask_view(self) -> Tensor:
        """The unit mask as ``[c_out, c_in, 1, ...]`` in the weight's dtype."""
        return self.mask.to(self.weight.dtype).view(*self.mask.shape, *[1] * self.n)

    # ---- the dense view (plasticity, analysis) ---------------------------------------------
    def to_dense(self, t: Tensor) -> Tensor:
        """A tensor in the weight's layout (the weight, its gradient, an optimizer moment)
        -> ``[c_out, c_in, *k]``, zero where the wiring has no connection; differentiable."""
        if self.path == "masked":
            return t * self._mask_view()
        full = t.new_zeros(self.wiring.n_out, self.wiring.n_in, *t.shape[2:])
        return full.scatter(1, self._column_index(t), t)

    def from_dense(self, full: Tensor) -> Tensor:
        """``[c_out, c_in, *k]`` -> a new tensor in the weight's layout (the inverse of
        :meth:`to_dense` on connected entries)."""
        if self.path == "masked":
            return full * self._mask_view()
        return full.gather(1, self._column_index(full[:, : self.columns.shape[1]]))

    def _column_index(self, like: Tensor) -> Tensor:
        """``columns`` broadcast to ``like`` (``[c_out, r * s_in, *k]``)."""
        return self.columns.view(*self.columns.shape, *[1] * self.n).expand_as(like)

    def dense_weight(self) -> Tensor:
        """The effective weight ``[c_out, c_in, *k]`` (masked), differentiable."""
        return self.to_dense(self.weight)

    def weight_grad(self, x: Tensor, grad_out: Tensor) -> Tensor:
        """dL/dW of the full ``[c_out, c_in, *k]`` weight, connected or not, from the layer
        input ``x [b, c_in, *s]`` and the output gradient ``grad_out [b, c_out, *s']``."""
        shape = (self.wiring.n_out, self.wiring.n_in, *[self.kernel] * self.n)
        pad = self.kernel // 2
        return WEIGHT_GRADS[self.n](x, shape, grad_out, self.stride, pad)

    def num_connections(self) -> int:
        """Weights that exist: wired channel pairs times the kernel's ``k ** n`` taps."""
        return int(self.wiring.to_mask().sum()) * self.kernel**self.n

    @torch.no_grad()
    def set_wiring(self, wiring: Wiring) -> None:
        """Rewire to ``wiring`` (same channels) in place: path, buffers and weight layout are
        rebuilt; weights on channel pairs both wirings share are kept, new ones start at zero.
        The ``weight`` Parameter stays the same object (its gradient is dropped)."""
        if (wiring.n_in, wiring.n_out) != (self.wiring.n_in, self.wiring.n_out):
            raise WiringError(
                f"wiring is {wiring.n_in} -> {wiring.n_out} channels but the layer is "
                f"{self.wiring.n_in} -> {self.wiring.n_out}; rewire with the same widths."
            )
        full = self.to_dense(self.weight.detach())
        self._build(wiring, self.weight.device)
        self.weight.data = self.from_dense(full)
        self.weight.grad = None

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """``[b, n_in, *s] -> [b, n_out, *s']``."""
        weight = self.weight
        if self.path == "masked":
            weight = weight * self._mask_view()
        elif self.path == "gathered":
            x = x.index_select(1, self.index)  # [b, g * r * s_in, *s]: each group's inputs
        if self.n == 2:
            x = x.contiguous(memory_format=torch.channels_last)
        conv = CONV_FUNCTIONS[self.n]
        return conv(x, weight, self.bias, self.stride, self.kernel // 2, 1, self.groups)

    @property
    def path_reason(self) -> str:
        """The path and why it was chosen, in one line (analysis, ``extra_repr``)."""
        if self.path == "grouped":
            return "grouped: each output ensemble reads its own input ensemble (one grouped conv)"
        if self.path == "gathered":
            return "gathered: each output ensemble's input ensembles gathered into a grouped conv"
        if ensemble_inputs(self.wiring) is None:
            return "masked: not equal-sized ensembles of equal fan-in (dense conv, masked weight)"
        if self.requested == "masked":
            return "masked: requested"
        return f"masked: gathered measured slower above density {GATHERED_MAX_DENSITY}"

    def extra_repr(self) -> str:
        w = self.wiring
        return (
            f"in_channels={w.n_in}, out_channels={w.n_out}, kernel={self.kernel}, "
            f"stride={self.stride}, density={w.density:.3g}, "
            f"ensembles=({len(w.in_sizes)}, {len(w.out_sizes)}), path={self.path}"
        )
