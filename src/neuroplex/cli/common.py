"""What every command shares: one-line user errors, and the --debug switch that shows tracebacks."""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import typer

from neuroplex.errors import NeuroplexError
from neuroplex.interrupts import raising

DEBUG = SimpleNamespace(on=False)  # set by the root callback's --debug


def user_errors(fn):
    """Turn NeuroplexError (and an OS refusal: read-only, full disk, not a directory) into one
    line on stderr and exit code 2 (unless --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (NeuroplexError, OSError) as e:
            if DEBUG.on:
                raise
            print(f"error: {one_line(e)}", file=sys.stderr)
            raise typer.Exit(2) from None

    return wrapper


def one_line(e: BaseException | str) -> str:
    """The message of ``e`` on one line; an OSError as ``path: reason``."""
    if isinstance(e, OSError) and e.strerror:
        where = f"{e.filename}: " if e.filename is not None else ""
        text = f"{where}{e.strerror}"
    else:
        text = str(e)
    return " ".join(text.split())


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that a run writes its summary on the way out."""

    signal_name = "SIGTERM"


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` and Ctrl-C KeyboardInterrupt, never
    inside a finalizer (neuroplex.interrupts; main thread only)."""
    previous = signal.signal(signal.SIGTERM, raising(Terminated))
    previous_int = signal.signal(signal.SIGINT, raising(KeyboardInterrupt))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
