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
# The whole accepted language in one expression (fast path for parse/from_filename).
_SUPPORTED = re.compile(r"^(?:(sha256|blake3)[:-]([0-9a-f]{64})|(sha512)[:-]([0-9a-f]{128}))$")
_CACHE: dict[str, Digest] = {}
_CACHE_MAX = 1 << 16


class Hasher(Protocol):
    """What blobctl needs from a hash object (hashlib and blake3 both fit)."""

    def update(self, data: bytes | bytearray | memoryview, /) -> object: ...

    def hexdigest(self) -> str: ...


def new_hasher(algorithm: str = DEFAULT_ALGORITHM) -> Hasher:
    """Return a fresh hash object for ``algorithm``; raise InvalidDigest if unsupported
    (also ``blake3`` where its package cannot be imported)."""
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "sha512":
        return hashlib.sha512()
    if algorithm == "blake3":
        try:
            import blake3
        except ImportError as exc:  # a dependency, but an install may lack its wheel
            raise InvalidDigest(algorithm, "unsupported algorithm here: the blake3 package "
                                           "is not installed") from exc
        return blake3.blake3()  # type: ignore[no-any-return,unused-ignore]
    raise InvalidDigest(algorithm, "unsupported algorithm (sha256, sha512, blake3)")


class Digest(str):
    """An immutable, validated content digest such as ``sha256:<64 hex>``.

    A ``str`` subclass whose value is always the canonical ``alg:hex`` text: hashing,
    equality and ordering run at C speed (GC handles hundreds of thousands of them).
    Construct it only through ``Digest(alg, hex)``, ``parse``, ``from_filename`` or
    ``of_bytes``, which validate.
    """

    __slots__ = ()

    def __new__(cls, algorithm: str, hex: str) -> Digest:
        expected = ALGORITHMS.get(algorithm)
        if expected is None:
            raise InvalidDigest(
                f"{algorithm}:{hex}", "unsupported algorithm (sha256, sha512, blake3)"
            )
        if len(hex) != expected or not _LOWER_HEX.fullmatch(hex):
            raise InvalidDigest(
                f"{algorithm}:{hex}", f"{algorithm} needs {expected} lower-case hex digits"
            )
        return str.__new__(cls, f"{algorithm}:{hex}")

    @classmethod
    def trusted(cls, algorithm: str, hex: str) -> Digest:
        """Build a digest from parts *without* checking them (internal use: the parts
        come from a regex match or a hasher)."""
        return str.__new__(cls, f"{algorithm}:{hex}")

    @classmethod
    def unchecked(cls, text: str) -> Digest:
        """Wrap ``alg:hex`` text *without* checking it (internal use).

        Only for text that something else already matched against the supported
        grammar (msgspec's pattern on a manifest descriptor, or a row this program
        wrote into its own index); anything else goes through ``parse``.
        """
        return str.__new__(cls, text)

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse ``alg:hex``; raise InvalidDigest for anything off the OCI grammar."""
        hit = _CACHE.get(text)
        if hit is not None:
            return hit
        m = _SUPPORTED.fullmatch(text) if isinstance(text, str) and ":" in text[:7] else None
        if m is not None:
            d = str.__new__(cls, text)
            if len(_CACHE) >= _CACHE_MAX:
                _CACHE.clear()
            _CACHE[text] = d
            return d
        if not isinstance(text, str) or len(text) > 200:
            raise InvalidDigest(str(text)[:80], "not a digest string")
        if not _OCI_GRAMMAR.fullmatch(text):
            raise InvalidDigest(text, "does not match the OCI digest grammar alg:hex")
        algorithm, _, encoded = text.partition(":")
        return cls(algorithm, encoded)

    @classmethod
    def from_filename(cls, filename: str) -> Digest:
        """Parse a blob file name: ``alg-hex``, or Ollama's legacy ``sha256:hex``."""
        m = _SUPPORTED.fullmatch(filename)
        if m is not None:
            return cls.trusted(m.group(1) or m.group(3), m.group(2) or m.group(4))
        raise InvalidDigest(filename, "not a blob file name (alg-hex)")

    @classmethod
    def of_bytes(cls, data: bytes, algorithm: str = DEFAULT_ALGORITHM) -> Digest:
        h = new_hasher(algorithm)
        h.update(data)
        return cls.trusted(algorithm, h.hexdigest())

    @property
    def algorithm(self) -> str:
        return self[:self.find(":")]

    @property
    def hex(self) -> str:
        return self[self.find(":") + 1:]

    @property
    def filename(self) -> str:
        """The blob's file name in ``blobs/``: ``<algorithm>-<hex>``."""
        return self.replace(":", "-", 1)

    @property
    def legacy_filename(self) -> str:
        """Ollama's pre-2024 blob file name: ``<algorithm>:<hex>``."""
        return str(self)

    @property
    def short(self) -> str:
        """First 12 hex digits, as ``ollama list`` shows a model ID."""
        i = self.find(":") + 1
        return self[i:i + 12]

    def new_hasher(self) -> Hasher:
        return new_hasher(self.algorithm)

    def __str__(self) -> str:
        return str.__str__(self)

    def __repr__(self) -> str:
        return f"Digest({str.__repr__(self)})"
