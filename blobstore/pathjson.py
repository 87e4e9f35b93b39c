"""blobctl's own JSON files that hold paths (a link folder's record, GC's intent record).

A path whose bytes are not UTF-8 (a folder named in another encoding) reaches Python as
text with lone surrogates (``os.fsdecode``, PEP 383: byte 0xXX is U+DCXX). msgspec writes
and reads UTF-8 only, so such text is written with each of those characters as the JSON
escape ``\\udcXX`` (``json.dumps``), and read back with ``json.loads``, which turns the
escape into the same character: the path round-trips to its bytes (``os.fsencode``).
The same rule as ``--json`` output (spec/cli.md, "Paths that are not UTF-8"). Files with
UTF-8 paths only are written byte for byte as before.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

import msgspec

from blobstore.decoding import decode as _decode
from blobstore.decoding import loads

__all__ = ["decode", "encode"]

T = TypeVar("T")


def encode(obj: Any) -> bytes:
    """``obj`` as JSON bytes (valid UTF-8 always)."""
    try:
        return msgspec.json.encode(obj)
    except UnicodeEncodeError:
        return json.dumps(msgspec.to_builtins(obj), separators=(",", ":")).encode()


def decode(raw: bytes, decoder: msgspec.json.Decoder[T]) -> T:
    """What :func:`encode` wrote, as ``decoder``'s type; msgspec.DecodeError or
    ValidationError for bytes that are not such a document."""
    try:
        return _decode(raw, decoder)
    except msgspec.DecodeError:
        if b"\\ud" not in raw.lower():
            raise
        try:
            value = loads(raw)
        except ValueError:
            raise msgspec.DecodeError("malformed JSON") from None
        return msgspec.convert(value, decoder.type)  # type: ignore[no-any-return]
