"""Training: the one loop, its setup, optimizers, checkpoints, run directories and the
activation-memory meter (the methods live in neuroplex.methods)."""

from __future__ import annotations

import importlib
from typing import Any

# Loaded on first use: neuroplex.methods imports train's checkpoint and optim modules, and
# train.setup imports the methods, so an eager import here would be circular.
# (No __all__ of these lazy names: the API reference, pdoc, documents them in their modules.)
_EXPORTS = {
    "Callback": "callbacks",
    "StepLog": "callbacks",
    "build_setup": "setup",
    "evaluate": "evaluate",
    "train": "loop",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'neuroplex.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f"neuroplex.train.{_EXPORTS[name]}"), name)
