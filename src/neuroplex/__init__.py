"""neuroplex: modular neural networks with sparse wiring, gating and local learning."""

from neuroplex.errors import NeuroplexError

__version__ = "0.1.0"
__all__ = ["NeuroplexError", "__version__"]
