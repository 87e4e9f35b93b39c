"""Registry credentials and tokens (spec/pull.md, "Authentication").

* Credentials for a host come from ``~/.docker/config.json`` (``$DOCKER_CONFIG``)
  ``auths`` (``auth`` = base64 ``user:password``, or ``username``/``password``), and for
  ``hf.co``/``huggingface.co`` and the host of ``$HF_ENDPOINT`` (a mirror) from
  ``HF_TOKEN`` (also ``HUGGING_FACE_HUB_TOKEN``, ``HUGGINGFACE_TOKEN``).
* A ``WWW-Authenticate: Bearer realm=…,service=…,scope=…`` challenge is answered by
  fetching a token from the realm (anonymously, or with Basic credentials when we have
  some); tokens are cached per (realm, service, scope) and refreshed before they expire.
* A ``Basic`` challenge is answered with the host's credentials; among several challenges
  (RFC 9110 11.6.1) ``Bearer`` is preferred.
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

__all__ = [
    "Challenge",
    "Credentials",
    "TokenCache",
    "credentials_for",
    "parse_challenge",
    "parse_challenges",
]

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
    scheme: str  # lower case: "bearer", "basic", …
    params: dict[str, str]  # auth-params, names in lower case (the first of a name wins)
    token68: str | None = None


# RFC 9110 11.6.1: challenge = auth-scheme [ 1*SP ( token68 / #auth-param ) ],
# auth-param = token BWS "=" BWS ( token / quoted-string ); a header holds a list of them
# (and httpx joins repeated headers with ", "), so a comma ends a parameter or a challenge.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*(?=[ \t]*(?:,|$))")
_PARAM_NAME = re.compile(r"([!#$%&'*+\-.^_`|~0-9A-Za-z]+)[ \t]*=[ \t]*")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_BARE = re.compile(r'[^\s,"]+')  # a token; lenient: unquoted URLs (``realm=https://…``)
_SKIP = re.compile(r"[\s,]*")
_UNQUOTE = re.compile(r"\\(.)")


def parse_challenges(header: str | None) -> list[Challenge]:
    """Every challenge of a ``WWW-Authenticate`` value, in order (RFC 9110 11.6.1).
    Lenient where servers are: a parameter value may be an unquoted URL; text that fits
    no rule is skipped up to the next comma."""
    out: list[tuple[str, dict[str, str], str | None]] = []
    text = header or ""
    i = _SKIP.match(text, 0).end()  # type: ignore[union-attr]
    while i < len(text):
        param = _PARAM_NAME.match(text, i)
        if param is not None and out:  # a parameter of the current challenge
            j = param.end()
            quoted = _QUOTED.match(text, j)
            if quoted is not None:
                value, j = _UNQUOTE.sub(r"\1", quoted.group(1)), quoted.end()
            else:
                bare = _BARE.match(text, j)
                value, j = (bare.group(0), bare.end()) if bare else ("", j)
            out[-1][1].setdefault(param.group(1).lower(), value)
            i = j
        elif (scheme := _TOKEN.match(text, i)) is not None and param is None:
            j = scheme.end()
            params: dict[str, str] = {}
            token68 = None
            if j < len(text) and text[j] in " \t":
                k = j
                while k < len(text) and text[k] in " \t":
                    k += 1
                # ``name=value`` starts the parameters; else a token68 (``abc==``) may stand
                t68 = _TOKEN68.match(text, k)
                if t68 is not None:
                    token68, j = t68.group(0), t68.end()
                else:
                    j = k
            out.append((scheme.group(0).lower(), params, token68))
            i = j
        else:  # not a challenge: skip to the next comma
            comma = text.find(",", i)
            i = len(text) if comma < 0 else comma
        i = _SKIP.match(text, i).end()  # type: ignore[union-attr]
    return [Challenge(s, p, t) for s, p, t in out]


def parse_challenge(header: str | None) -> Challenge | None:
    """The challenge to answer among those of a ``WWW-Authenticate`` value: Bearer (with
    a realm) when offered, else Basic, else the first; None when there is none."""
    found = parse_challenges(header)
    for c in found:
        if c.scheme == "bearer" and "realm" in c.params:
            return c
    for c in found:
        if c.scheme == "basic":
            return c
    return found[0] if found else None


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
