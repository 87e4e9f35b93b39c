"""Errors raised by the blob store.

Every error blobctl raises on purpose derives from :class:`BlobctlError`. Each one
carries a one-line ``message`` a user can act on and an optional ``hint``; the CLI
maps the classes below to exit codes in exactly one place (``cli/output.py``, table
in ``spec/cli.md``). Library code never prints or exits.

::

    BlobctlError
    ├── InvalidInput                 bad user input; nothing was written
    │   ├── InvalidName              model reference off the name grammar (spec/names.md)
    │   ├── InvalidDigest            digest off the OCI digest grammar or unsupported
    │   │                            (also a ValueError)
    │   ├── InvalidManifest          manifest bytes that do not decode or validate
    │   ├── InvalidSize              "50G"-style size that does not parse
    │   ├── InvalidOption            an options object (PullOptions, RetryPolicy,
    │   │                            GCOptions, PushOptions) given a value out of range
    │   ├── GGUFError                a file that is not a readable GGUF
    │   └── ModelPinned              rm of a pinned model without force
    ├── NotFound
    │   ├── ModelNotFound            no manifest for that name
    │   └── BlobNotFound             no blob for that digest
    ├── IntegrityError               stored or received bytes are not what they claim
    │   ├── DigestMismatch
    │   ├── SizeMismatch
    │   ├── StoreDamaged             a manifest refers to blobs that are missing
    │   ├── TarDamaged               a tar stream that is damaged (blobstore/tarstream.py)
    │   ├── ArchiveDamaged           an archive import met damage (blobstore/archive.py)
    │   └── CacheDamaged             HF-cache files off their sha256 names (caches.py)
    ├── StoreError                   the store cannot do what was asked
    │   ├── StoreBusy                a lock could not be taken in time
    │   ├── InsufficientSpace        not enough free disk space (ENOSPC too)
    │   ├── StoreUnwritable          the store (or its state) is read-only
    │   ├── StoreUnreadable          the store (or a part of it) cannot be read
    │   └── StateUnreadable          the state database (pins, last use) cannot be read
    └── CapNotMet                    gc --max-size could not reach the cap

No other exception leaves the library on purpose: ``OSError`` and ``ValueError`` from
the operating system or a parser are mapped to one of these at the store's boundary
(``raise ... from exc``).

The registry client adds its own subtree under ``BlobctlError`` (see
``registry_client/errors.py``).
"""

from __future__ import annotations

__all__ = [
    "BlobNotFound",
    "BlobctlError",
    "CapNotMet",
    "DigestMismatch",
    "GGUFError",
    "InsufficientSpace",
    "IntegrityError",
    "InvalidDigest",
    "InvalidInput",
    "InvalidManifest",
    "InvalidName",
    "InvalidOption",
    "InvalidSize",
    "ManifestsUnreadable",
    "ModelNotFound",
    "ModelPinned",
    "NotFound",
    "SizeMismatch",
    "StoreBusy",
    "StoreDamaged",
    "StateUnreadable",
    "StoreError",
    "StoreUnwritable",
]


class BlobctlError(Exception):
    """Root of every error blobctl raises on purpose.

    ``message`` is one line for the user; ``hint`` (optional) says what to do next.
    """

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class InvalidInput(BlobctlError):
    """The input does not parse or validate; nothing was changed."""


class InvalidName(InvalidInput):
    def __init__(self, name: str, reason: str) -> None:
        super().__init__(
            f"invalid model name {name!r}: {reason}",
            hint="names look like [host[:port]/][namespace/]model[:tag], e.g. llama3:8b",
        )
        self.name = name
        self.reason = reason


class InvalidDigest(InvalidInput, ValueError):
    """Also a ``ValueError``: code that parses digests may catch either."""

    def __init__(self, digest: str, reason: str) -> None:
        super().__init__(f"invalid digest {digest!r}: {reason}")
        self.digest = digest
        self.reason = reason


class InvalidManifest(InvalidInput):
    def __init__(self, reason: str, *, source: str | None = None) -> None:
        where = f" ({source})" if source else ""
        super().__init__(f"invalid manifest{where}: {reason}")
        self.reason = reason
        self.source = source


class InvalidSize(InvalidInput):
    def __init__(self, text: str) -> None:
        super().__init__(
            f"invalid size {text!r}",
            hint="use bytes or a unit: 50G or 50GiB (=50*2^30), 50GB (=50*10^9), 512M, 10K",
        )
        self.text = text


class InvalidOption(InvalidInput):
    """An options object made with a value out of its range: refused when it is made,
    before anything runs (spec/api.md, "Options")."""

    def __init__(self, owner: str, name: str, value: object, must: str) -> None:
        super().__init__(f"invalid {owner}({name}={value!r}): must be {must}")
        self.owner = owner
        self.name = name
        self.value = value
        self.must = must


class GGUFError(InvalidInput):
    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: not a readable GGUF file: {reason}")
        self.path = path
        self.reason = reason


