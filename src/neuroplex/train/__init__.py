"""Training: the one loop, its methods, checkpoints and the activation-memory meter."""

from neuroplex.train.evaluate import evaluate
from neuroplex.train.loop import train
from neuroplex.train.setup import build_setup

__all__ = ["build_setup", "evaluate", "train"]
