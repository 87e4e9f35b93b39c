"""Secrets kept out of the CLI's log output and tracebacks (spec/pull.md, "Redirects and
authentication": tokens and passwords are never logged; URLs carry no query string).

Our own loggers show URLs without user info or query already; httpx (INFO: every request
line with its full URL) and httpcore (DEBUG: response headers, ``Location`` with its
presigned query) do not. ``Redact`` is a filter on the CLI's log handler, so it sees every
record that reaches stderr, whichever library logger emitted it.
"""

from __future__ import annotations

import logging
import re

__all__ = ["Redact", "redact"]

HIDDEN = "***"
_SUBS: tuple[tuple[re.Pattern[str], str], ...] = (
    # user info of a URL: scheme://user:password@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@'\"<>]*@"), r"\1"),
    # a query string: of an absolute URL, and any ?name=value… (a relative Location)
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s?#'\"<>]*)\?[^\s#'\"<>]*"), r"\1?" + HIDDEN),
    (re.compile(r"\?[\w.~%+-]+=[^\s#'\"<>]*"), "?" + HIDDEN),
    # credentials in headers, in any of the shapes they are logged in:
    # (b'Authorization', b'…'), 'authorization': '…', Authorization: …
    (re.compile(r"(?i)((?:proxy-)?authorization|cookie|set-cookie|x-amz-security-token)"
                r"(['\"]?\s*[,:]\s*b?['\"])[^'\"]*"), r"\1\2" + HIDDEN),
    (re.compile(r"(?i)^((?:proxy-)?authorization|cookie|set-cookie):\s*.*$", re.M),
     r"\1: " + HIDDEN),
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9\-._~+/]{8,}=*"), r"\1 " + HIDDEN),
    # a token service's answer: {"token": "…", "access_token": "…", "refresh_token": …}
    (re.compile(r"(?i)(['\"](?:access_|refresh_|id_)?token['\"]\s*:\s*b?['\"])[^'\"]*"),
     r"\1" + HIDDEN),
)


def redact(text: str) -> str:
    """``text`` with URL passwords, query strings, credential headers and tokens hidden.
    Idempotent."""
    for pattern, repl in _SUBS:
        text = pattern.sub(repl, text)
    return text


class Redact(logging.Filter):
    """Rewrites each record's message (and its traceback text) through ``redact``;
    never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a library's bad format string: its raw parts
            message = f"{record.msg} {record.args}"
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True
