"""The access file of ``blobctl serve --auth FILE`` (spec/serve.md, "Access control").

TOML, mode 0600, written only by :func:`save` (temp file in the same folder, fsync,
``os.replace``, folder fsync), so a server reloading it sees the old or the new file,
never half of one::

    secret = "…"                      # HMAC key of the /token bearer tokens (base64url)
    realm = "https://reg.lan/token"   # optional: the /token URL given in challenges

    [anonymous]                       # what callers without credentials may do
    read = ["library/*"]
    push = []
    tier = "lite"

    [tiers]                           # model tier by repository pattern, first match wins
    "hf.co/**" = "standard"

    [tokens.alice]
    hash = "sha256:<hex>"             # sha256 of the token; the token itself is not kept
    read = ["**"]
    push = ["team/*"]
    tier = "standard"
    created = 2026-01-01T00:00:00Z

API tokens are ``blobctl_`` + 43 base64url characters (32 random bytes). Being
uniformly random and long, they need no slow password hash: sha256 makes a stolen file
useless (no preimage) while a check costs a microsecond; lookups go by hash, and the
final comparison is :func:`hmac.compare_digest`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import hashlib
import os
import re
import secrets
import stat
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from blobstore.decoding import parse_text
from blobstore.errors import InvalidInput, NotFound
from registry_server.auth.patterns import Pattern, check_tier

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "AuthFile",
    "AuthFileError",
    "AuthFileMissing",
    "TokenEntry",
    "TokenExists",
    "TokenNotFound",
    "hash_token",
    "load",
    "new_secret",
    "new_token",
    "save",
    "secret_bytes",
]

TOKEN_PREFIX = "blobctl_"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}")
_HASH = re.compile(r"sha256:[0-9a-f]{64}")


class AuthFileError(InvalidInput):
    """The access file does not parse or breaks its schema (exit 4)."""


class TokenExists(InvalidInput):
    """``token add`` of a name the file already has (exit 4)."""


class TokenNotFound(NotFound):
    """``token rm`` of a name the file does not have (exit 3)."""


class AuthFileMissing(TokenNotFound):
    """No access file at that path (exit 3)."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"no auth file {path}",
                         hint=f"'blobctl token add NAME --auth {path}' creates it")


