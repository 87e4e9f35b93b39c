from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blobstore.digest import Digest, new_hasher
from blobstore.errors import InvalidDigest

HEX64 = "a" * 64


def test_parse_sha256_roundtrip() -> None:
    d = Digest.parse(f"sha256:{HEX64}")
    assert (d.algorithm, d.hex) == ("sha256", HEX64)
    assert str(d) == f"sha256:{HEX64}"
    assert d.filename == f"sha256-{HEX64}"
    assert d.short == HEX64[:12]


def test_sha512_and_blake3() -> None:
    assert Digest.parse("sha512:" + "0" * 128).algorithm == "sha512"
    assert Digest.parse("blake3:" + "f" * 64).algorithm == "blake3"
    import blake3

    assert Digest.of_bytes(b"x", "blake3").hex == blake3.blake3(b"x").hexdigest()
    assert Digest.of_bytes(b"x", "sha512").hex == hashlib.sha512(b"x").hexdigest()


@pytest.mark.parametrize("text", [
    "", "sha256", "sha256:", ":" + HEX64, "sha256:" + "A" * 64, "sha256:" + "a" * 63,
    "sha256:" + "a" * 65, "md5:" + "a" * 32, "sha256:../../etc/passwd",
    "sha256:" + HEX64 + "/x", "../sha256:" + HEX64, "sha256-" + HEX64, "SHA256:" + HEX64,
    "sha256:" + HEX64 + "\n", "sha256:" + "g" * 64, "sha256:..", "sha256/../../x:abc",
])
def test_rejects_bad_digests(text: str) -> None:
    with pytest.raises(InvalidDigest):
        Digest.parse(text)


def test_from_filename_accepts_legacy_name() -> None:
    assert Digest.from_filename(f"sha256:{HEX64}") == Digest.from_filename(f"sha256-{HEX64}")
    for bad in (f"sha256-{HEX64}-partial", f"sha256-{HEX64}-partial-0", "README", ".."):
        with pytest.raises(InvalidDigest):
            Digest.from_filename(bad)


def test_immutable_and_hashable() -> None:
    d = Digest.parse(f"sha256:{HEX64}")
    with pytest.raises(AttributeError):
        d.hex = "b" * 64  # type: ignore[misc]
    assert {d, Digest.parse(f"sha256:{HEX64}")} == {d}


def test_unknown_algorithm_hasher() -> None:
    with pytest.raises(InvalidDigest):
        new_hasher("md5")


@given(st.binary(max_size=4096), st.sampled_from(["sha256", "sha512", "blake3"]))
def test_of_bytes_parse_roundtrip(data: bytes, alg: str) -> None:
    d = Digest.of_bytes(data, alg)
    assert Digest.parse(str(d)) == d
    assert Digest.from_filename(d.filename) == d


@given(st.text(max_size=200))
def test_arbitrary_text_is_refused_or_safe(text: str) -> None:
    try:
        d = Digest.parse(text)
    except InvalidDigest:
        return
    # anything accepted names a plain file directly inside blobs/
    assert "/" not in d.filename and "\\" not in d.filename and not d.filename.startswith(".")
