"""Path-norms of a trained network (the path-norm toolkit, seed 003).

The L_p path-norm sums, over every path from an input (or a bias) to an output, the product of
``|w|^p`` along the path, then takes the 1/p-th power. For a ReLU network it is one forward pass:
replace every weight and bias by ``|.|^p``, every activation by the identity, feed a vector of
ones, and sum the outputs. LayerNorm and GELU are not positively homogeneous: they are treated
as identity here (their affine scale folded as ``|gamma|^p``), which makes the figure a
path-norm of the network's linear skeleton.
Shape legend: ``d`` features.
"""

from __future__ import annotations

import torch
from torch import nn

from neuroplex.network import Network


def path_norm(model: Network, p: float = 1.0) -> float:
    """L_p path-norm of ``model`` (p = 1 or 2), from one forward pass of ``|θ|^p`` on ones."""
    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.LayerNorm))]
    owned = {id(p) for m in linears for p in m.parameters(recurse=False)}
    if any(id(p) not in owned for p in model.parameters()):
        raise ValueError("path_norm supports networks of Linear (and LayerNorm) layers in a chain")
    first = next(m for m in linears if isinstance(m, nn.Linear))
    h = torch.ones(1, first.in_features, dtype=torch.float64)
    with torch.no_grad():
        for m in linears:
            h = _abs_power_forward(m, h, p)
    return float(h.sum() ** (1.0 / p))


def _abs_power_forward(m: nn.Module, h: torch.Tensor, p: float) -> torch.Tensor:
    if isinstance(m, nn.Linear):
        out = h @ m.weight.double().abs().pow(p).T  # [1, d_out]
        return out + m.bias.double().abs().pow(p) if m.bias is not None else out
    if m.elementwise_affine:  # LayerNorm as its affine part
        out = h * m.weight.double().abs().pow(p)
        return out + m.bias.double().abs().pow(p) if m.bias is not None else out
    return h