def new_token() -> str:
    return TOKEN_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def secret_bytes(text: str) -> bytes | None:
    """The HMAC key a ``secret`` value names: base64url (padding optional), at least 32
    bytes decoded; None when it is not that."""
    text = text.strip()
    if not re.fullmatch(r"[A-Za-z0-9_-]+={0,2}", text):
        return None
    try:
        key = base64.b64decode(text.rstrip("=") + "=" * (-len(text.rstrip("=")) % 4),
                               altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        return None
    return key if len(key) >= 32 else None


def new_secret() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def hash_token(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise InvalidInput(f"invalid token name {name!r}",
                           hint="1-64 letters, digits and '_.@-', not starting with '.@-'")
    return name


@dataclass(frozen=True)
class Rights:
    read: tuple[Pattern, ...] = ()
    push: tuple[Pattern, ...] = ()
    tier: str = "lite"


@dataclass(frozen=True)
class TokenEntry:
    name: str
    hash: str
    rights: Rights
    created: dt.datetime | None = None

    @property
    def fingerprint(self) -> str:
        return self.hash[7:23]


@dataclass
class AuthFile:
    """The parsed file. ``raw`` keeps the document as read, so a rewrite keeps keys this
    version does not know."""

    secret: str | None = None
    realm: str | None = None
    anonymous: Rights = field(default_factory=Rights)
    tiers: tuple[tuple[Pattern, str], ...] = ()
    tokens: dict[str, TokenEntry] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)


def _patterns(where: str, value: object) -> tuple[Pattern, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AuthFileError(f"{where}: expected a list of repository patterns")
    try:
        return tuple(Pattern.parse(v) for v in value)
    except InvalidInput as exc:
        raise AuthFileError(f"{where}: {exc.message}", hint=exc.hint) from exc


def _tier(where: str, value: object) -> str:
    if value is None:
        return "lite"
    if not isinstance(value, str):
        raise AuthFileError(f"{where}: tier must be a string")
    try:
        return check_tier(value)
    except InvalidInput as exc:
        raise AuthFileError(f"{where}: {exc.message}", hint=exc.hint) from exc


def _rights(where: str, doc: object) -> Rights:
    if not isinstance(doc, dict):
        raise AuthFileError(f"{where}: expected a table")
    return Rights(_patterns(f"{where}.read", doc.get("read")),
                  _patterns(f"{where}.push", doc.get("push")),
                  _tier(f"{where}.tier", doc.get("tier")))


def parse(doc: dict[str, Any], where: str = "auth file") -> AuthFile:
    """The schema check; AuthFileError names the first offending key."""
    out = AuthFile(raw=doc)
    secret = doc.get("secret")
    if secret is not None and (not isinstance(secret, str) or secret_bytes(secret) is None):
        raise AuthFileError(f"{where}: 'secret' must be base64url of at least 32 bytes",
                            hint="remove the 'secret' line: the next 'blobctl token add' "
                                 "writes a new one")
    out.secret = secret
    realm = doc.get("realm")
    if realm is not None and (not isinstance(realm, str)
                              or not re.fullmatch(r"https?://[^\s\"',]+", realm)):
        raise AuthFileError(f"{where}: 'realm' must be an http(s) URL without quotes or commas")
    out.realm = realm
    if "anonymous" in doc:
        out.anonymous = _rights(f"{where}: [anonymous]", doc["anonymous"])
    tiers = doc.get("tiers", {})
    if not isinstance(tiers, dict):
        raise AuthFileError(f"{where}: [tiers] must be a table of pattern = tier")
    out.tiers = tuple((_patterns(f"{where}: [tiers]", k)[0], _tier(f"{where}: [tiers] {k!r}", v))
                      for k, v in tiers.items())
    tokens = doc.get("tokens", {})
    if not isinstance(tokens, dict):
        raise AuthFileError(f"{where}: [tokens] must be a table of named tokens")
    for name, entry in tokens.items():
        at = f"{where}: [tokens.{name}]"
        if not _NAME.fullmatch(name):
            raise AuthFileError(f"{at}: invalid token name")
        rights = _rights(at, entry)
        h = entry.get("hash")
        if not isinstance(h, str) or not _HASH.fullmatch(h):
            raise AuthFileError(f"{at}: 'hash' must be 'sha256:' and 64 lower-case hex digits")
        created = entry.get("created")
        if created is not None and not isinstance(created, dt.datetime):
            raise AuthFileError(f"{at}: 'created' must be a TOML date-time")
        out.tokens[name] = TokenEntry(name, h, rights, created)
    return out


def load(path: Path) -> AuthFile:
    """Read and check the file. OSError (missing, unreadable) passes through;
    AuthFileError for bad TOML or schema."""
    data = path.read_bytes()
    try:
        doc = parse_text(tomllib.loads, data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:  # TOMLDecodeError, nested too deep
        raise AuthFileError(f"{path}: not valid TOML: {exc}") from exc
    return parse(doc, str(path))


def save(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` atomically with mode 0600 (temp file + fsync + rename + folder fsync).

    The file is checked with :func:`parse` first: nothing invalid is ever written."""
    parse(doc, str(path))
    data = tomli_w.dumps(doc).encode()
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, stat.S_IRUSR | stat.S_IWUSR)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover  (some filesystems refuse to open folders)
        return
    try:
        os.fsync(dfd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(dfd)


def _read_doc(path: Path, *, create: bool) -> dict[str, Any]:
    try:
        return load(path).raw
    except FileNotFoundError:
        if create:
            return {}
        raise AuthFileMissing(path) from None


def add_token(path: Path, name: str, *, read: list[str], push: list[str], tier: str,
              now: dt.datetime | None = None) -> str:
    """Add a token to the file (created 0600 if missing; a secret is generated if the file
    has none) and return the token, which is not stored anywhere.

    TokenExists for a name already there; InvalidInput for a bad name, pattern or tier."""
    check_name(name)
    read_p = [Pattern.parse(p).text for p in read]
    push_p = [Pattern.parse(p).text for p in push]
    tier = check_tier(tier)
    doc = _read_doc(path, create=True)
    tokens = doc.setdefault("tokens", {})
    if name in tokens:
        raise TokenExists(f"a token named {name!r} already exists in {path}",
                          hint=f"'blobctl token rm {name} --auth {path}' first, or pick "
                               "another name")
    token = new_token()
    created = (now or dt.datetime.now(dt.timezone.utc)).replace(microsecond=0)
    tokens[name] = {"hash": hash_token(token), "read": read_p, "push": push_p, "tier": tier,
                    "created": created}
    if not doc.get("secret"):
        doc["secret"] = new_secret()
    # keep the top-level keys before the tables, for people reading the file
    ordered = {k: v for k, v in doc.items() if not isinstance(v, dict)}
    ordered.update({k: v for k, v in doc.items() if isinstance(v, dict)})
    save(path, ordered)
    return token


def remove_token(path: Path, name: str) -> None:
    """Remove a token; TokenNotFound when the file or the name is not there."""
    doc = _read_doc(path, create=False)
    tokens = doc.get("tokens", {})
    if name not in tokens:
        raise TokenNotFound(f"no token named {name!r} in {path}",
                            hint=f"'blobctl token list --auth {path}' shows the names")
    del tokens[name]
    save(path, doc)


def list_tokens(path: Path) -> list[TokenEntry]:
    return list(load_existing(path).tokens.values())


def load_existing(path: Path) -> AuthFile:
    try:
        return load(path)
    except FileNotFoundError:
        raise AuthFileMissing(path) from None
