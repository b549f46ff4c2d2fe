"""Evaluation of a network on data splits (eval mode, no gradients).

Shape legend: ``b`` batch, ``d`` features, ``c`` classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from neuroplex.data.registry import Dataset, Split
from neuroplex.data.stream import StreamDataset, StreamSplit
from neuroplex.network import Network

EVAL_BATCH = 1024


@torch.no_grad()
def evaluate(
    model: Network, split: Split | StreamSplit, batch_size: int = EVAL_BATCH
) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``split`` (eval mode, restored after)."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for x, y in split.batches(batch_size):
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(dim=1) == y).sum())
    model.train(was_training)
    n = max(len(split), 1)
    return {"loss": loss_sum / n, "acc": correct / n}


def evaluate_splits(model: Network, data: Dataset | StreamDataset) -> dict[str, float]:
    out: dict[str, float] = {}
    splits = {"val": data.val, "test": data.test}
    for name, split in splits.items():
        if split is not None:
            for key, value in evaluate(model, split).items():
                out[f"{name}_{key}"] = value
    return out