class ModelPinned(InvalidInput):
    def __init__(self, name: str) -> None:
        super().__init__(
            f"model {name!r} is pinned",
            hint="unpin it first ('blobctl unpin') or use 'rm --force'",
        )
        self.name = name


class NotFound(BlobctlError):
    """The thing asked for does not exist in the store."""


class ModelNotFound(NotFound):
    def __init__(self, name: str) -> None:
        super().__init__(
            f"model {name!r} not found", hint="'blobctl list' shows the models in this store"
        )
        self.name = name


class BlobNotFound(NotFound):
    def __init__(self, digest: str) -> None:
        super().__init__(f"blob {digest} not found")
        self.digest = digest


class IntegrityError(BlobctlError):
    """Bytes are not what their digest or size claims."""


class DigestMismatch(IntegrityError):
    def __init__(self, expected: str, actual: str, *, source: str | None = None) -> None:
        where = f" from {source}" if source else ""
        super().__init__(f"digest mismatch{where}: expected {expected}, got {actual}")
        self.expected = expected
        self.actual = actual
        self.source = source


class SizeMismatch(IntegrityError):
    def __init__(
        self, digest: str, expected: int, actual: int, *, source: str | None = None
    ) -> None:
        where = f" from {source}" if source else ""
        super().__init__(
            f"size mismatch for {digest}{where}: expected {expected} bytes, got {actual}"
        )
        self.digest = digest
        self.expected = expected
        self.actual = actual
        self.source = source


class StoreDamaged(IntegrityError):
    """A model's blob is absent (``missing``), or there but not the bytes its manifest
    names (``damaged``: another size, or, hashed, another digest)."""

    def __init__(self, name: str, missing: list[str], damaged: list[str] | None = None) -> None:
        damaged = damaged or []
        parts = [f"{len(ds)} blob(s) {what} ({', '.join(ds[:3])})"
                 for what, ds in (("missing", missing), ("damaged", damaged)) if ds]
        super().__init__(
            f"model {name!r} is damaged: {'; '.join(parts)}",
            hint="run 'blobctl verify', then pull or import the model again",
        )
        self.name = name
        self.missing = missing
        self.damaged = damaged


class StoreError(BlobctlError):
    """The store cannot carry out the operation."""


class StoreBusy(StoreError):
    def __init__(self, what: str, timeout: float) -> None:
        super().__init__(
            f"store is busy: could not lock {what} within {timeout:g}s",
            hint="another blobctl process holds the lock; try again when it has finished",
        )
        self.what = what
        self.timeout = timeout


class InsufficientSpace(StoreError):
    """``needed`` is None when the disk filled up while writing (ENOSPC)."""

    def __init__(self, path: str, needed: int | None, available: int, *,
                 size: int | None = None, reserve: int = 0) -> None:
        what = (f"need {needed} more bytes" if needed is not None
                else "the disk filled up while writing")
        if needed is not None and size is not None and reserve:
            what += f" ({size} to write plus {reserve >> 20} MiB kept free)"
        super().__init__(
            f"not enough disk space in {path}: {what}, {available} bytes available",
            hint="free space (e.g. 'blobctl gc --max-size …') and run the command again",
        )
        self.path = path
        self.needed = needed
        self.available = available


class StoreUnwritable(StoreError):
    def __init__(self, path: str, reason: str) -> None:
        super().__init__(
            f"cannot write to store at {path}: {reason}",
            hint="check permissions, or pick another store with --store / BLOBCTL_STORE",
        )
        self.path = path
        self.reason = reason


class StoreUnreadable(StoreError):
    def __init__(self, path: str, reason: str) -> None:
        super().__init__(
            f"cannot read {path}: {reason}",
            hint="check permissions (a store of another user?), or pick another store "
                 "with --store / BLOBCTL_STORE",
        )
        self.path = path


class StateUnreadable(StoreError):
    def __init__(self, path: str, reason: str) -> None:
        super().__init__(
            f"cannot read blobctl state at {path}: {reason}",
            hint="pins and last-use times are unknown, so nothing was evicted; "
                 "check the file's permissions or remove it (it holds no data)",
        )
        self.path = path


class ManifestsUnreadable(StoreError):
    """A part of ``manifests/`` exists but cannot be read (permissions, a symlink loop,
    an I/O error): the models there may use any blob, so nothing may be removed."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(
            f"cannot read {path}: {reason}",
            hint="a model there may use any blob, so blobctl removes none while it "
                 "cannot be read; fix its permissions or remove it",
        )
        self.path = path
        self.reason = reason


class CapNotMet(BlobctlError):
    """``gc --max-size`` could not bring the store under the cap."""

    def __init__(self, cap: int, total: int, reason: str) -> None:
        from blobstore.units import human_bytes  # late: units imports this module

        super().__init__(
            f"cannot reach the size cap of {human_bytes(cap)} ({cap} bytes): "
            f"{human_bytes(total)} remain, {total - cap} bytes over; kept: {reason}",
            hint="unpin models ('blobctl unpin'), stop what uses them, or raise the cap",
        )
        self.cap = cap
        self.total = total
        self.reason = reason
