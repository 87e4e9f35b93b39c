"""Access control for ``blobctl serve --auth FILE`` (spec/serve.md, "Access control").

Rooms: ``patterns`` (repository globs, tiers), ``authfile`` (the TOML file: parse, atomic
0600 writes, token add/remove), ``signed`` (HMAC bearer tokens of the /token flow),
``policy`` (:class:`AuthPolicy`, the live-reloading Policy), ``routes`` (``GET /token``).
"""

from __future__ import annotations

from registry_server.auth.authfile import (
    AuthFileError,
    AuthFileMissing,
    TokenExists,
    TokenNotFound,
    add_token,
    list_tokens,
    remove_token,
)
from registry_server.auth.patterns import Pattern, canonical_repository, check_tier
from registry_server.auth.policy import SERVICE, AuthPolicy, Caller, load_policy
from registry_server.auth.routes import BASIC_CHALLENGE, routes

__all__ = [
    "BASIC_CHALLENGE",
    "SERVICE",
    "AuthFileError",
    "AuthFileMissing",
    "AuthPolicy",
    "Caller",
    "Pattern",
    "TokenExists",
    "TokenNotFound",
    "add_token",
    "canonical_repository",
    "check_tier",
    "list_tokens",
    "load_policy",
    "remove_token",
    "routes",
]
