"""Activation-memory meter: exact bytes saved for backward, via saved_tensors_hooks.

Every tensor autograd saves for the backward pass goes through ``pack``; the meter counts its
storage once (a tensor saved by two ops, or a view of a saved tensor, is not double counted) and
leaves the model's parameters and buffers out (they live anyway: a sparse layer's mask saved for
its backward is no activation). The packed handle decrements the count when autograd
frees it, so ``current`` follows the graph's life and ``peak`` is the high-water mark — exactly the
memory local learning saves by freeing each stage's graph early.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class _Saved:
    """Handle autograd keeps instead of the tensor; its death releases the count."""

    __slots__ = ("tensor", "meter", "key", "__weakref__")

    def __init__(self, tensor: Tensor, meter: ActivationMeter, key: int | None) -> None:
        self.tensor, self.meter, self.key = tensor, meter, key

    def __del__(self) -> None:
        # torch.compile traces the hooks with copies made without __init__: they hold no count
        if getattr(self, "key", None) is not None:
            self.meter._release(self.key)


class ActivationMeter:
    """Counts live bytes saved for backward; ``peak`` is the maximum since ``reset_peak``.

    Args:
        exclude: tensors whose storage is never counted (the model's parameters); their
            storage is looked up again at every :meth:`track`, so a parameter whose data was
            replaced (rewiring) stays excluded.
        modules: modules whose parameters and buffers are never counted, looked up at every
            :meth:`track` (rewiring replaces a layer's buffers).
    """

    def __init__(self, exclude: Iterable[Tensor] = (), modules: Iterable[nn.Module] = ()) -> None:
        self._exclude = list(exclude)
        self._modules = list(modules)
        self._excluded: set[int] = set()
        self._live: dict[int, list[int]] = {}  # storage key -> [bytes, references]
        self.current = 0
        self.peak = 0

    def reset_peak(self) -> None:
        self.peak = self.current

    @contextmanager
    def track(self):
        """Count every tensor saved for backward inside this block."""
        state = [t for m in self._modules for t in (*m.parameters(), *m.buffers())]
        self._excluded = {_storage_key(t) for t in (*self._exclude, *state)}
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield self

    def _pack(self, tensor: Tensor) -> _Saved:
        # Keep a detached alias: an op that saves its own output (softmax, exp, tanh...) would
        # otherwise hold that output, whose grad_fn holds this handle — a cycle through C++ that
        # Python's gc cannot see, so the graph (and the count) would never be freed.
        tensor = tensor.detach()
        key = _storage_key(tensor)
        if key in self._excluded:
            return _Saved(tensor, self, None)
        entry = self._live.get(key)
        if entry is None:
            nbytes = tensor.untyped_storage().nbytes()
            self._live[key] = [nbytes, 1]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        else:
            entry[1] += 1
        return _Saved(tensor, self, key)

    @staticmethod
    def _unpack(saved: _Saved) -> Tensor:
        return saved.tensor

    def _release(self, key: int) -> None:
        entry = self._live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self._live[key]


def _storage_key(tensor: Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
