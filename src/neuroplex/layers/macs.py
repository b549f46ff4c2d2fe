"""Multiply-accumulates (MACs) per sample, counted exactly from one forward pass.

Hooks on every convolution and linear layer read the shapes that really flow: a conv's MACs are
its output positions times, per output channel, the channel filters it applies (``c_in /
groups`` for ``nn.Conv*``, the wired channels for a :class:`SparseConv` on every path, so
masked-out filters are not counted) times the kernel's taps; a linear layer's are its rows
times ``in × out`` (only the connections that exist for a :class:`SparseLinear`). Norms,
activations, pooling and the MoE's batched experts are not counted.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from neuroplex.layers.sparse import SparseLinear
from neuroplex.layers.sparse_conv import SparseConv

CONV_TYPES = (nn.Conv1d, nn.Conv2d, SparseConv)
LINEAR_TYPES = (nn.Linear, SparseLinear)


def layer_macs(module: nn.Module, out: Tensor) -> int:
    """MACs of one call of a conv / linear ``module`` that produced ``out [b, c_out, *s]`` or
    ``[..., d_out]``, summed over the batch."""
    if isinstance(module, SparseConv):
        positions = out.numel() // out.shape[1]  # b * prod(s)
        return positions * module.num_connections()  # every wired filter at every position
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        positions = out.numel() // out.shape[1]
        taps = math.prod(module.kernel_size)
        return positions * module.out_channels * (module.in_channels // module.groups) * taps
    rows = out.numel() // out.shape[-1]
    if isinstance(module, SparseLinear):
        return rows * module.num_connections()
    return rows * module.in_features * module.out_features


@torch.no_grad()
def count_macs(model: nn.Module, x: Tensor) -> dict[str, int]:
    """MACs per sample of ``model`` on the batch ``x [b, *in_shape]``: ``conv`` (every
    convolution), ``linear`` (every linear layer) and ``total``. Runs in eval mode and restores
    the model's mode."""
    counts = {"conv": 0, "linear": 0}

    def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
        counts["conv" if isinstance(module, CONV_TYPES) else "linear"] += layer_macs(module, out)

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, CONV_TYPES + LINEAR_TYPES)
    ]
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    per_sample = {k: v // len(x) for k, v in counts.items()}
    return per_sample | {"total": per_sample["conv"] + per_sample["linear"]}
