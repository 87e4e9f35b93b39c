"""Sizes, counts and durations: parsing user input and formatting like Ollama.

Size rules (spec/gc.md, "Sizes"): a plain number is bytes; ``K``/``M``/``G``/``T``/``P``
and ``KiB``…``PiB`` are powers of 1024; ``KB``…``PB`` are powers of 1000. Case and a
trailing ``B`` after a binary letter (``50gb`` vs ``50G``) follow that table exactly:
``G`` = ``GiB`` = 2^30 and ``GB`` = 10^9.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from blobstore.errors import InvalidInput, InvalidOption, InvalidSize

__all__ = ["check_count", "check_seconds", "human_bytes", "human_number", "human_time_ago",
           "parse_duration", "parse_size"]

# ASCII only (re.ASCII): \d would take any script's digits (fullwidth U+FF19 read as 9)
# and IGNORECASE the Kelvin sign for k and the long s for s
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtpe]?)(i?b?)\s*$", re.IGNORECASE | re.ASCII)
_POW = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}


def parse_size(text: str) -> int:
    """Parse ``50G``/``50GiB`` (binary), ``50GB`` (decimal) or ``12345`` (bytes)."""
    m = _SIZE.match(text)
    if not m:
        raise InvalidSize(text)
    number, letter, suffix = m.group(1), m.group(2).lower(), m.group(3).lower()
    if not letter:
        if suffix not in ("", "b") or "." in number:
            raise InvalidSize(text)
        return int(number)
    if suffix == "b":
        base = 1000
    elif suffix in ("", "ib"):
        base = 1024
    else:  # a lone "i" ("5Gi") is not a unit we accept
        raise InvalidSize(text)
    value = int(Fraction(number) * base ** _POW[letter])  # exact, no float rounding
    if value >= 2**63:
        raise InvalidSize(text)
    return value


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?\s*$", re.IGNORECASE | re.ASCII)
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """Parse ``30d``, ``1h``, ``90m``, ``45s`` or a plain number of seconds."""
    m = _DURATION.match(text)
    if not m:
        raise InvalidInput(
            f"invalid duration {text!r}", hint="use a number with s, m, h, d or w, e.g. 30d"
        )
    return float(m.group(1)) * _SECONDS[(m.group(2) or "s").lower()]


def human_bytes(n: int) -> str:
    """Format a byte count exactly as Ollama's ``format.HumanBytes`` does (SI units)."""
    units = (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3))
    for unit, scale in units:
        if n >= scale:
            value = n / scale
            if value >= 10:
                return f"{int(value)} {unit}"
            if value != math.trunc(value):
                return f"{value:.1f} {unit}"
            return f"{int(value)} {unit}"
    return f"{n} B"


def human_number(n: int) -> str:
    """Format a parameter count like Ollama's ``format.HumanNumber`` (``7.2B``, ``135M``)."""
    if n >= 10**9:
        v = n / 10**9
        return f"{v:.0f}B" if v == math.floor(v) else f"{v:.1f}B"
    if n >= 10**6:
        v = n / 10**6
        return f"{v:.0f}M" if v == math.floor(v) else f"{v:.2f}M"
    if n >= 10**3:
        return f"{n / 10**3:.0f}K"
    return str(n)


def human_time_ago(seconds: float | None) -> str:
    """``"3 days ago"``-style text for an age in seconds; ``"never"`` for None."""
    if seconds is None:
        return "never"
    seconds = max(0.0, seconds)
    steps = (("year", 365 * 86400), ("month", 30 * 86400), ("week", 7 * 86400),
             ("day", 86400), ("hour", 3600), ("minute", 60))
    for unit, size in steps:
        if seconds >= size:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''} ago"
    return "just now"


def check_count(owner: str, name: str, value: object, least: int, *,
                none_ok: bool = False) -> None:
    """Raise InvalidOption unless ``value`` is an int of at least ``least`` (or None,
    with ``none_ok``): an options object's count or size, checked when it is made."""
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        must = f"a whole number of at least {least}" + (" (or None)" if none_ok else "")
        raise InvalidOption(owner, name, value, must)


def check_seconds(owner: str, name: str, value: object, *, positive: bool = False,
                  finite: bool = False, none_ok: bool = False) -> None:
    """Raise InvalidOption unless ``value`` is a number of seconds that is not negative
    (``positive``: above 0; ``finite``: not infinite; never NaN), or None with
    ``none_ok``."""
    if value is None and none_ok:
        return
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and not math.isnan(value) and (value > 0 if positive else value >= 0)
          and (math.isfinite(value) or not finite))
    if not ok:
        must = ("a number of seconds " + ("above 0" if positive else "of 0 or more")
                + (", finite" if finite else "") + (" (or None)" if none_ok else ""))
        raise InvalidOption(owner, name, value, must)
