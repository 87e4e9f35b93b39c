"""Running short of file descriptors (spec/serve.md, "Operations": descriptors).

Every connection costs the server a descriptor. Two things here:

* :func:`raise_fd_limit` raises the soft ``RLIMIT_NOFILE`` to the hard limit at start
  (what nginx's ``worker_rlimit_nofile``, Go since 1.19 and systemd's recommendation for
  servers do): a login shell's soft limit is often 1024, or lower, while the hard limit
  allows far more.
* :class:`ListenSocket` and :class:`AcceptFailures` keep a descriptor shortage cheap and
  quiet. CPython's ``_accept_connection`` (3.11; fixed upstream by gh-151615, after
  3.11's last bug fix release), on ``EMFILE``/``ENFILE``, reports "socket.accept() out
  of system resource" with a traceback, removes the reader and schedules a retry in 1 s,
  and then goes on accepting: once per *backlog slot* (uvicorn's backlog is 2048), so
  each wave scheduled 2048 retries that landed in different loop turns, each a new wave.
  Found from outside (``ulimit -n 128``, 150 connections that send nothing for 10 s):
  24-36 MB of stderr in 12 s, 59,000-86,000 warnings each with a traceback, 3.9-5.4 s
  of CPU, growing for as long as the shortage lasted. The listening socket now answers
  the accepts after a resource error in the same batch with ``BlockingIOError`` (which
  ends asyncio's batch: one retry a second), and the loop's exception handler turns the
  reports into one warning line every :data:`QUIET_SECONDS`. Connections that cannot be
  accepted wait in the listen queue and are accepted once descriptors come back.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import socket
import time
from collections.abc import Callable
from typing import Any

__all__ = ["ACCEPT_FAILED", "QUIET_SECONDS", "AcceptFailures", "ListenSocket",
           "raise_fd_limit"]

log = logging.getLogger("blobctl.serve")

ACCEPT_FAILED = "socket.accept() out of system resource"  # asyncio's message
QUIET_SECONDS = 5.0  # at most one warning this often while accepts fail
_SHORT = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)  # asyncio's list
BATCH_SECONDS = 0.25  # after a resource error, accepts fail fast this long (< asyncio's
#                      1 s retry delay, > one batch of accepts)


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard one; (soft before, soft after).

    Never lowers it and never fails: a limit the OS will not change stays as it is."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:  # (macOS) the kernel's own cap is far lower
        target = max(soft, 1 << 16) if soft != resource.RLIM_INFINITY else soft
    if soft != resource.RLIM_INFINITY and target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft, soft
        return soft, target
    return soft, soft


class AcceptFailures:
    """A loop exception handler: asyncio's "accept out of system resource" reports become
    one warning line per ``interval`` seconds (no traceback; the count of the ones held
    back is in the next line); every other report goes to the loop's default handler."""

    def __init__(self, interval: float = QUIET_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self.last: float | None = None
        self.held = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != ACCEPT_FAILED:
            loop.default_exception_handler(context)
            return
        now = self.clock()
        if self.last is not None and now - self.last < self.interval:
            self.held += 1
            return
        exc = context.get("exception")
        more = (f" ({self.held} more in the last {now - self.last:.0f} s)"
                if self.held and self.last is not None else "")
        log.warning("cannot accept connections: %s; they wait until descriptors are "
                    "free (check ulimit -n)%s",
                    getattr(exc, "strerror", None) or exc or "out of resources", more)
        self.last = now
        self.held = 0


class ListenSocket(socket.socket):
    """A listening socket whose ``accept`` raises ``BlockingIOError`` (no system call)
    for ``BATCH_SECONDS`` after one failed for want of descriptors or memory: asyncio's
    accept batch then ends after the first such failure, with one retry scheduled
    instead of one per backlog slot (gh-151615)."""

    _short_at: float | None = None

    def accept(self) -> tuple[socket.socket, Any]:
        at = self._short_at
        if at is not None and time.monotonic() - at < BATCH_SECONDS:
            raise BlockingIOError(errno.EAGAIN, "accepts paused: out of descriptors")
        try:
            return super().accept()
        except OSError as exc:
            if exc.errno in _SHORT:
                self._short_at = time.monotonic()
            raise
