"""``AuthPolicy``: the :class:`~registry_server.context.Policy` of ``serve --auth FILE``
(spec/serve.md, "Access control").

Credentials: ``Authorization: Bearer <API token or /token bearer token>`` or
``Authorization: Basic base64(any-user:<token>)``. Decisions:

* no credentials: the ``[anonymous]`` rights of the file; whatever they do not allow is
  401 with a ``Bearer`` challenge (credentials could change the answer);
* credentials that are not valid (unknown, removed, tampered, expired): 401;
* a /token bearer token that is valid but was not issued for this repository and action,
  while its API token would allow it: 401 with ``error="insufficient_scope"`` (the docker
  client fetches a token for the new scope and retries);
* a known caller whose rights do not cover the repository, or whose tier is below the
  model's: 403.

The file is re-checked at most every ``check_interval`` seconds (mtime, ctime, inode,
size) by the request that finds the interval passed; a changed file is parsed in full and
swapped in at once, unless it changed again while it was read (then the next check takes
it). A file that disappears, is empty, cannot be read or does not validate leaves the last
good policy in force and logs one warning (again only after it changed again). Writers
should replace the file atomically (``token add|rm`` do): a valid prefix of a file being
written in place is indistinguishable from a smaller file.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from blobstore.errors import InvalidInput
from registry_server.auth import authfile, signed
from registry_server.auth.authfile import AuthFile, Rights, TokenEntry
from registry_server.auth.patterns import canonical_repository, tier_rank
from registry_server.context import TIER_ANNOTATION, TIERS, Action, Decision

__all__ = ["SERVICE", "AuthPolicy", "Caller", "load_policy"]

log = logging.getLogger("blobctl.serve.auth")

SERVICE = "blobctl"
_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?")
_ACTION_SCOPE = {Action.READ: "pull", Action.PUSH: "push", Action.ADMIN: "push"}


@dataclass(frozen=True)
class Caller:
    """Who a request's credentials name. ``entry`` None is anonymous; ``bearer`` is the
    signed /token bearer token when that was the credential."""

    entry: TokenEntry | None
    bearer: signed.SignedToken | None = None

    @property
    def subject(self) -> str:
        return "anonymous" if self.entry is None else self.entry.name


class _State:
    """One parsed file, immutable once built; swapped whole on reload."""

    def __init__(self, doc: AuthFile, fallback_secret: bytes) -> None:
        self.doc = doc
        self.by_hash = {e.hash: e for e in doc.tokens.values()}
        self.by_fingerprint = {e.fingerprint: e for e in doc.tokens.values()}
        key = authfile.secret_bytes(doc.secret) if doc.secret else None
        if doc.secret and key is None:  # parse() refuses it; never an empty HMAC key
            raise authfile.AuthFileError("auth file: 'secret' is not base64url of 32 bytes")
        self.secret = key or fallback_secret
        self.anonymous_any = bool(doc.anonymous.read or doc.anonymous.push)


def _rights_allow(rights: Rights, repo: str | None, action: Action) -> bool:
    pats = rights.read + rights.push if action is Action.READ else rights.push
    if repo is None:
        return bool(pats) if action is not Action.READ else True
    return any(p.matches(repo) for p in pats)


class AuthPolicy:
    """Thread-safe; one instance per server, shared by every request."""

    def __init__(self, path: Path, *, check_interval: float = 0.5,
                 token_lifetime: int = 300) -> None:
        self.path = path
        self.check_interval = check_interval
        self.token_lifetime = token_lifetime
        self.fallback_origin = "http://127.0.0.1"
        self._fallback_secret = secrets.token_bytes(32)  # when the file has no secret
        self._lock = threading.Lock()
        self._signature = self._stat()
        self._state = _State(authfile.load_existing(path), self._fallback_secret)
        self._next_check = time.monotonic() + check_interval
        self._warned_for: object = None
        self.reloads = 0

    # ------------------------------------------------------------------ reload
    def _stat(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_size)

    def _current(self) -> _State:
        now = time.monotonic()
        if now < self._next_check or not self._lock.acquire(blocking=False):
            return self._state
        try:
            self._next_check = now + self.check_interval
            sig = self._stat()
            if sig != self._signature:
                self._reload(sig)
        finally:
            self._lock.release()
        return self._state

    def _reload(self, sig: tuple[int, int, int, int] | None) -> None:
        try:
            if sig is not None and sig[3] == 0:
                # an editor or shell that truncates before it writes: never "no tokens"
                raise authfile.AuthFileError(f"{self.path} is empty")
            state = _State(authfile.load(self.path), self._fallback_secret)
        except (OSError, InvalidInput) as exc:
            if self._warned_for != sig:
                self._warned_for = sig
                reason = (exc.message if isinstance(exc, InvalidInput)
                          else f"{exc.strerror or exc}")
                log.warning("auth file %s not reloaded, keeping the last good one: %s",
                            self.path, reason)
            return
        if self._stat() != sig:
            return  # written while we read it: take it at the next check, whole
        self._state = state
        self._signature = sig
        self._warned_for = None
        self.reloads += 1
        log.info("auth file %s reloaded: %d tokens", self.path, len(state.doc.tokens))

    def refresh(self) -> None:
        """Check the file now (tests, SIGHUP)."""
        with self._lock:
            sig = self._stat()
            if sig != self._signature:
                self._reload(sig)

    # ------------------------------------------------------------------ credentials
    def identify(self, headers: Mapping[str, str]) -> Caller | None:
        """The caller the ``Authorization`` header names; Caller(None) when there is no
        header; None when there are credentials and they are not valid."""
        return self._identify(self._current(), headers)

    def _identify(self, st: _State, headers: Mapping[str, str]) -> Caller | None:
        value = headers.get("authorization")
        if not value:
            return Caller(None)
        scheme, _, cred = value.strip().partition(" ")
        cred = cred.strip()
        scheme = scheme.lower()
        if scheme == "basic":
            try:
                userpass = base64.b64decode(cred, validate=True).decode("utf-8")
            except (binascii.Error, ValueError):
                return None
            _user, colon, cred = userpass.partition(":")
            if not colon:
                return None
        elif scheme != "bearer":
            return None
        return self._check_secret(st, cred)

    def _check_secret(self, st: _State, cred: str) -> Caller | None:
        if cred.startswith(signed.PREFIX):
            tok = signed.verify(st.secret, cred)
            if tok is None:
                return None
            if not tok.subject:
                return Caller(None, tok)
            entry = st.by_fingerprint.get(tok.fingerprint)
            if entry is None or entry.name != tok.subject:
                return None  # its API token was removed or replaced
            return Caller(entry, tok)
        if not cred.startswith(authfile.TOKEN_PREFIX) or len(cred) > 256:
            return None
        h = authfile.hash_token(cred)
        entry = st.by_hash.get(h)
        # The lookup is by sha256 of the presented token: its timing tells a caller at
        # most about the hash of its own guess, nothing about a stored token.
        if entry is None or not hmac.compare_digest(entry.hash, h):
            return None
        return Caller(entry)

    def rights_of(self, caller: Caller) -> Rights:
        return self._state.doc.anonymous if caller.entry is None else caller.entry.rights

    # ------------------------------------------------------------------ Policy
    def authorize(self, headers: Mapping[str, str], repository: str | None,
                  action: Action, tier: str | None) -> Decision:
        st = self._current()
        repo = canonical_repository(repository) if repository is not None else None
        caller = self._identify(st, headers)
        if caller is None:
            return Decision(401, "invalid", self._challenge(st, headers, repo, action),
                            "invalid credentials")
        anonymous = caller.entry is None
        rights = st.doc.anonymous if caller.entry is None else caller.entry.rights
        if repo is None and action is Action.READ and anonymous and caller.bearer is None:
            # /v2/, _catalog: docker clients learn here that they must authenticate (push
            # and admin with no repository ask whether the caller has the right on some
            # repository: the web page's sign-in and the actions' check before the form)
            return Decision(401, "anonymous", self._challenge(st, headers, None, action),
                            "credentials required")
        if not _rights_allow(rights, repo, action):
            if anonymous:
                return Decision(401, "anonymous", self._challenge(st, headers, repo, action),
                                "anonymous access not allowed")
            return Decision(403, caller.subject, reason=f"no {action.value} right on {repo}")
        if tier is not None and tier in TIERS and tier_rank(tier) > tier_rank(rights.tier):
            if anonymous:
                return Decision(401, "anonymous", self._challenge(st, headers, repo, action),
                                f"model tier {tier} above anonymous tier {rights.tier}")
            return Decision(403, caller.subject,
                            reason=f"model tier {tier} above token tier {rights.tier}")
        if caller.bearer is not None and repo is not None and not caller.bearer.allows(
                repo, _ACTION_SCOPE[action]):
            return Decision(401, caller.subject,
                            self._challenge(st, headers, repo, action, insufficient=True),
                            "bearer token not issued for this scope")
        return Decision(200, caller.subject)

    def visible(self, headers: Mapping[str, str], repository: str) -> bool:
        st = self._current()
        caller = self._identify(st, headers)
        if caller is None:
            return False
        rights = st.doc.anonymous if caller.entry is None else caller.entry.rights
        return _rights_allow(rights, canonical_repository(repository), Action.READ)

    def tier_of(self, repository: str, annotations: Mapping[str, str] | None) -> str:
        """The first ``[tiers]`` pattern matching the repository (else ``lite``) is a
        floor; the manifest's ``org.blobctl.tier`` annotation may raise it, never lower
        it (a pusher cannot make a professional repository's model lite)."""
        repo = canonical_repository(repository)
        floor = "lite"
        for pattern, tier in self._current().doc.tiers:
            if pattern.matches(repo):
                floor = tier
                break
        value = (annotations or {}).get(TIER_ANNOTATION)
        if isinstance(value, str) and value.strip().lower() in TIERS:
            ann = value.strip().lower()
            if tier_rank(ann) > tier_rank(floor):
                return ann
        return floor

    # ------------------------------------------------------------------ challenges
    def origin(self, headers: Mapping[str, str]) -> str:
        """``http://<Host>`` when the Host header is a plain host[:port] (nothing that
        could break out of the quoted challenge), else :attr:`fallback_origin`."""
        host = headers.get("host", "")
        return f"http://{host}" if _HOST.fullmatch(host) else self.fallback_origin

    def realm(self, headers: Mapping[str, str]) -> str:
        return self._current().doc.realm or self.origin(headers) + "/token"

    def _challenge(self, st: _State, headers: Mapping[str, str], repo: str | None,
                   action: Action, *, insufficient: bool = False) -> str:
        realm = st.doc.realm or self.origin(headers) + "/token"
        out = f'Bearer realm="{realm}",service="{SERVICE}"'
        if repo is not None:
            actions = "pull" if action is Action.READ else "pull,push"
            out += f',scope="repository:{repo}:{actions}"'
        if insufficient:
            out += ',error="insufficient_scope"'
        return out

    # ------------------------------------------------------------------ /token
    def issue(self, caller: Caller, scopes: Sequence[tuple[str, tuple[str, ...]]],
              now: float | None = None) -> tuple[str, signed.SignedToken]:
        """Sign a bearer token granting of ``scopes`` (canonical repository, actions) only
        what ``caller`` has now."""
        st = self._current()
        rights = st.doc.anonymous if caller.entry is None else caller.entry.rights
        grants: list[signed.Grant] = []
        for repo, actions in scopes:
            ok = tuple(a for a in ("pull", "push") if a in actions and _rights_allow(
                rights, repo, Action.READ if a == "pull" else Action.PUSH))
            if ok:
                grants.append(signed.Grant(repo, ok))
        t = int(time.time() if now is None else now)
        tok = signed.SignedToken(caller.entry.name if caller.entry else "",
                                 caller.entry.fingerprint if caller.entry else "",
                                 t, t + self.token_lifetime, tuple(grants))
        return signed.sign(st.secret, tok), tok

    def anonymous_allowed(self) -> bool:
        return self._current().anonymous_any


def load_policy(path: Path) -> AuthPolicy:
    """The policy of an access file. Raises AuthFileMissing (NotFound, exit 3) when there
    is no file, OSError when it cannot be read and AuthFileError (InvalidInput, exit 4)
    when it does not validate: a server must not start on a file it cannot use."""
    return AuthPolicy(path)
