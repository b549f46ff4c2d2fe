"""Layers: plain ``torch.nn.Module``s that take typed keyword arguments, never config objects."""

from neuroplex.layers.dense import DenseBlock, DenseStage
from neuroplex.layers.output import StageOutput

__all__ = ["DenseBlock", "DenseStage", "StageOutput"]
