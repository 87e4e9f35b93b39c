"""The first code the ``blobctl`` command runs, before anything heavy is imported.

Importing the CLI (click, httpx, the store) takes a tenth of a second or more on a busy
machine. A Ctrl-C or SIGTERM in that time used to print Python's traceback of whatever
import it interrupted (found by the test of signals during error reports, in CI). Until
``cli.main.run`` takes over, these signals end the command with blobctl's one
``error:`` line and 128 + the signal's number; ignored ones (``nohup``) stay ignored.
"""

from __future__ import annotations

import os
import signal

__all__ = ["release", "run"]

_GUARDED: list[signal.Signals] = []


def _stopped(signum: int, frame: object) -> None:
    what = ("interrupted" if signum == signal.SIGINT
            else f"terminated ({signal.Signals(signum).name})")
    os.write(2, f"error: {what}\n".encode())
    os._exit(128 + signum)


def _guard() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
            signal.signal(sig, _stopped)
            _GUARDED.append(sig)


def release() -> None:
    """Give the signals back to their defaults (``cli.main.run`` then sets its own)."""
    while _GUARDED:
        sig = _GUARDED.pop()
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT
                      else signal.SIG_DFL)


def run() -> None:
    """The ``blobctl`` command."""
    _guard()
    from cli.main import run as main

    main()
