"""Layers: plain ``torch.nn.Module``s that take typed keyword arguments, never config objects."""

from neuroplex.layers.dense import DenseBlock, DenseStage
from neuroplex.layers.moe import MoE, moe_aux_loss, moe_stats
from neuroplex.layers.output import StageOutput
from neuroplex.layers.routers import ROUTERS
from neuroplex.layers.sparse import SparseLinear

__all__ = [
    "ROUTERS",
    "DenseBlock",
    "DenseStage",
    "MoE",
    "SparseLinear",
    "StageOutput",
    "moe_aux_loss",
    "moe_stats",
]
