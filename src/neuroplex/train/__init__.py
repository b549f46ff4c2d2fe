"""Training: the one loop, its methods, checkpoints and the activation-memory meter."""

from neuroplex.train.evaluate import evaluate
from neuroplex.train.loop import build_setup, train

__all__ = ["build_setup", "evaluate", "train"]
