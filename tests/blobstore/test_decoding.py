"""blobstore/decoding.py: a document nested too deep is a decode error (a ValueError), not
a RecursionError that passes every handler for bad bytes; and every decode of a document
in the packages goes through it (found from outside: a deep manifest made pull, import,
push and every store command exit 1)."""

from __future__ import annotations

import ast
from pathlib import Path

import msgspec
import pytest
import tomllib
from hypothesis import given, settings
from hypothesis import strategies as st

from blobstore.decoding import TOO_DEEP, decode, decode_any, loads, parse_text

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("blobstore", "registry_client", "registry_server", "catalog", "cli")


class _Doc(msgspec.Struct):
    a: int = 0


DEPTH = st.integers(3_000, 100_000)


@pytest.mark.timeout(60)
@settings(max_examples=20, deadline=None)
@given(depth=DEPTH, shape=st.sampled_from(["[%s]", '{"x":%s}', '[{"y":%s}]']))
def test_too_deep_is_a_decode_error_for_every_decoder(depth: int, shape: str) -> None:
    inner = "0"
    opening, closing = shape.split("%s")
    text = opening * depth + inner + closing * depth
    raw = ('{"a":1,"z":' + text + "}").encode()
    packed = b"\x91" * depth + b"\x00"  # MessagePack: an array of one array of ...
    for call in (lambda: decode(raw, msgspec.json.Decoder(_Doc)),
                 lambda: decode(packed, msgspec.msgpack.Decoder()),
                 lambda: decode_any(raw), lambda: loads(raw), lambda: loads(raw.decode()),
                 lambda: parse_text(tomllib.loads, "a = " + "[" * depth + "]" * depth)):
        with pytest.raises(msgspec.DecodeError, match=TOO_DEEP) as info:
            call()
        assert isinstance(info.value, ValueError)


def test_a_shallow_document_decodes_as_before() -> None:
    assert decode(b'{"a":2,"z":[[[1]]]}', msgspec.json.Decoder(_Doc)) == _Doc(2)
    assert decode_any(b"[[1]]") == [[1]] and loads("NaN") != loads("NaN")
    assert parse_text(tomllib.loads, "a = [[1]]") == {"a": [[1]]}
    with pytest.raises(msgspec.ValidationError):
        decode(b'{"a":"x"}', msgspec.json.Decoder(_Doc))


def _decoder_names(tree: ast.Module) -> set[str]:
    """Module-level names bound to a msgspec Decoder."""
    out: set[str] = set()
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Attribute)
                and node.value.func.attr == "Decoder"):
            out |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return out


def test_every_decode_goes_through_blobstore_decoding() -> None:
    direct = {"msgspec.json.decode", "msgspec.msgpack.decode", "json.loads", "json.load",
              "tomllib.loads", "tomllib.load"}
    found: list[str] = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if path == ROOT / "blobstore" / "decoding.py":
                continue
            tree = ast.parse(path.read_text())
            decoders = _decoder_names(tree)
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                    continue
                name = ast.unparse(node.func)
                if name in direct or (node.func.attr == "decode"
                                      and isinstance(node.func.value, ast.Name)
                                      and node.func.value.id in decoders):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}")
    assert found == [], "decode through blobstore.decoding (RecursionError): " + \
        ", ".join(found)
