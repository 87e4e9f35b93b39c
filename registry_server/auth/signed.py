"""Short-lived signed bearer tokens for the docker token flow (spec/serve.md).

``GET /token`` hands a client a token that carries the scopes it was granted; the
server accepts it later without a lookup. Form::

    b1.<base64url(payload)>.<base64url(HMAC-SHA256(secret, "b1." + base64url(payload)))>

The payload is a compact msgspec array: subject (API token name, "" for anonymous), the
API token's fingerprint (first 16 hex of its stored hash, so a removed or replaced token's
bearer tokens die with it), issued-at and expiry (Unix seconds) and the granted access
``[[repository, [action...]]...]``. :func:`verify` checks the MAC in constant time before
it decodes anything, then the expiry; any other token is ``None``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time

import msgspec

from blobstore.decoding import decode

__all__ = ["PREFIX", "Grant", "SignedToken", "sign", "verify"]

PREFIX = "b1."
MAX_TOKEN_LEN = 16384


class Grant(msgspec.Struct, array_like=True, frozen=True):
    repository: str          # canonical form (patterns.canonical_repository)
    actions: tuple[str, ...]  # "pull", "push"


class SignedToken(msgspec.Struct, array_like=True, frozen=True):
    subject: str
    fingerprint: str
    issued_at: int
    expires_at: int
    access: tuple[Grant, ...] = ()

    def allows(self, repository: str, action: str) -> bool:
        return any(g.repository == repository and action in g.actions for g in self.access)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(SignedToken)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, signed_part: str) -> bytes:
    return hmac.new(secret, signed_part.encode("ascii"), hashlib.sha256).digest()


def sign(secret: bytes, token: SignedToken) -> str:
    """The bearer string for ``token`` under ``secret``."""
    body = PREFIX + _b64(_encoder.encode(token))
    return body + "." + _b64(_mac(secret, body))


def verify(secret: bytes, text: str, now: float | None = None) -> SignedToken | None:
    """The token if ``text`` was made by :func:`sign` with ``secret`` and has not expired;
    otherwise None (malformed, tampered, signed with another secret, expired)."""
    if not text.startswith(PREFIX) or len(text) > MAX_TOKEN_LEN or not text.isascii():
        return None
    body, dot, mac_text = text.rpartition(".")
    if not dot or body.count(".") != 1:
        return None
    try:
        mac = _unb64(mac_text)
    except (binascii.Error, ValueError):
        return None
    if not hmac.compare_digest(mac, _mac(secret, body)):
        return None
    if _b64(mac) != mac_text:  # one spelling per MAC: no trailing-bit variants
        return None
    try:
        token = decode(_unb64(body[len(PREFIX):]), _decoder)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        return None
    t = time.time() if now is None else now
    if not token.issued_at - 60 <= t < token.expires_at:
        return None
    return token
