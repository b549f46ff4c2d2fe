"""Training: the one loop, its methods, checkpoints and the activation-memory meter."""

from neuroplex.train.loop import build_setup, evaluate, train

__all__ = ["build_setup", "evaluate", "train"]
