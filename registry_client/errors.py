"""Errors raised by the registry client.

Foreign errors (httpx transport errors, HTTP statuses, OCI error bodies) are mapped to
these once, in ``client.py``, with ``raise ... from exc``. The CLI maps the families to
exit codes (spec/cli.md)::

    BlobctlError                      (blobstore.errors)
    └── RegistryError                 a registry or the network failed us (exit 6)
        ├── RemoteNotFound            unknown repository / tag / blob (exit 3, also NotFound)
        ├── AuthError                 401/403 of the registry's origin (exit 7)
        ├── RateLimited               429 after every retry
        ├── TransferError             connection failures / stalls after every retry
        ├── ProtocolError             the server broke the protocol (bad Content-Range, …)
        └── UnsupportedManifest       an index without our platform, unknown media types
"""

from __future__ import annotations

from blobstore.errors import BlobctlError, NotFound

__all__ = [
    "AuthError",
    "ProtocolError",
    "RangeNotSatisfiable",
    "RateLimited",
    "RegistryError",
    "RemoteNotFound",
    "TransferError",
    "UnsupportedManifest",
]


class RegistryError(BlobctlError):
    """A registry or the network failed; ``url`` says where (never with credentials)."""

    def __init__(self, message: str, *, url: str | None = None, status: int | None = None,
                 hint: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, hint=hint)
        self.url = url
        self.status = status
        self.retry_after = retry_after  # seconds the server asked to wait (Retry-After)


class RangeNotSatisfiable(RegistryError):
    """416: the range asked for is not in the file; ``content_range`` is the server's
    ``Content-Range`` (``bytes */TOTAL``: how long the file really is)."""

    def __init__(self, message: str, *, url: str | None = None,
                 content_range: str = "") -> None:
        super().__init__(message, url=url, status=416)
        self.content_range = content_range


class RemoteNotFound(NotFound, RegistryError):
    def __init__(self, what: str, *, url: str | None = None, status: int | None = 404) -> None:
        RegistryError.__init__(
            self, f"{what} not found in the registry", url=url, status=status,
            hint="check the name and tag (e.g. hf.co/<user>/<repo>:<quant>)",
        )


class AuthError(RegistryError):
    """401/403 of the registry's own origin (where the credentials go) after trying
    credentials. A refusal of a host that a redirect to another origin led to (a CDN's
    presigned URL) is a plain ``RegistryError``: no credentials were sent there."""


class RateLimited(RegistryError):
    pass


class TransferError(RegistryError):
    pass


class ProtocolError(RegistryError):
    pass


class UnsupportedManifest(RegistryError):
    pass
