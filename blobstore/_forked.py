"""Run a syscall-heavy job in a forked child, so that it uses the second core.

Python threads do not help with loops of tiny system calls (stat, unlink): every call
returns to bytecode that needs the GIL, and two such loops mostly wait for each other. A
forked child has its own interpreter and runs truly in parallel. ``start`` forks only
when that is safe and cheap: on POSIX, from a process with a single thread (forking a
threaded process can copy a lock some other thread holds). Callers fall back to doing
the job in-process when ``start`` returns None or the child fails.

The child writes its result to an anonymous in-memory file (never a pipe, which would
block it until the parent reads) and leaves with ``os._exit``: no atexit handlers, no
flushing of the parent's buffers, no touching of inherited sqlite connections.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import BinaryIO

__all__ = ["Forked", "start"]


class Forked:
    """A running child; ``result()`` waits for it and returns what it wrote."""

    def __init__(self, pid: int, out: BinaryIO) -> None:
        self.pid = pid
        self._out = out
        self._done = False

    def result(self) -> bytes | None:
        """The child's output, or None if it failed (the caller then does the job)."""
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            status = 1
        self._done = True
        try:
            if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
                return None
            self._out.seek(0)
            return self._out.read()
        finally:
            self._out.close()

    def cancel(self) -> None:
        """Stop the child (its job must be safe to stop at any point) and reap it."""
        if not self._done:
            self._done = True
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            self._out.close()

    def __del__(self) -> None:  # never leave a zombie behind, even on an error path
        self.cancel()


def _memory_file() -> BinaryIO:
    if hasattr(os, "memfd_create"):
        with contextlib.suppress(OSError):
            return os.fdopen(os.memfd_create("blobctl", os.MFD_CLOEXEC), "w+b")
    return tempfile.TemporaryFile()


def start(job: Callable[[BinaryIO], None]) -> Forked | None:
    """Fork a child that runs ``job(out)``; None when forking is not safe here."""
    if not hasattr(os, "fork") or sys.platform == "darwin" or threading.active_count() > 1:
        return None
    try:
        out = _memory_file()
        pid = os.fork()
    except OSError:
        return None
    if pid == 0:  # the child
        code = 1
        try:
            # Ctrl-C goes to the whole process group: the parent handles it (and
            # cancels the child if it gives up on the result).
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            job(out)
            out.flush()
            code = 0
        except BaseException:  # noqa: BLE001  (report failure through the exit status)
            code = 1
        finally:
            os._exit(code)
    return Forked(pid, out)
