"""Parameter counts that count only connections that exist.

A sparse layer stores more weight entries than it has connections: a masked-dense SparseLinear
the whole ``[n_out, n_in]`` matrix, a block path its padding and dummy blocks, a sparse MoE
expert its masked-out weights. Those entries are held at zero and never trained, so they are
not parameters. :func:`count_parameters` is the one count every figure uses (``Network``'s
``num_parameters``, summary.json, ``neuroplex config show --model``).
"""

from __future__ import annotations

from torch import nn

from neuroplex.layers.moe import MoE
from neuroplex.layers.sparse import SparseLinear
from neuroplex.layers.sparse_conv import SparseConv


def masked_out(module: nn.Module) -> int:
    """Entries of ``module``'s own parameters (not its children's) that a mask holds at zero."""
    if isinstance(module, SparseLinear | SparseConv):
        return module.weight.numel() - module.num_connections()
    if isinstance(module, MoE) and module.expert_density is not None:
        return module.n_experts * int((module.mask1 == 0).sum() + (module.mask2 == 0).sum())
    return 0


def count_parameters(module: nn.Module) -> int:
    """Trainable values of ``module`` and its children that exist: every parameter entry
    minus those masks hold at zero."""
    stored = sum(p.numel() for p in module.parameters())
    return stored - sum(masked_out(m) for m in module.modules())
