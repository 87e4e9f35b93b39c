"""Decoding documents blobctl did not just write itself: manifests and indexes (from a
registry, an archive, a push, the store's own folders), registry and Hub answers, state
and record files, tokens.

msgspec, ``json`` and ``tomllib`` decode nested values by recursion and raise
``RecursionError`` for a document nested deeper than the interpreter's recursion limit
(about 1000 levels: ``[[[[…]]]]`` is enough, even in a field that is skipped). That is
not a ``msgspec.DecodeError``/``ValueError``, so every handler written for bad bytes let
it through (found from outside: a deep manifest made pull, import, push and every store
command exit 1). Every such decode goes through one of the functions here, which turn it
into :class:`msgspec.DecodeError` (a ``ValueError``): the caller's one handler for bad
bytes then maps it to its own invalid-input error (InvalidManifest, ArchiveDamaged,
ProtocolError, …) as for any other document that does not decode.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import msgspec

__all__ = ["TOO_DEEP", "decode", "decode_any", "loads", "parse_text"]

T_co = TypeVar("T_co", covariant=True)
T = TypeVar("T")
S = TypeVar("S")

TOO_DEEP = "nested too deep"  # the start of the message, for tests and callers


class _Decoder(Protocol[T_co]):
    def decode(self, buf: bytes, /) -> T_co: ...


def _too_deep(exc: RecursionError) -> msgspec.DecodeError:
    return msgspec.DecodeError(f"{TOO_DEEP} to decode ({exc})")


def decode(raw: bytes, decoder: _Decoder[T_co]) -> T_co:
    """``decoder.decode(raw)`` (a msgspec JSON or MessagePack decoder). Raises
    msgspec.DecodeError (or ValidationError) for bytes that do not decode to its type,
    nested too deep included."""
    try:
        return decoder.decode(raw)
    except RecursionError as exc:
        raise _too_deep(exc) from exc


def decode_any(raw: bytes) -> Any:
    """``msgspec.json.decode(raw)``, untyped; msgspec.DecodeError as :func:`decode`."""
    try:
        return msgspec.json.decode(raw)
    except RecursionError as exc:
        raise _too_deep(exc) from exc


def loads(text: str | bytes) -> Any:
    """``json.loads(text)`` (its leniency kept: NaN, duplicate keys); a ValueError
    (json.JSONDecodeError, or msgspec.DecodeError when nested too deep) otherwise."""
    try:
        return json.loads(text)
    except RecursionError as exc:
        raise _too_deep(exc) from exc


def parse_text(parser: Callable[[S], T], text: S) -> T:
    """``parser(text)`` for any other recursive parser (``tomllib.loads``): its own
    errors as they are, msgspec.DecodeError (a ValueError) when nested too deep."""
    try:
        return parser(text)
    except RecursionError as exc:
        raise _too_deep(exc) from exc
