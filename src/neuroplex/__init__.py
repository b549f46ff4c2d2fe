"""neuroplex: modular neural networks with sparse wiring, gating and local learning.

``neuroplex.load_model(path)`` loads a trained model (a run directory or an export) that takes raw
inputs: it is :func:`neuroplex.train.export.load_model`, imported on first use so that
``import neuroplex`` stays light. The rest lives in the subpackages (``neuroplex.config``,
``neuroplex.train``, ...).
"""

from typing import Any

from neuroplex.errors import NeuroplexError as NeuroplexError

__version__ = "0.1.0"  # no __all__: the API reference (pdoc) lists every subpackage


def __getattr__(name: str) -> Any:
    if name == "load_model":  # imported on first use: `import neuroplex` stays light
        from neuroplex.train.export import load_model

        return load_model
    raise AttributeError(f"module 'neuroplex' has no attribute {name!r}")
