"""The callback protocol: what the training loop tells loggers and users' own hooks.

A callback is any object with the three methods of :class:`Callback` (subclass it and override
what you need)::

    class PrintLoss(Callback):
        def on_step(self, log: StepLog) -> None:
            if log.step % 100 == 0:
                print(log.step, log.loss)

    neuroplex.train.train(cfg, "runs/x", callbacks=[PrintLoss()])

The loop calls, on rank 0 only (one process; data parallel ranks stay quiet):

- ``on_step(log)`` after every optimizer step of this session, ``log.step`` counting from 1;
- ``on_epoch(record)`` after every epoch with the record just appended to metrics.jsonl;
- ``on_end(summary)`` once when the session ends: the summary.json dict (status completed,
  stopped, diverged or interrupted), or ``None`` if training raised any other error.

A resumed run calls the hooks for the steps and epochs after its checkpoint only, so a callback
of the first session and one of the resumed session together see every step exactly once (the
steps a killed session ran past its last checkpoint are seen twice: they are trained again).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from neuroplex.errors import NeuroplexError


@dataclass(frozen=True)
class StepLog:
    """One optimizer step: the 1-based ``step``, its 0-based ``epoch``, the training ``loss``
    of the batch, the learning rate ``lr`` it used, and the rewiring ``events`` it triggered
    (plasticity.jsonl records; empty without plasticity)."""

    step: int
    epoch: int
    loss: float
    lr: float
    events: list[dict[str, Any]] = field(default_factory=list)


class Callback:
    """Do-nothing base: override any of the three hooks."""

    def on_step(self, log: StepLog) -> None: ...

    def on_epoch(self, record: dict[str, Any]) -> None: ...

    def on_end(self, summary: dict[str, Any] | None) -> None: ...


class Callbacks(Callback):
    """Several callbacks called in order (loggers first, then the user's)."""

    def __init__(self, callbacks: Sequence[Callback] = ()) -> None:
        self.callbacks = list(callbacks)

    def on_step(self, log: StepLog) -> None:
        for callback in self.callbacks:
            callback.on_step(log)

    def on_epoch(self, record: dict[str, Any]) -> None:
        for callback in self.callbacks:
            callback.on_epoch(record)

    def on_end(self, summary: dict[str, Any] | None) -> None:
        for callback in self.callbacks:
            callback.on_end(summary)


def check_callbacks(callbacks: Sequence[Any]) -> list[Callback]:
    """``callbacks`` as a list; NeuroplexError (one line) for anything that is not a list of
    objects with the three hooks."""
    if isinstance(callbacks, (str, bytes)) or not isinstance(callbacks, Sequence):
        raise NeuroplexError(
            f"callbacks = {callbacks!r}: expected a list of objects with on_step, on_epoch and "
            "on_end (neuroplex.train.callbacks.Callback)"
        )
    for i, callback in enumerate(callbacks):
        missing = [m for m in ("on_step", "on_epoch", "on_end") if not hasattr(callback, m)]
        if missing:
            raise NeuroplexError(
                f"callbacks[{i}] = {callback!r}: has no {', '.join(missing)}; subclass "
                "neuroplex.train.callbacks.Callback"
            )
    return list(callbacks)
