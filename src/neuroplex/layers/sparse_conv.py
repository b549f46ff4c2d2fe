"""SparseConv: a convolution whose channel connectivity is a Wiring (G2G channel ensembles).

The wiring's units are channels: output channel ``o`` reads input channel ``i`` (through a full
``kernel``-sized filter) when the wiring connects them. Three paths, chosen once from the wiring
(``extra_repr`` says which):

- ``grouped``: every output ensemble reads only its own input ensemble, all of one size
  (modular with ``m = 0``): one grouped convolution, ``groups`` = ensembles.
- ``gathered``: every output ensemble reads ``r`` input ensembles of one size (modular with
  ``m > 0``, block hypergraphs): the input channels of each output ensemble are gathered side by
  side (``[b, g · r · s, *s]``) and run as one grouped convolution — only connected blocks are
  stored and multiplied (``density ×`` the dense multiply-accumulates).
- ``masked``: anything else (unit-level masks, uneven ensembles): a dense convolution with the
  unit mask applied to its weight.

Shape legend: ``b`` batch, ``c`` channels, ``g`` output ensembles, ``r`` input ensembles per
output ensemble, ``*s`` spatial dimensions (``L`` or ``h, w``), ``k`` kernel size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neuroplex.wiring import Wiring

CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d}


def ensemble_inputs(wiring: Wiring) -> list[list[int]] | None:
    """Input ensembles of each output ensemble (sorted), when every output ensemble reads the
    same number of input ensembles and all ensembles of a side have one size; else None."""
    if not wiring.is_block or len(set(wiring.in_sizes)) > 1 or len(set(wiring.out_sizes)) > 1:
        return None
    inputs: list[list[int]] = [[] for _ in wiring.out_sizes]
    for i, j in wiring.block_pairs:
        inputs[j].append(i)
    return inputs if len({len(ins) for ins in inputs}) == 1 else None


def gather_index(wiring: Wiring, inputs: list[list[int]]) -> Tensor:
    """Input channels of output ensemble 0's input ensembles, then ensemble 1's, ...
    ``[g * r * s_in]`` (long)."""
    offsets = wiring.in_offsets
    channels = [c for ins in inputs for i in ins for c in range(offsets[i], offsets[i + 1])]
    return torch.tensor(channels, dtype=torch.long)


def choose_path(wiring: Wiring) -> str:
    """``grouped``, ``gathered`` or ``masked`` (see the module docstring)."""
    inputs = ensemble_inputs(wiring)
    if inputs is None:
        return "masked"
    return "grouped" if all(ins == [j] for j, ins in enumerate(inputs)) else "gathered"


class SparseConv(nn.Module):
    """Convolution over ``n`` spatial dims (padding ``kernel // 2``) wired by ``wiring``
    (``n_in`` input and ``n_out`` output channels). ``[b, n_in, *s] -> [b, n_out, *s']``."""

    def __init__(
        self,
        wiring: Wiring,
        n: int,
        kernel: int = 3,
        stride: int = 1,
        bias: bool = True,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.wiring, self.n, self.kernel, self.stride = wiring, n, kernel, stride
        self.path = choose_path(wiring)
        self.groups = 1 if self.path == "masked" else len(wiring.out_sizes)
        if self.path == "masked":
            mask = torch.as_tensor(wiring.to_mask(), device=device)
            self.register_buffer("mask", mask.to(dtype or torch.get_default_dtype()))
            per_group, fan_in = wiring.n_in, max(1.0, float(mask.sum(1).float().mean()))
        else:
            ins = ensemble_inputs(wiring)
            per_group = fan_in = len(ins[0]) * wiring.in_sizes[0]
            if self.path == "gathered":
                self.register_buffer("index", gather_index(wiring, ins).to(device))
        self.weight = nn.Parameter(torch.empty(wiring.n_out, per_group, *[kernel] * n, **factory))
        self.bias = nn.Parameter(torch.empty(wiring.n_out, **factory)) if bias else None
        self.reset_parameters(fan_in * kernel**n)

    def reset_parameters(self, fan_in: float) -> None:
        """``nn.Conv``'s default init, with the fan-in of the connections that exist."""
        bound = 1 / math.sqrt(fan_in)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        """``[b, n_in, *s] -> [b, n_out, *s']``."""
        weight = self.weight
        if self.path == "masked":
            weight = weight * self.mask.view(*self.mask.shape, *[1] * self.n)
        elif self.path == "gathered":
            x = x.index_select(1, self.index)  # [b, g * r * s_in, *s]: each group's inputs
        conv = CONV_FUNCTIONS[self.n]
        return conv(x, weight, self.bias, self.stride, self.kernel // 2, 1, self.groups)

    def extra_repr(self) -> str:
        w = self.wiring
        return (
            f"in_channels={w.n_in}, out_channels={w.n_out}, kernel={self.kernel}, "
            f"stride={self.stride}, density={w.density:.3g}, "
            f"ensembles=({len(w.in_sizes)}, {len(w.out_sizes)}), path={self.path}"
        )
