"""What every command shares: one-line user errors, and the --debug switch that shows tracebacks."""

from __future__ import annotations

import functools
import sys
from types import SimpleNamespace

import typer

from neuroplex.errors import NeuroplexError

DEBUG = SimpleNamespace(on=False)  # set by the root callback's --debug


def user_errors(fn):
    """Turn NeuroplexError into one line on stderr and exit code 2 (unless --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NeuroplexError as e:
            if DEBUG.on:
                raise
            print(f"error: {e}", file=sys.stderr)
            raise typer.Exit(2) from None

    return wrapper
