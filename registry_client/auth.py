"""Registry credentials and tokens (spec/pull.md, "Authentication").

* Credentials for a host come from ``~/.docker/config.json`` (``$DOCKER_CONFIG``)
  ``auths`` (``auth`` = base64 ``user:password``, or ``username``/``password``), and for
  ``hf.co``/``huggingface.co`` and the host of ``$HF_ENDPOINT`` (a mirror) from
  ``HF_TOKEN`` (also ``HUGGING_FACE_HUB_TOKEN``, ``HUGGINGFACE_TOKEN``).
* A ``WWW-Authenticate: Bearer realm=…,service=…,scope=…`` challenge is answered by
  fetching a token from the realm (anonymously, or with Basic credentials when we have
  some); tokens are cached per (realm, service, scope) and refreshed before they expire.
* A ``Basic`` challenge is answered with the host's credentials.
* Tokens and passwords are never logged and never sent to another origin.
"""

from __future__ import annotations

import base64
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from blobstore.decoding import loads

__all__ = ["Challenge", "Credentials", "TokenCache", "credentials_for", "parse_challenge"]

HF_HOSTS = ("hf.co", "huggingface.co")
HF_TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN")


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    bearer: bool = False  # the password is a token to send as-is (HF)

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def __repr__(self) -> str:  # never print secrets
        return f"Credentials(username={self.username!r}, password=***)"


def _docker_config() -> dict[str, object]:
    folder = os.environ.get("DOCKER_CONFIG")
    path = Path(folder) / "config.json" if folder else Path.home() / ".docker" / "config.json"
    try:
        doc = loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _host_of(key: str) -> str:
    key = re.sub(r"^[a-z]+://", "", key)
    return key.split("/", 1)[0].lower()


def _hf_endpoint_host() -> str | None:
    """The host[:port] of ``$HF_ENDPOINT`` (a Hugging Face mirror): HF_TOKEN goes there too."""
    endpoint = os.environ.get("HF_ENDPOINT")
    if not endpoint:
        return None
    return _host_of(endpoint) or None


def credentials_for(host: str) -> Credentials | None:
    """Credentials for ``host`` (``host:port``), or None for anonymous access."""
    host_l = host.lower()
    if host_l in HF_HOSTS or host_l == _hf_endpoint_host():
        for var in HF_TOKEN_VARS:
            token = os.environ.get(var)
            if token:
                return Credentials("hf", token, bearer=True)
    auths = _docker_config().get("auths")
    if not isinstance(auths, dict):
        return None
    for key, entry in auths.items():
        if not isinstance(entry, dict) or _host_of(str(key)) != host_l:
            continue
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                continue
            return Credentials(user, password)
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return Credentials(entry["username"], entry["password"])
    return None


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "bearer" or "basic"
    params: dict[str, str]


_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))', re.ASCII)


def parse_challenge(header: str | None) -> Challenge | None:
    """Parse a ``WWW-Authenticate`` header (the first challenge in it)."""
    if not header:
        return None
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
              for m in _PARAM.finditer(rest)}
    return Challenge(scheme.lower(), params)


class TokenCache:
    """Bearer tokens per (realm, service, scope), thread-safe, refreshed before expiry."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[tuple[str, str, str], tuple[str, float]] = {}
        self._by_origin_scope: dict[tuple[str, str], tuple[str, str, str]] = {}

    def get(self, key: tuple[str, str, str]) -> str | None:
        with self._lock:
            hit = self._tokens.get(key)
        if hit is None or hit[1] - 10 < time.monotonic():
            return None
        return hit[0]

    def put(self, key: tuple[str, str, str], token: str, expires_in: float, origin: str) -> None:
        with self._lock:
            self._tokens[key] = (token, time.monotonic() + max(30.0, expires_in))
            self._by_origin_scope[(origin, key[2])] = key

    def for_origin(self, origin: str, scope: str) -> str | None:
        """A still-valid token obtained earlier for this origin and scope."""
        with self._lock:
            key = self._by_origin_scope.get((origin, scope))
        return self.get(key) if key else None
