"""Per-stage random streams: what a stage draws depends on the seed, the stage and its own
draws, never on other stages' draws or the global generator."""

import numpy as np
import torch

from neuroplex.methods.streams import StageStreams


def reference_draws(seed: int, stage: int, n: int) -> torch.Tensor:
    """The first ``n`` uniform draws of ``stage``'s stream, computed from the documented seed
    rule: numpy's SeedSequence([seed, stage])."""
    gen = torch.Generator().manual_seed(
        int(np.random.SeedSequence([seed, stage]).generate_state(1)[0])
    )
    return torch.rand(n, generator=gen)


def test_a_stage_draws_its_own_stream_whatever_the_others_draw():
    streams = StageStreams(7, 3, torch.device("cpu"))
    torch.manual_seed(123)
    outer = torch.get_rng_state()
    with streams.use(1):
        first = torch.rand(4)
    with streams.use(0):
        torch.rand(100)  # another stage's draws in between
    torch.rand(5)  # and the global generator's
    with streams.use(1):
        second = torch.rand(4)
    assert torch.equal(torch.cat([first, second]), reference_draws(7, 1, 8))
    torch.manual_seed(123)
    torch.rand(5)
    after = torch.get_rng_state()
    streams2 = StageStreams(7, 3, torch.device("cpu"))
    torch.set_rng_state(outer)
    with streams2.use(2):
        torch.rand(3)
    torch.rand(5)
    assert torch.equal(torch.get_rng_state(), after)  # the outer stream never moved


def test_state_round_trips_all_stages_or_some():
    streams = StageStreams(0, 2, torch.device("cpu"))
    with streams.use(0):
        torch.rand(10)
    saved = streams.state()
    assert sorted(saved) == ["stream0.cpu", "stream1.cpu"]
    fresh = StageStreams(0, 2, torch.device("cpu"))
    fresh.load_state(streams.state(range(0, 1)), range(0, 1))
    with fresh.use(0), torch.random.fork_rng():
        got = torch.rand(3)
    assert torch.equal(got, reference_draws(0, 0, 13)[10:])
