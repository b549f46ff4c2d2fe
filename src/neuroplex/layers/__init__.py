"""Layers: plain ``torch.nn.Module``s that take typed keyword arguments, never config objects."""

from neuroplex.layers.dense import DenseBlock, DenseStage

__all__ = ["DenseBlock", "DenseStage"]
