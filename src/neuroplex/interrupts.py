"""Stop signals (Ctrl-C, SIGTERM) raised where Python can deliver them: never in a finalizer.

Python runs a signal's handler in the main thread between two bytecodes, wherever it is — also
inside a ``__del__`` (the activation meter's saved-tensor handles, torch's own), where the
exception is printed as "Exception ignored in ..." and dropped, so the run would go on as if it
had never been stopped. A handler made here notices that case and sends the signal again a few
milliseconds later, when the finalizer has returned.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from types import FrameType

RETRY_S = 0.01


def in_finalizer(frame: FrameType | None) -> bool:
    """Whether ``frame`` or a caller of it is a ``__del__``."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def raising(exc: type[BaseException]) -> Callable[[int, FrameType | None], None]:
    """A signal handler that raises ``exc``, retried outside any finalizer it lands in."""

    def handler(signum: int, frame: FrameType | None) -> None:
        if in_finalizer(frame):
            threading.Timer(RETRY_S, os.kill, (os.getpid(), signum)).start()
            return
        raise exc

    return handler
