"""CLI context, output helpers and the one error boundary (spec/cli.md).

The error boundary prints ``error: <message>`` (and ``hint: <hint>``) on stderr and
exits with the code for the error's family. Tracebacks appear only with ``--debug``.

Text output (not ``--json``) goes through :func:`echo` (and :func:`print_table`, the
error and warning lines): strings that came from files or the network (a GGUF's
architecture, a registry's error text, a file name) may hold control characters, which
are shown as ``\\xNN`` escapes (:func:`clean`), never sent to the terminal. JSON output is
exact (JSON escapes C0 itself).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from cli.redact import Redact, redact

if TYPE_CHECKING:
    from blobstore.store import Store

__all__ = [
    "Ctx",
    "Styled",
    "clean",
    "echo",
    "end_progress_line",
    "exit_code_for",
    "exit_codes",
    "fail",
    "get_ctx",
    "json_text",
    "print_json",
    "print_table",
    "report_error",
]

# Exit codes (spec/cli.md, "Exit codes").
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_VERIFY_FAILED = 5
EXIT_NO_SPACE = 8
EXIT_STORE = 11
EXIT_INTERRUPTED = 130


def exit_codes() -> list[tuple[type[BaseException], int]]:
    """(class, code), most specific first: the first ``isinstance`` match wins.

    Imported on demand (only when an error is reported), so ``--help`` stays fast.
    A ``RemoteNotFound`` is a ``NotFound`` (3) before it is a ``RegistryError`` (6).
    """
    from blobstore import errors as e
    from catalog.errors import MissingExtra
    from registry_client import errors as r

    return [
        (MissingExtra, 12),
        (r.AuthError, 7),
        (e.InsufficientSpace, EXIT_NO_SPACE),
        (e.StoreBusy, 9),
        (e.CapNotMet, 10),
        (e.NotFound, 3),
        (e.InvalidInput, 4),
        (e.IntegrityError, 5),
        (r.RegistryError, 6),
        (e.StoreError, EXIT_STORE),
        (e.BlobctlError, 1),
    ]


def exit_code_for(exc: BaseException) -> int:
    """The exit code for an exception, by class (``isinstance``), never by name."""
    import errno

    for cls, code in exit_codes():
        if isinstance(exc, cls):
            return code
    if isinstance(exc, OSError):
        return EXIT_NO_SPACE if exc.errno in (errno.ENOSPC, errno.EDQUOT) else EXIT_STORE
    return 1


def default_store() -> Path:
    """``BLOBCTL_STORE``, else ``OLLAMA_MODELS``, else ``~/.ollama/models``."""
    for var in ("BLOBCTL_STORE", "OLLAMA_MODELS"):
        value = os.environ.get(var)
        if value:
            return Path(value).expanduser()
    return Path.home() / ".ollama" / "models"


@dataclass
class Ctx:
    store_path: Path | None = None
    json: bool = False
    debug: bool = False
    _store: Store | None = field(default=None, repr=False)

    @property
    def resolved_store_path(self) -> Path:
        return self.store_path if self.store_path is not None else default_store()

    def store(self, *, create: bool = True) -> Store:
        if self._store is None:
            from blobstore.store import Store

            self._store = Store(self.resolved_store_path, create=create)
        return self._store


def get_ctx() -> Ctx:
    ctx = click.get_current_context()
    root = ctx.find_root()
    if not isinstance(root.obj, Ctx):
        root.obj = Ctx()
    return root.obj


# C0 (all of it: a newline or tab inside a value would forge or break lines), DEL, C1
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


class Styled(str):
    """Text this CLI styled itself (ANSI colour): :func:`print_table` prints it as it is."""

    __slots__ = ()


def clean(text: object, *, keep: str = "") -> str:
    """``str(text)`` with every control character (C0, DEL, C1) but those in ``keep``
    replaced by a visible ``\\xNN`` escape. Idempotent."""
    return _CONTROL.sub(
        lambda m: m.group() if m.group() in keep else f"\\x{ord(m.group()):02x}", str(text))


def echo(text: object = "", *, err: bool = False, nl: bool = True) -> None:
    """Print one piece of text output: control characters escaped (:func:`clean`), but
    for the line breaks the text is made of."""
    click.echo(clean(text, keep="\n"), err=err, nl=nl)


_SURROGATE = re.compile("[\ud800-\udfff]")


def json_text(value: Any, *, indent: int = 2) -> str:
    """``value`` as JSON (``indent`` 0: one line). A string holding bytes that are not
    UTF-8 (a path's ``surrogateescape`` characters, PEP 383: byte 0xXX is U+DCXX) has
    them as ``\\udcXX`` escapes (spec/cli.md, "Paths that are not UTF-8"): ``json.loads``
    then ``os.fsencode`` gives the bytes back."""
    import json

    import msgspec

    try:
        raw = msgspec.json.encode(value, enc_hook=str)
    except UnicodeEncodeError:  # (msgspec writes UTF-8 only)
        text = json.dumps(msgspec.to_builtins(value, enc_hook=str), ensure_ascii=False,
                          indent=indent or None,
                          separators=(",", ": ") if indent else (",", ":"))
        return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return (msgspec.json.format(raw, indent=indent) if indent else raw).decode()


def print_json(value: Any) -> None:
    click.echo(json_text(value))


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """Columns, left-aligned; cells cleaned (:func:`clean`) unless :class:`Styled`."""
    rows = [[c if isinstance(c, Styled) else clean(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    fmt = "    ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*headers).rstrip()]
    lines.extend(fmt.format(*row).rstrip() for row in rows)
    click.echo("\n".join(lines))


def iso(ts: float | None) -> str | None:
    """``ts`` (unix time) as ``YYYY-MM-DDTHH:MM:SSZ``; None for None and for a time no
    calendar shows (NaN, infinite, beyond the platform's ``time_t``): a bad time read
    from a file never fails the command that shows it."""
    if ts is None:
        return None
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
    except (OverflowError, OSError, ValueError):
        return None


_line_open = [False]  # a progress line is drawn on stderr without its newline yet


def end_progress_line() -> None:
    """End the progress line open on stderr, if any, so that what follows (an ``error:``
    line after Ctrl-C) starts a line of its own; print nothing otherwise."""
    if _line_open[0]:
        _line_open[0] = False
        click.echo("", err=True)


def byte_progress(label: str, enabled: bool) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback drawing one updating stderr line on a TTY."""
    from blobstore.units import human_bytes

    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if enabled and (now - last[0] > 0.2 or done == total):
            last[0] = now
            pct = 100.0 * done / total if total else 100.0
            click.echo(f"\r{label} {human_bytes(done)} / {human_bytes(total)} ({pct:.0f}%)",
                       err=True, nl=done == total)
            _line_open[0] = done != total

    return progress


def warn(message: str) -> None:
    echo(f"warning: {clean(message)}", err=True)


def fail(message: str, *, hint: str | None = None, code: int = 1) -> NoReturn:
    echo(f"error: {clean(message)}", err=True)
    if hint:
        echo(f"hint: {clean(hint)}", err=True)
    sys.exit(code)


def report_error(exc: BaseException, *, debug: bool) -> int:
    """Print ``exc`` as the CLI's one-line error (+hint); return the exit code."""
    if debug:
        import traceback

        sys.stderr.write(redact("".join(
            traceback.format_exception(type(exc), exc, exc.__traceback__))))
    hint = getattr(exc, "hint", None)
    code = exit_code_for(exc)
    if isinstance(exc, OSError) and not hasattr(exc, "message"):
        where = f": {exc.filename}" if exc.filename else ""
        message = f"{exc.strerror or exc}{where}"
    else:
        message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        if code == 1 and not hasattr(exc, "message") and not debug:
            hint = hint or "unexpected error; run again with --debug for a traceback"
    message = " ".join(str(message).split())  # one line, always
    end_progress_line()
    echo(f"error: {clean(message)}", err=True)
    if hint:
        echo(f"hint: {clean(' '.join(str(hint).split()))}", err=True)
    return code


class _CleanFormatter(logging.Formatter):
    """A log line with its control characters escaped (:func:`clean`): warnings carry
    file names and servers' words. A traceback (``--debug``) keeps its line breaks."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return clean(super().formatMessage(record))


def setup_logging(debug: bool) -> None:
    """Log to stderr: warnings, or with ``debug`` every logger's DEBUG records (httpx's
    and httpcore's too), each through ``Redact`` (no passwords, query strings, credential
    headers or tokens, whichever logger emitted it)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(Redact())
    handler.setFormatter(_CleanFormatter(
        "%(levelname)s %(name)s: %(message)s" if debug else "warning: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        handlers=[handler])
