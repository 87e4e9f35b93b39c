"""The standard streams as blobctl writes them (spec/cli.md, "Output and diagnostics").

* **stdout** carries the command's product (a table, JSON, a path, a token, an archive).
  Output that cannot be written is a failure, as in coreutils (``ls >&-``: "write error:
  Bad file descriptor"): a write or flush that fails raises :class:`OutputError`, which
  the error boundary reports as ``error: cannot write to stdout: …`` with exit 11 (8 when
  the disk is full), after the command's work is done or where it stopped. A reader that
  went away (``EPIPE``) stays a ``BrokenPipeError``: exit 141, quietly (spec/cli.md).
* **stderr** carries diagnostics (progress, ``warning:``, ``error:`` lines). They are
  best-effort, as in git: a line that cannot be written (``2>/dev/full``, ``2>&-``) is
  dropped, and the command goes on to its own exit code.
* A standard descriptor that is **closed** at start (``>&-``) is opened on ``/dev/null``
  first, so that no file the command opens (the state database, a blob) can take its
  number and receive output lines; stdout's is opened read-only, so that writing to it
  still fails (``EBADF``) as writing to a closed descriptor would.

Text that holds bytes that are not UTF-8 (a path's ``surrogateescape`` characters, PEP
383) is written as those bytes on stdout (``blobctl path`` of a store at such a path
prints the path a program can open) and as ``\\xNN`` escapes on stderr.
"""

from __future__ import annotations

import errno
import io
import os
import sys

__all__ = ["OutputError", "setup"]


class OutputError(OSError):
    """stdout could not be written (not a reader gone: that is ``BrokenPipeError``)."""

    def __init__(self, exc: OSError) -> None:
        super().__init__(exc.errno, exc.strerror)
        self.message = f"cannot write to stdout: {exc.strerror or exc}"
        self.hint: str | None = None


class _Fd(io.RawIOBase):
    """A standard stream's file descriptor, written unbuffered."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return os.isatty(self._fd)


class _Out(_Fd):
    """fd 1: every failure but a broken pipe is an :class:`OutputError`."""

    def write(self, b: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        try:
            return os.write(self._fd, b)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise OutputError(exc) from exc


class _Diagnostics(_Fd):
    """fd 2: a write that fails is dropped (diagnostics are best-effort)."""

    def write(self, b: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(b)
        while view:
            try:
                n = os.write(self._fd, view)
            except OSError:
                break  # EBADF, ENOSPC, EIO, EPIPE, EAGAIN: the rest of the line is lost
            if n <= 0:
                break
            view = view[n:]
        return len(b)


def _occupy_closed_descriptors() -> None:
    for fd, flags in ((0, os.O_RDONLY), (1, os.O_RDONLY), (2, os.O_WRONLY)):
        try:
            os.fstat(fd)
        except OSError as exc:
            if exc.errno != errno.EBADF:
                continue
            null = os.open(os.devnull, flags)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def setup() -> None:
    """Make the process's standard streams behave as the module docstring says. Call once,
    at start, before anything is written or opened."""
    _occupy_closed_descriptors()
    old_out, old_err = sys.stdout, sys.stderr
    out_enc = getattr(old_out, "encoding", None) or "utf-8"
    err_enc = getattr(old_err, "encoding", None) or "utf-8"
    out_tty = os.isatty(1)
    sys.stdout = io.TextIOWrapper(
        io.BufferedWriter(_Out(1)), encoding=out_enc, errors="surrogateescape",
        line_buffering=out_tty)
    sys.stderr = io.TextIOWrapper(
        _Diagnostics(2), encoding=err_enc,
        errors="backslashreplace", line_buffering=True, write_through=True)
