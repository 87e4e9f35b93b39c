"""An OCI distribution (v2) client on httpx (spec/pull.md).

One ``RegistryClient`` shares one ``httpx.Client`` (a bounded connection pool) across
threads. It maps every foreign failure to ``registry_client.errors`` in one place.

* Redirects (301/302/303/307/308) are followed by hand, so that ``Authorization`` is sent
  only to the registry's own origin, never to a CDN it redirects to; ``Range`` is kept.
* Auth challenges (Bearer token endpoint, Basic) are answered once per request.
* Transient failures are retried under ``RetryPolicy`` (``Retry-After`` honoured).
* ``https`` by default; with ``insecure=True`` TLS is not verified and a registry that
  does not speak TLS is used over plain ``http`` (as ``ollama pull --insecure``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from blobstore.decoding import loads
from blobstore.digest import Digest
from blobstore.errors import DigestMismatch, InvalidInput
from blobstore.manifest import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    MAX_MANIFEST_SIZE,
    OCI_INDEX,
    OCI_MANIFEST,
)
from blobstore.name import ModelName
from registry_client.auth import (
    Challenge,
    Credentials,
    TokenCache,
    credentials_for,
    parse_challenge,
)
from registry_client.errors import (
    AuthError,
    ProtocolError,
    RangeNotSatisfiable,
    RateLimited,
    RegistryError,
    RemoteNotFound,
    TransferError,
)
from registry_client.retry import TRANSIENT_STATUSES, RetryPolicy, parse_retry_after
from registry_client.transport import RoutingTransport

__all__ = ["ACCEPT_MANIFESTS", "Body", "RegistryClient", "check_url", "safe_url"]

log = logging.getLogger("blobctl.registry")

ACCEPT_MANIFESTS = ", ".join((OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_MANIFEST_LIST))
REDIRECTS = frozenset({301, 302, 303, 307, 308})
# An upload body, made afresh for each send: bytes, or an iterator of blocks.
Body = Callable[[], "bytes | Iterable[bytes]"]
USER_AGENT = "blobctl/0.1"
# a body read whole (manifest, token, listing page) must come at least this fast on
# average once two stall timeouts have passed (RegistryClient._read_whole)
WHOLE_BODY_RATE = 16 * 1024
TOKEN_LIMIT = 1 << 20  # a token service's answer (a JWT of a few KB)


def _origin(url: httpx.URL) -> str:
    port = url.port or (443 if url.scheme == "https" else 80)
    return f"{url.scheme}://{url.host}:{port}"


def _safe(url: httpx.URL | str) -> str:
    """A URL fit for messages and logs: no userinfo, no query (signed CDN URLs). One that
    does not parse is cut the same way, by text, and shortened."""
    try:
        u = httpx.URL(str(url))
    except httpx.InvalidURL:
        return _shown(str(url))
    return str(u.copy_with(username=None, password=None, query=None))


_USERINFO = re.compile(r"^((?:[A-Za-z][A-Za-z0-9+.-]*:)?/*)[^/?#]*@")


def _shown(text: str) -> str:
    """``text`` (a URL that may not parse) for a message: no userinfo, query or fragment,
    at most 120 characters."""
    text = _USERINFO.sub(r"\1", text.partition("?")[0].partition("#")[0])
    return text if len(text) <= 120 else text[:120] + "…"

safe_url = _safe  # the same, for the other modules of this package (push)


def check_url(url: str) -> httpx.URL:
    """``url`` parsed, or InvalidInput (exit 4) naming what is wrong, before any request or
    write: an http(s) scheme, a host, a port (when given) of 1-65535; what httpx refuses
    (a bad port, an unclosed ``[``, over 64 KiB, …) is refused here too."""
    shown = _shown(url)
    try:
        url.encode("utf-8")
    except UnicodeEncodeError:  # bytes from the command line that are not UTF-8
        raise InvalidInput(f"invalid URL {shown!r}: it holds bytes that are not UTF-8",
                           hint="percent-encode them (e.g. %FF)") from None
    try:
        u = httpx.URL(url)
        port = u.port
    except httpx.InvalidURL as exc:
        raise InvalidInput(f"invalid URL {shown!r}: {exc}", hint="check the URL") from exc
    if u.scheme not in ("http", "https"):
        raise InvalidInput(f"not an http(s) URL: {shown!r}", hint="check the URL")
    if not u.host:
        raise InvalidInput(f"invalid URL {shown!r}: no host", hint="check the URL")
    if port is not None and not 1 <= port <= 65535:
        raise InvalidInput(f"invalid URL {shown!r}: port {port} is not 1-65535",
                           hint="check the URL")
    return u


def _redirect_target(url: httpx.URL, location: str) -> httpx.URL:
    """Where a redirect from ``url`` to ``location`` leads; ProtocolError (with ``url``)
    when ``location`` is not a valid http(s) URL: the server's answer will not change,
    so it is not retried."""
    shown = repr(location.partition("?")[0])  # no query (signed CDN URLs) in messages
    try:
        target = url.join(location)
    except httpx.InvalidURL as exc:
        raise ProtocolError(f"{_safe(url)} redirected to an invalid URL: {shown}",
                            url=_safe(url)) from exc
    if target.scheme not in ("http", "https"):
        raise ProtocolError(f"{_safe(url)} redirected to an unsupported URL scheme: {shown}",
                            url=_safe(url))
    return target


def _host_port(url: httpx.URL) -> str:
    return f"{url.host}:{url.port}" if url.port else url.host


def _refused_elsewhere(resp: httpx.Response, home: str, code: str = "") -> bool:
    """``resp`` is a 401/403 (or an OCI error ``code`` saying so) of a host that a
    redirect to another origin led to (where no credentials are sent: a CDN or object
    store refusing a presigned URL)."""
    return (resp.status_code in (401, 403) or code in ("UNAUTHORIZED", "DENIED")) and \
        _origin(resp.request.url) != home


def _check_redirect(resp: httpx.Response) -> None:
    """Response hook: a bad ``Location`` is ours to report, before httpx builds (and
    fails to build) the next request from it."""
    if resp.status_code in REDIRECTS and "location" in resp.headers:
        _redirect_target(resp.request.url, resp.headers["location"])


class _Transient(Exception):
    """A transient failure within one try of a request that is not the request's own
    transport error (the token service's): ``request`` retries it like one, and raises
    ``error`` when no try is left."""

    def __init__(self, error: RegistryError, reason: str,
                 retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.error = error
        self.reason = reason
        self.retry_after = retry_after


def _end_of_head(resp: httpx.Response) -> None:
    """See the end of the answer to a HEAD (it has no body: RFC 9110 9.3.2), so that
    closing it keeps the connection; never reads a body into memory. (h11 ends a HEAD's
    answer at its head: bytes a broken server sends after it stay on the connection,
    where the next response on it fails to parse, a transport error that is retried.)"""
    with contextlib.suppress(httpx.HTTPError):
        for _ in resp.iter_raw():
            resp.close()
            break


def _drain(resp: httpx.Response, limit: int = 64 * 1024) -> bytes:
    """Close a response we do not use (a redirect, a challenge, a busy status), reading a
    small or empty body to its end first: closing a response whose end was not seen
    drops its connection, and the next request would open (and TLS-handshake) another.
    Returns the body when it was read (else b"")."""
    try:
        length = resp.headers.get("content-length", "")
        if (resp.request.method == "HEAD" or resp.status_code in (204, 304)
                or (length.isdigit() and int(length) <= limit)):
            return resp.read()
    except httpx.HTTPError:
        pass
    finally:
        resp.close()
    return b""


def error_text(body: bytes) -> tuple[str, str]:
    """The code and the text of an OCI error body (``{"errors": [{code, message,
    detail}]}``), else ("", the body's first 200 characters). The CNCF registry answers
    a failed storage write with 500, ``UNKNOWN``/``unknown error`` and the cause in
    ``detail``: a string (``write …: no space left on device``) or its Go error as an
    object (``{"Op": "write", "Path": …, "Err": 28}``, 28 = ENOSPC): the text then ends
    with that cause."""
    try:
        doc: Any = loads(body)
        err = doc["errors"][0]
        code, message = str(err.get("code", "")), str(err.get("message", ""))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return "", body.decode("utf-8", "replace").strip()[:200]
    detail = err.get("detail")
    cause = ""
    if isinstance(detail, str):
        cause = detail
    elif isinstance(detail, dict):
        enclosed = detail.get("Enclosed")
        inner: dict[str, Any] = enclosed if isinstance(enclosed, dict) else detail
        errno_ = inner.get("Err")
        if isinstance(errno_, int) and not isinstance(errno_, bool) and 0 < errno_ < 4096:
            where = " ".join(x for x in (inner.get("Op"), inner.get("Path"))
                             if isinstance(x, str))
            cause = f"{where + ': ' if where else ''}{os.strerror(errno_).lower()}"
        elif isinstance(inner.get("Err"), str):
            cause = inner["Err"]
    text = "; ".join(x for x in (message, cause[:200]) if x)
    return code, text


class RegistryClient:
    """Talks to OCI registries. Thread-safe; close it (or use ``with``) when done."""

    def __init__(self, *, insecure: bool = False, max_connections: int = 32,
                 connect_timeout: float = 15.0, stall_timeout: float = 30.0,
                 retry: RetryPolicy | None = None) -> None:
        self.insecure = insecure
        self.stall_timeout = stall_timeout
        self.retry = retry or RetryPolicy()
        # one TLS context (loading the CA bundle costs ~50 ms of CPU), shared with the
        # range reader of the download engine
        self.ssl_context = httpx.create_ssl_context(verify=not insecure)
        limits = httpx.Limits(max_connections=max_connections + 8,
                              max_keepalive_connections=max_connections + 8)
        self._http = httpx.Client(
            verify=self.ssl_context,
            follow_redirects=False,
            trust_env=True,  # HTTP(S)_PROXY / NO_PROXY
            # the read timeout bounds each read and, by the transport, each response
            # head as a whole (spec/pull.md, "Stalls")
            timeout=httpx.Timeout(stall_timeout, connect=connect_timeout),
            limits=limits,
            # a deadline on every response head, direct or through the environment's
            # http(s) proxy (HTTP(S)_PROXY, ALL_PROXY, NO_PROXY: RoutingTransport)
            transport=RoutingTransport(ssl_context=self.ssl_context, limits=limits),
            headers={"User-Agent": USER_AGENT},
            event_hooks={"response": [_check_redirect]},
        )
        self._tokens = TokenCache()
        self._creds: dict[str, Credentials | None] = {}
        self._basic_origins: set[str] = set()
        self._schemes: dict[str, str] = {}
        self._reached: set[str] = set()  # origins that have answered at least once
        self._lock = threading.Lock()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ URLs
    def base_url(self, name: ModelName) -> str:
        """``scheme://host`` for a name (probing plain http only with ``insecure``).
        InvalidName (before any request) for a host no URL can hold
        (``ModelName.registry_address``)."""
        host = name.registry_address()
        if name.scheme:
            return f"{name.scheme}://{host}"
        if not self.insecure:
            return f"https://{host}"
        with self._lock:
            known = self._schemes.get(host)
        if known is None:
            known = "https"
            try:
                self._http.get(f"https://{host}/v2/", timeout=5.0).close()
            except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError,
                    httpx.ConnectTimeout, httpx.ReadTimeout):
                known = "http"
                log.info("%s does not speak TLS; using plain http (--insecure)", name.host)
            with self._lock:
                self._schemes[name.host] = known
        return f"{known}://{name.host}"

    def manifest_url(self, name: ModelName, reference: str) -> str:
        return f"{self.base_url(name)}/v2/{name.repository}/manifests/{reference}"

    def blob_url(self, name: ModelName, digest: Digest) -> str:
        return f"{self.base_url(name)}/v2/{name.repository}/blobs/{digest}"

    # ------------------------------------------------------------------ auth
    def _credentials(self, host: str) -> Credentials | None:
        with self._lock:
            if host not in self._creds:
                self._creds[host] = credentials_for(host)
            return self._creds[host]

    def _auth_header(self, origin: str, host: str, scope: str) -> str | None:
        token = self._tokens.for_origin(origin, scope)
        if token:
            return f"Bearer {token}"
        creds = self._credentials(host)
        if creds is None:
            return None
        if creds.bearer:
            return f"Bearer {creds.password}"
        if origin in self._basic_origins:
            return creds.basic_header()
        return None

    def _answer(self, challenge: Challenge, origin: str, host: str, scope: str,
                challenged: httpx.URL) -> bool:
        """Obtain what the challenge asks for; False if we have nothing to offer. A realm
        is resolved against the URL that was ``challenged`` (``realm="/token"``); one
        that is no http(s) URL is a ProtocolError at once (the server's answer will not
        change: not retried)."""
        creds = self._credentials(host)
        if challenge.scheme == "basic":
            if creds is None:
                return False
            with self._lock:
                self._basic_origins.add(origin)
            return True
        if challenge.scheme != "bearer" or "realm" not in challenge.params:
            return False
        realm = self._realm(challenge.params["realm"], challenged)
        service = challenge.params.get("service", "")
        want = challenge.params.get("scope") or scope
        params = {k: v for k, v in (("service", service), ("scope", want)) if v}
        headers = {}
        if creds is not None:
            headers["Authorization"] = creds.basic_header()
        body = b""
        try:  # the body as every body read whole: a size limit and a pace (_read_whole)
            with self._http.stream("GET", realm, params=params, headers=headers,
                                   follow_redirects=True) as resp:
                if resp.status_code == 200:
                    body = self._read_whole(
                        resp, TOKEN_LIMIT, f"the token service at {_safe(realm)} sent a "
                        f"body larger than {TOKEN_LIMIT} bytes", self.stall_timeout)
                else:  # (read off, so the connection is kept for the next try)
                    _drain(resp)
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:  # (a redirect of the
            raise ProtocolError(  # token service's): a bad URL is not transient
                f"cannot reach the token service at {_safe(realm)}: {type(exc).__name__}: "
                f"{exc}", url=_safe(realm)) from exc
        except httpx.TransportError as exc:  # (the head or the body): retried by request()
            why = f"{type(exc).__name__}: {exc}"
            raise _Transient(TransferError(f"cannot reach the token service at "
                                           f"{_safe(realm)}: {why}", url=_safe(realm)),
                             f"token service: {why}") from exc
        except httpx.HTTPError as exc:  # (too many redirects, a bad URL): not transient
            raise TransferError(f"cannot reach the token service at {_safe(realm)}: {exc}",
                                url=_safe(realm)) from exc
        if resp.status_code in (401, 403):
            raise AuthError(f"the token service refused access ({resp.status_code})",
                            url=_safe(realm), status=resp.status_code,
                            hint="check your credentials (~/.docker/config.json or HF_TOKEN)")
        if resp.status_code in TRANSIENT_STATUSES:
            status = resp.status_code
            retry_after = parse_retry_after(resp.headers.get("retry-after"))
            cls = RateLimited if status == 429 else RegistryError
            raise _Transient(cls(f"the token service at {_safe(realm)} answered {status}",
                                 url=_safe(realm), status=status, retry_after=retry_after,
                                 hint="the registry is busy or rate-limiting; try again later"),
                             f"token service: HTTP {status}", retry_after)
        if resp.status_code != 200:
            raise RegistryError(f"token service answered {resp.status_code}",
                                url=_safe(realm), status=resp.status_code)
        try:
            doc = loads(body)
            token = doc.get("token") or doc.get("access_token")
            expires = float(doc.get("expires_in") or 60)
        except (ValueError, AttributeError) as exc:
            raise ProtocolError("token service sent no token", url=_safe(realm)) from exc
        if not isinstance(token, str) or not token:
            raise ProtocolError("token service sent no token", url=_safe(realm))
        self._tokens.put((realm, service, want), token, expires, origin)
        if want != scope:
            self._tokens.put((realm, service, scope), token, expires, origin)
        return True

    @staticmethod
    def _realm(realm: str, challenged: httpx.URL) -> str:
        """The token service's URL: ``realm`` resolved against the ``challenged`` URL
        (RFC 3986 5.2; a relative realm, ``/token``, is the registry's own), or a
        ProtocolError naming it when it is no http(s) URL."""
        shown = repr(_shown(realm))
        try:
            url = challenged.join(realm)
        except httpx.InvalidURL as exc:
            raise ProtocolError(f"{_safe(challenged)}: the registry's token service "
                                f"{shown} is not a valid URL: {exc}",
                                url=_safe(challenged)) from exc
        if url.scheme not in ("http", "https") or not url.host:
            raise ProtocolError(f"{_safe(challenged)}: the registry's token service "
                                f"{shown} is not an http(s) URL", url=_safe(challenged))
        return str(url)

    # ------------------------------------------------------------------ requests
    def _send_once(self, method: str, url: str, scope: str, headers: dict[str, str],
                   body: Body | None = None) -> httpx.Response:
        """One logical request: redirects and one auth challenge; streaming response.

        ``body`` makes a fresh request body for every send (after a redirect or an auth
        challenge the body goes again)."""
        cur = httpx.URL(url)
        home = _origin(cur)
        host = cur.netloc.decode()
        challenged = False
        for _ in range(11):
            hdrs = dict(headers)
            if _origin(cur) == home:  # credentials never leave the registry's origin
                auth = self._auth_header(home, host, scope)
                if auth:
                    hdrs["Authorization"] = auth
            req = self._http.build_request(method, cur, headers=hdrs,
                                           content=body() if body is not None else None)
            resp = self._http.send(req, stream=True)
            if resp.status_code in REDIRECTS and "location" in resp.headers:
                nxt = _redirect_target(cur, resp.headers["location"])
                _drain(resp)
                if resp.status_code == 303 and method != "HEAD":
                    # See Other: fetch the answer with GET, no body; a HEAD stays a HEAD
                    # (RFC 9110 15.4.4, as httpx): as a GET it read whole blobs
                    method, body = "GET", None
                log.debug("redirect %d to %s", resp.status_code, _safe(nxt))
                cur = nxt
                continue
            if resp.status_code == 401 and not challenged and _origin(cur) == home:
                challenge = parse_challenge(resp.headers.get("www-authenticate"))
                _drain(resp)
                challenged = True
                if challenge is not None and self._answer(challenge, home, host, scope,
                                                          cur):
                    continue
                raise AuthError(
                    f"{_safe(cur)}: authentication required", url=_safe(cur), status=401,
                    hint="set credentials in ~/.docker/config.json (or HF_TOKEN for hf.co)")
            return resp
        raise ProtocolError(f"too many redirects from {_safe(url)}", url=_safe(url))

    def request(self, method: str, url: str, *, scope: str, what: str,
                headers: dict[str, str] | None = None,
                attempts: int | None = None, body: Body | None = None) -> httpx.Response:
        """A request with retries (``attempts`` tries, default the policy's); returns a
        streaming 2xx response (caller closes it).

        ``body`` (uploads): a function returning the request body, called for every try."""
        return self._request(method, url, scope=scope, what=what, headers=headers,
                             attempts=attempts, body=body, limit=None)[0]

    def fetch(self, method: str, url: str, *, scope: str, what: str, limit: int,
              headers: dict[str, str] | None = None, attempts: int | None = None,
              too_large: str | None = None) -> tuple[httpx.Response, bytes]:
        """A request whose body is read whole (at most ``limit`` bytes) within each try:
        a body cut short, reset or stalled is retried like a failed request (spec/pull.md,
        "Retries"). Returns the closed 2xx response and its body. A body over ``limit`` is
        a ``ProtocolError`` (``too_large`` its message), not retried."""
        resp, raw = self._request(method, url, scope=scope, what=what, headers=headers,
                                  attempts=attempts, body=None, limit=limit,
                                  too_large=too_large)
        assert raw is not None
        return resp, raw

    @staticmethod
    def _read_whole(resp: httpx.Response, limit: int, message: str,
                    stall_timeout: float) -> bytes:
        """The body of ``resp``, read to its end (raises httpx's transport errors).

        Each read has the stall timeout; the body as a whole must also keep pace: after
        two stall timeouts it must have come at ``WHOLE_BODY_RATE`` on average, else
        ``httpx.ReadTimeout`` (a transient error, retried). Found from outside: a manifest
        sent a byte every 0.6 s kept every read short and a pull at it for minutes (a
        4 MiB one would take weeks)."""
        t0 = time.monotonic()
        try:
            chunks: list[bytes] = []
            size = 0
            for block in resp.iter_bytes():
                size += len(block)
                if size > limit:
                    raise ProtocolError(message, url=_safe(resp.request.url))
                chunks.append(block)
                took = time.monotonic() - t0
                if took > 2 * stall_timeout + size / WHOLE_BODY_RATE:
                    raise httpx.ReadTimeout(
                        f"body too slow: {size} bytes in {took:.1f} s", request=resp.request)
        finally:
            resp.close()
        return b"".join(chunks)

    def _request(self, method: str, url: str, *, scope: str, what: str,
                 headers: dict[str, str] | None, attempts: int | None, body: Body | None,
                 limit: int | None, too_large: str | None = None,
                 ) -> tuple[httpx.Response, bytes | None]:
        """``request``, and with ``limit`` the body read whole within each try."""
        hdrs = {"Accept-Encoding": "identity", **(headers or {})}
        home = _origin(httpx.URL(url))
        tries = attempts or self.retry.attempts
        for attempt in range(1, tries + 1):
            last = attempt == tries
            try:
                resp = self._send_once(method, url, scope, hdrs, body)
                if method == "GET" and _refused_elsewhere(resp, home):
                    # a presigned URL that expired on its way (or a clock skew): the
                    # registry's next redirect is a fresh one; asked once, in this try
                    # (a GET only, as spec/pull.md says: sent again, a POST or PATCH
                    # could open or feed a second upload; found by review)
                    log.warning("%s: %s (where the registry redirected to) refused it "
                                "(%d); asking the registry for a fresh redirect", what,
                                _safe(resp.request.url), resp.status_code)
                    _drain(resp)
                    resp = self._send_once(method, url, scope, hdrs, body)
            except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:  # never transient
                raise ProtocolError(f"{what}: {type(exc).__name__}: {exc}",
                                    url=url.partition("?")[0]) from exc
            except httpx.ConnectError as exc:
                with self._lock:
                    never_reached = home not in self._reached
                allowed = (min(self.retry.unreachable_attempts, tries)
                           if never_reached else tries)
                if never_reached and attempt >= allowed:
                    u = httpx.URL(url)
                    where = f"{u.host}:{u.port}" if u.port else u.host
                    plain = u.scheme == "https" and "WRONG_VERSION_NUMBER" in str(exc)
                    raise TransferError(
                        f"cannot reach {where}: {type(exc).__name__}: {exc}",
                        url=_safe(url),
                        hint="the registry seems to speak plain HTTP: pass --insecure "
                             "(only for a registry you trust)" if plain else
                             "check the registry name and your network (DNS, proxy, "
                             "firewall); --retries N keeps trying longer") from exc
                if last:
                    raise TransferError(f"{what}: {type(exc).__name__}: {exc}",
                                        url=_safe(url)) from exc
                self.retry.wait(attempt, f"{type(exc).__name__}: {exc}", what=what,
                                attempts=allowed)
                continue
            except httpx.TransportError as exc:
                if last:
                    raise TransferError(f"{what}: {type(exc).__name__}: {exc}",
                                        url=_safe(url)) from exc
                self.retry.wait(attempt, f"{type(exc).__name__}: {exc}", what=what)
                continue
            except _Transient as exc:  # the token service's
                if last:
                    raise exc.error from exc.__cause__
                self.retry.wait(attempt, exc.reason, what=what, retry_after=exc.retry_after)
                continue
            with self._lock:
                self._reached.add(home)
            if resp.status_code in TRANSIENT_STATUSES:
                retry_after = parse_retry_after(resp.headers.get("retry-after"))
                status = resp.status_code
                answer = _drain(resp)
                if last:
                    cls = RateLimited if status == 429 else RegistryError
                    _, said = error_text(answer) if status != 429 else ("", "")
                    # a registry that says what went wrong (a full disk, say) is not busy
                    hint = (f"the registry reported an error ({said}); see to the "
                            "registry (its storage, its log), then try again" if said
                            else "the registry is busy or rate-limiting; try again later")
                    raise cls(f"{what}: registry answered {status} after "
                              f"{tries} tries{': ' + said if said else ''}", url=_safe(url),
                              status=status, hint=hint, retry_after=retry_after)
                self.retry.wait(attempt, f"HTTP {status}", what=what, retry_after=retry_after)
                continue
            if resp.status_code >= 400:
                self._raise_for(resp, what, home)
            if method == "HEAD":  # no body: see the message end, so the caller's close
                _end_of_head(resp)  # keeps the connection
            if limit is None:
                return resp, None
            try:
                return resp, self._read_whole(
                    resp, limit, too_large or f"{what}: the body is larger than {limit} bytes",
                    self.stall_timeout)
            except httpx.TransportError as exc:  # cut short, reset, stalled: another try
                reason = f"body: {type(exc).__name__}: {exc}"
                if last:
                    raise TransferError(f"{what}: {reason}", url=_safe(url)) from exc
                self.retry.wait(attempt, reason, what=what)
        raise AssertionError("unreachable")  # pragma: no cover

    def _raise_for(self, resp: httpx.Response, what: str, home: str) -> None:
        """Raise the error for a 4xx/5xx ``resp`` to a request sent to origin ``home``."""
        status = resp.status_code
        url = _safe(resp.request.url)
        got = bytearray()
        # at most 64 KiB of it (found by a fix helper: an error body was read whole), and
        # within the time a whole body of that size gets (found by review: a trickle of a
        # byte every 0.5 s held the client for hours): what came by then is the message
        deadline = time.monotonic() + 2 * self.stall_timeout + 65536 / WHOLE_BODY_RATE
        try:
            for chunk in resp.iter_bytes():
                got += chunk
                if len(got) >= 65536 or time.monotonic() > deadline:
                    break
        except httpx.HTTPError:
            pass
        finally:
            resp.close()
        body = bytes(got[:65536])
        code, message = error_text(body)
        detail = f": {message}" if message else ""
        if status == 404 or code in ("MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN"):
            raise RemoteNotFound(what, url=url, status=status)
        if _refused_elsewhere(resp, home, code):
            # no credentials go there (spec/pull.md, "Redirects and authentication"):
            # a storage error, not an authentication failure
            where = _host_port(resp.request.url)
            raise RegistryError(
                f"{what}: the storage the registry redirected to ({where}) refused it "
                f"({status}{detail})", url=url, status=status,
                hint="the registry's storage (a CDN or object store) refused the address "
                     "the registry gave; try again later, or tell the registry's operator")
        if status in (401, 403) or code in ("UNAUTHORIZED", "DENIED"):
            raise AuthError(f"{what}: access denied ({status}{detail})", url=url, status=status,
                            hint="check your credentials (~/.docker/config.json or HF_TOKEN)")
        if code == "TOOMANYREQUESTS":
            raise RateLimited(f"{what}: rate limited{detail}", url=url, status=status)
        if status == 416:
            raise RangeNotSatisfiable(f"{what}: registry answered 416{detail}", url=url,
                                      content_range=resp.headers.get("content-range", ""))
        raise RegistryError(f"{what}: registry answered {status}{detail}", url=url,
                            status=status)

    # ------------------------------------------------------------------ operations
    @staticmethod
    def scope(name: ModelName) -> str:
        return f"repository:{name.repository}:pull"

    def get_manifest(self, name: ModelName, reference: str) -> tuple[bytes, str]:
        """Raw manifest (or index) bytes and their media type."""
        url = self.manifest_url(name, reference)
        resp, raw = self.fetch("GET", url, scope=self.scope(name), what=f"manifest {name}",
                               headers={"Accept": ACCEPT_MANIFESTS}, limit=MAX_MANIFEST_SIZE,
                               too_large=f"manifest of {name} is larger than "
                                         f"{MAX_MANIFEST_SIZE} bytes")
        media_type = resp.headers.get("content-type", "").split(";")[0].strip()
        header = resp.headers.get("docker-content-digest")
        if header:
            try:
                claimed = Digest.parse(header.strip())
            except ValueError:
                claimed = None
            if claimed is not None and claimed != Digest.of_bytes(raw, claimed.algorithm):
                raise DigestMismatch(str(claimed), str(Digest.of_bytes(raw, claimed.algorithm)),
                                     source=_safe(url))
        return raw, media_type

    def head_blob(self, name: ModelName, digest: Digest) -> int | None:
        """The blob's size as the registry reports it, or None if HEAD tells nothing.

        HEAD is only a cross-check: a registry or CDN that refuses it (405, 404, 5xx) is
        not an error here; the GET that follows reports a blob that is really missing.
        Raises ``AuthError`` only for a 401/403 of the registry's own origin: a host that
        a redirect to another origin led to (a presigned CDN URL signs the method, so S3
        and R2 refuse HEAD on a URL made for GET) tells nothing about our credentials
        (``_raise_for``: a RegistryError).
        """
        try:
            resp = self.request("HEAD", self.blob_url(name, digest), scope=self.scope(name),
                                what=f"blob {digest.short}")
        except AuthError:
            raise
        except RegistryError as exc:
            log.debug("HEAD of blob %s: %s: no cross-check", digest.short, exc)
            return None
        resp.close()
        length = resp.headers.get("content-length")
        return int(length) if length and length.isdigit() else None

    @contextmanager
    def open_blob(self, name: ModelName, digest: Digest, start: int | None = None,
                  end: int | None = None, *, url: str | None = None,
                  attempts: int | None = None) -> Iterator[httpx.Response]:
        """Stream a blob, or bytes [start, end) of it (status 200 or 206: caller checks).

        ``url`` fetches the blob from another address than the registry's blob URL (a
        plain file; credentials follow the same origin rule); ``attempts`` overrides the
        retry policy's tries (the download engine retries ranges itself: 1).
        """
        headers = {}
        if start is not None and end is not None:
            headers["Range"] = f"bytes={start}-{end - 1}"
        resp = self.request("GET", url or self.blob_url(name, digest), scope=self.scope(name),
                            what=f"blob {digest.short}", headers=headers, attempts=attempts)
        try:
            yield resp
        finally:
            resp.close()
