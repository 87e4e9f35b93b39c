"""Content digests: parsed once at the edge, never passed around as strings.

Follows the OCI image spec's digest grammar (descriptor.md, "Digests")::

    digest                ::= algorithm ":" encoded
    algorithm             ::= algorithm-component (algorithm-separator algorithm-component)*
    algorithm-component   ::= [a-z0-9]+
    algorithm-separator   ::= [+._-]
    encoded               ::= [a-zA-Z0-9=_-]+

Only the registered algorithms blobctl can verify are accepted: ``sha256`` (64 lower
hex), ``sha512`` (128 lower hex) and ``blake3`` (64 lower hex). A digest's file name in
the store is ``<algorithm>-<hex>`` (spec/store-layout.md); since the grammar above
admits neither ``/`` nor ``.``-only names, no digest can name a path outside
``blobs/``.
"""

from __future__ import annotations

import hashlib
import re
from typing import Protocol

from blobstore.errors import InvalidDigest

__all__ = ["ALGORITHMS", "DEFAULT_ALGORITHM", "Digest", "Hasher", "new_hasher"]

DEFAULT_ALGORITHM = "sha256"

# algorithm -> length of its lower-case hex encoding
ALGORITHMS: dict[str, int] = {"sha256": 64, "sha512": 128, "blake3": 64}

_OCI_GRAMMAR = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")
_LOWER_HEX = re.compile(r"^[0-9a-f]+$")


class Hasher(Protocol):
    """What blobctl needs from a hash object (hashlib and blake3 both fit)."""

    def update(self, data: bytes | bytearray | memoryview, /) -> object: ...

    def hexdigest(self) -> str: ...


def new_hasher(algorithm: str = DEFAULT_ALGORITHM) -> Hasher:
    """Return a fresh hash object for ``algorithm``; raise InvalidDigest if unsupported."""
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "sha512":
        return hashlib.sha512()
    if algorithm == "blake3":
        import blake3

        return blake3.blake3()  # type: ignore[no-any-return,unused-ignore]
    raise InvalidDigest(algorithm, "unsupported algorithm (sha256, sha512, blake3)")


class Digest:
    """An immutable, validated content digest such as ``sha256:<64 hex>``."""

    __slots__ = ("algorithm", "hex")

    algorithm: str
    hex: str

    def __init__(self, algorithm: str, hex: str) -> None:
        expected = ALGORITHMS.get(algorithm)
        if expected is None:
            raise InvalidDigest(
                f"{algorithm}:{hex}", "unsupported algorithm (sha256, sha512, blake3)"
            )
        if len(hex) != expected or not _LOWER_HEX.match(hex):
            raise InvalidDigest(
                f"{algorithm}:{hex}", f"{algorithm} needs {expected} lower-case hex digits"
            )
        object.__setattr__(self, "algorithm", algorithm)
        object.__setattr__(self, "hex", hex)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Digest is immutable")

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse ``alg:hex``; raise InvalidDigest for anything off the OCI grammar."""
        if not isinstance(text, str) or len(text) > 200:
            raise InvalidDigest(str(text)[:80], "not a digest string")
        if not _OCI_GRAMMAR.match(text):
            raise InvalidDigest(text, "does not match the OCI digest grammar alg:hex")
        algorithm, _, encoded = text.partition(":")
        return cls(algorithm, encoded)

    @classmethod
    def from_filename(cls, filename: str) -> Digest:
        """Parse a blob file name: ``alg-hex``, or Ollama's legacy ``sha256:hex``."""
        for sep in ("-", ":"):
            algorithm, found, encoded = filename.partition(sep)
            if found and algorithm in ALGORITHMS:
                return cls(algorithm, encoded)
        raise InvalidDigest(filename, "not a blob file name (alg-hex)")

    @classmethod
    def of_bytes(cls, data: bytes, algorithm: str = DEFAULT_ALGORITHM) -> Digest:
        h = new_hasher(algorithm)
        h.update(data)
        return cls(algorithm, h.hexdigest())

    @property
    def filename(self) -> str:
        """The blob's file name in ``blobs/``: ``<algorithm>-<hex>``."""
        return f"{self.algorithm}-{self.hex}"

    @property
    def legacy_filename(self) -> str:
        """Ollama's pre-2024 blob file name: ``<algorithm>:<hex>``."""
        return f"{self.algorithm}:{self.hex}"

    @property
    def short(self) -> str:
        """First 12 hex digits, as ``ollama list`` shows a model ID."""
        return self.hex[:12]

    def new_hasher(self) -> Hasher:
        return new_hasher(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def __repr__(self) -> str:
        return f"Digest({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Digest):
            return NotImplemented
        return self.algorithm == other.algorithm and self.hex == other.hex

    def __hash__(self) -> int:
        return hash((self.algorithm, self.hex))

    def __lt__(self, other: Digest) -> bool:
        return (self.algorithm, self.hex) < (other.algorithm, other.hex)
