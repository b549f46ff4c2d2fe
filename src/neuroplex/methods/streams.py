"""One random stream per stage, for what a stage draws while it trains (dropout masks, router
noise).

Local learning trains each stage on its own, so each stage draws from its own stream: the masks a
stage gets depend on the seed, the stage and the steps it has trained, not on which process trains
it or on what the other stages drew before it. That makes a pipelined run (``train.parallel: N``,
one stage group per process) draw exactly the sequential run's masks. The streams are part of the
method's checkpoint, so resume continues them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor


def stage_seed(seed: int, stage: int) -> int:
    """The seed of ``stage``'s stream, a function of the run's seed and the stage index."""
    return int(np.random.SeedSequence([seed, stage]).generate_state(1)[0])


class StageStreams:
    """The torch random state of every stage (CPU, and the CUDA device's when training on one)."""

    def __init__(self, seed: int, n_stages: int, device: torch.device) -> None:
        self.cuda = device if device.type == "cuda" else None
        self.states = [self._fresh(stage_seed(seed, s)) for s in range(n_stages)]

    def _fresh(self, seed: int) -> dict[str, Tensor]:
        state = {"cpu": torch.Generator().manual_seed(seed).get_state()}
        if self.cuda is not None:
            gen = torch.Generator(device=self.cuda).manual_seed(seed)
            state["cuda"] = gen.get_state()
        return state

    @contextmanager
    def use(self, stage: int) -> Iterator[None]:
        """Within the block, torch's global generator(s) are ``stage``'s stream; afterwards the
        stream has advanced and the outer state is back."""
        outer = self._get()
        self._set(self.states[stage])
        try:
            yield
        finally:
            self.states[stage] = self._get()
            self._set(outer)

    def _get(self) -> dict[str, Tensor]:
        state = {"cpu": torch.get_rng_state()}
        if self.cuda is not None:
            state["cuda"] = torch.cuda.get_rng_state(self.cuda)
        return state

    def _set(self, state: dict[str, Tensor]) -> None:
        torch.set_rng_state(state["cpu"])
        if self.cuda is not None:
            torch.cuda.set_rng_state(state["cuda"], self.cuda)

    def state(self, stages: range | None = None) -> dict[str, Tensor]:
        """``stream{s}.{cpu,cuda}`` uint8 tensors of ``stages`` (default: all)."""
        picked = range(len(self.states)) if stages is None else stages
        return {f"stream{s}.{k}": v for s in picked for k, v in self.states[s].items()}

    def load_state(self, tensors: dict[str, Tensor], stages: range | None = None) -> None:
        """Load ``stages`` (default: all) from tensors named as :meth:`state` names them
        (KeyError if one is missing)."""
        picked = range(len(self.states)) if stages is None else stages
        for s in picked:
            self.states[s] = {k: tensors[f"stream{s}.{k}"].clone() for k in self.states[s]}
