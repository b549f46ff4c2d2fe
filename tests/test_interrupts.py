"""A stop signal that lands inside a finalizer is not lost: it is raised after it."""

import os
import signal
import time

import pytest

from neuroplex.interrupts import in_finalizer, raising


class Slow:
    """A finalizer long enough for a signal to land in it."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)  # the handler runs here, inside __del__


class Stop(Exception):
    pass


def test_a_signal_inside_a_finalizer_is_raised_after_it():
    previous = signal.signal(signal.SIGUSR1, raising(Stop))
    try:
        with pytest.raises(Stop):
            Slow()  # dies at once: its __del__ gets the signal
            time.sleep(1.0)  # the retry arrives here, outside the finalizer
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_outside_a_finalizer_the_signal_raises_at_once():
    previous = signal.signal(signal.SIGUSR1, raising(Stop))
    try:
        with pytest.raises(Stop):
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(1.0)
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_in_finalizer_looks_at_the_callers():
    import sys

    class Probe:
        def __del__(self) -> None:
            self.seen.append(in_finalizer(sys._getframe()))

    seen: list[bool] = []
    probe = Probe()
    probe.seen = seen
    del probe
    assert seen == [True] and not in_finalizer(sys._getframe())
