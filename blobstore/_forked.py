"""Run a syscall-heavy job in a forked child, so that it uses the second core.

Python threads do not help with loops of tiny system calls (stat, unlink): every call
returns to bytecode that needs the GIL, and two such loops mostly wait for each other. A
forked child has its own interpreter and runs truly in parallel.

Forking is done only where it is safe, and only for a caller that asked for it (the
library never forks on its own: ``GCOptions(fork=True)``; the CLI asks):

* on Linux only (the child must die with its parent: ``prctl(PR_SET_PDEATHSIG)``);
* from a process with exactly one thread, counted in ``/proc/self/task`` so that native
  threads (llama.cpp, OpenMP, BLAS, a heartbeat thread) count too: forking a threaded
  process can copy a lock some other thread holds.

The child resets every signal handler to the default (Ctrl-C is ignored: the parent
handles it and cancels the child), arranges to be killed when its parent dies, writes
its result to an anonymous in-memory file (never a pipe, which would block it until the
parent reads) and leaves with ``os._exit``: no atexit handlers, no flushing of the
parent's buffers, no touching of inherited sqlite connections. ``result(timeout)`` gives
up on a child that takes too long (killing it); callers then do the job themselves.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import select
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from typing import BinaryIO

__all__ = ["DEFAULT_TIMEOUT", "Forked", "can_fork", "start", "thread_count"]

DEFAULT_TIMEOUT = 300.0
_PR_SET_PDEATHSIG = 1


class Forked:
    """A running child; ``result()`` waits for it and returns what it wrote."""

    def __init__(self, pid: int, out: BinaryIO) -> None:
        self.pid = pid
        self._out = out
        self._done = False

    def _wait(self, timeout: float) -> int | None:
        """The child's wait status, or None if it is still running after ``timeout``."""
        deadline = time.monotonic() + timeout
        pidfd = -1
        if hasattr(os, "pidfd_open"):
            with contextlib.suppress(OSError):
                pidfd = os.pidfd_open(self.pid)
        try:
            delay = 0.0005
            while True:
                try:
                    pid, status = os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:
                    return 1 << 8  # reaped elsewhere: report a failure
                if pid:
                    return status
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                if pidfd >= 0:
                    select.select([pidfd], [], [], left)
                else:
                    time.sleep(min(delay, left))
                    delay = min(delay * 2, 0.02)
        finally:
            if pidfd >= 0:
                os.close(pidfd)

    def result(self, timeout: float = DEFAULT_TIMEOUT) -> bytes | None:
        """The child's output, or None if it failed or did not finish within ``timeout``
        seconds (it is then killed); the caller then does the job itself."""
        if self._done:
            return None
        status = self._wait(timeout)
        if status is None:
            self.cancel()
            return None
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


def thread_count() -> int:
    """Threads of this process, native ones included (Linux), else Python's count."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        import threading

        return threading.active_count()


@functools.lru_cache(maxsize=1)
def _load_prctl() -> Callable[..., int] | None:
    """libc's ``prctl`` (Linux), loaded once, in the parent, before any fork."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                   ctypes.c_ulong]
    fn.restype = ctypes.c_int
    return fn


def can_fork() -> bool:
    """True where ``start`` would fork now: Linux, one thread, prctl available."""
    return (hasattr(os, "fork") and sys.platform.startswith("linux")
            and _load_prctl() is not None and thread_count() == 1)


def _become_child(parent: int, prctl: Callable[..., int]) -> None:
    """Child-side setup: die with the parent, default signal handlers."""
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    for sig in signal.valid_signals():
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            signal.signal(sig, signal.SIG_DFL)
    # Ctrl-C goes to the whole process group: the parent handles it (and cancels the
    # child if it gives up on the result).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _memory_file() -> BinaryIO:
    if hasattr(os, "memfd_create"):
        with contextlib.suppress(OSError):
            return os.fdopen(os.memfd_create("blobctl", os.MFD_CLOEXEC), "w+b")
    return tempfile.TemporaryFile()


def start(job: Callable[[BinaryIO], None]) -> Forked | None:
    """Fork a child that runs ``job(out)``; None when forking is not safe here."""
    if not can_fork():
        return None
    prctl = _load_prctl()
    assert prctl is not None
    parent = os.getpid()
    try:
        out = _memory_file()
        pid = os.fork()
    except OSError:
        return None
    if pid == 0:  # the child
        code = 1
        try:
            _become_child(parent, prctl)
            job(out)
            out.flush()
            code = 0
        except BaseException:  # noqa: BLE001  (report failure through the exit status)
            code = 1
        finally:
            os._exit(code)
    return Forked(pid, out)
