"""The client's httpx transport: httpcore's connection pool, with a deadline on every
response head (spec/pull.md, "Stalls").

httpx bounds each read of a response with its read timeout, never the whole head: a
server that sends its head one byte at a time (``HTTP/1.1 200 OK\\r\\nX-Pad: a``, then a
byte every second) keeps every read short and the request waiting forever. Here the
head as a whole must be complete within the request's read timeout (the stall timeout),
counted from the moment the request was sent (httpcore's ``trace`` extension marks it);
each read of the head waits at most what is left of that, and a head not complete in
time fails with ``httpx.ReadTimeout``, a transient error the retry policy retries. Bodies
are untouched: their pace is the download engine's business (spec/pull.md, "Laggards").

Built from public parts only: an ``httpx.BaseTransport`` over an ``httpcore``
``ConnectionPool`` (or ``HTTPProxy``, for a forward proxy) whose network backend wraps
httpcore's own. ``RoutingTransport`` routes every URL by one rule (:func:`proxy_for`, also
the download engine's): direct, or through the environment's http(s) proxy, both with the
head deadline; only a ``socks5://`` proxy goes through httpx's own transport, whose reads
have the per-read timeout alone.
"""

from __future__ import annotations

import ssl
import threading
import time
import typing
import urllib.request
from collections.abc import Iterable, Iterator

import httpcore
import httpx

__all__ = ["HeadDeadlineTransport", "RoutingTransport", "proxy_for"]

# thread-local: the head deadline of the request this thread is receiving, if any (httpcore's
# sync pool does all of a request's I/O on the caller's thread)
_head = threading.local()

# httpcore's errors as httpx's, the most specific first (httpx maps them the same way)
_ERRORS: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.ProxyError, httpx.ProxyError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)


def _mapped(exc: Exception) -> httpx.TransportError | None:
    for theirs, ours in _ERRORS:
        if isinstance(exc, theirs):
            return ours(str(exc))
    return None


class _Stream(httpcore.NetworkStream):
    """httpcore's stream, whose reads keep the thread's head deadline."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        deadline: tuple[float, float] | None = getattr(_head, "deadline", None)
        if deadline is None:
            return self._inner.read(max_bytes, timeout)
        at, limit = deadline
        left = at - time.monotonic()
        if left <= 0:
            raise httpcore.ReadTimeout(f"response head not complete within {limit:g} s")
        try:
            return self._inner.read(max_bytes, left if timeout is None else min(timeout, left))
        except httpcore.ReadTimeout:
            if time.monotonic() >= at:
                raise httpcore.ReadTimeout(
                    f"response head not complete within {limit:g} s") from None
            raise

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _Stream(self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


class _Backend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Iterable[typing.Any] | None = None,
                    ) -> httpcore.NetworkStream:
        return _Stream(self._inner.connect_tcp(host, port, timeout, local_address,
                                               socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[typing.Any] | None = None,
                            ) -> httpcore.NetworkStream:  # pragma: no cover (not used)
        return _Stream(self._inner.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def _tracer(limit: float | None,
            then: typing.Callable[[str, dict[str, typing.Any]], None] | None,
            ) -> typing.Callable[[str, dict[str, typing.Any]], None]:
    """The ``trace`` callback that arms the head deadline when the request has been sent
    and disarms it when the head is in (or failed)."""

    def trace(event: str, info: dict[str, typing.Any]) -> None:
        if event == "http11.receive_response_headers.started" and limit is not None:
            _head.deadline = (time.monotonic() + limit, limit)
        elif event.startswith("http11.receive_response_headers."):
            _head.deadline = None
        if then is not None:
            then(event, info)

    return trace


class _Body(httpx.SyncByteStream):
    def __init__(self, inner: Iterable[bytes]) -> None:
        self._inner = inner

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._inner
        except Exception as exc:
            mapped = _mapped(exc)
            if mapped is None:
                raise
            raise mapped from exc

    def close(self) -> None:
        close = getattr(self._inner, "close", None)
        if close is not None:
            close()


class HeadDeadlineTransport(httpx.BaseTransport):
    """HTTP/1.1 over a pool of kept-alive connections; a response head must be complete
    within the request's read timeout after the request was sent (``httpx.ReadTimeout``
    otherwise). Thread-safe."""

    def __init__(self, *, ssl_context: ssl.SSLContext, limits: httpx.Limits,
                 proxy: str | None = None) -> None:
        """``proxy``: an ``http://`` or ``https://`` forward proxy (``CONNECT`` for https
        targets) every request goes through; its response heads keep the deadline too."""
        self._pool: httpcore.ConnectionPool
        common: dict[str, typing.Any] = dict(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_Backend(),
        )
        if proxy is None:
            self._pool = httpcore.ConnectionPool(**common)
        else:  # as httpx builds its own from the same URL (userinfo: proxy auth)
            p = httpx.Proxy(proxy)
            self._pool = httpcore.HTTPProxy(
                proxy_url=httpcore.URL(scheme=p.url.raw_scheme, host=p.url.raw_host,
                                       port=p.url.port, target=p.url.raw_path),
                proxy_auth=p.raw_auth, proxy_headers=p.headers.raw,
                proxy_ssl_context=p.ssl_context, **common)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)
        timeouts = request.extensions.get("timeout") or {}
        extensions = {**request.extensions,
                      "trace": _tracer(timeouts.get("read"), request.extensions.get("trace"))}
        req = httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=request.url.raw_scheme, host=request.url.raw_host,
                             port=request.url.port, target=request.url.raw_path),
            headers=request.headers.raw,
            content=request.stream,
            extensions=extensions,
        )
        try:
            resp = self._pool.handle_request(req)
        except Exception as exc:
            mapped = _mapped(exc)
            if mapped is None:
                raise
            raise mapped from exc
        finally:
            _head.deadline = None
        assert isinstance(resp.stream, Iterable)
        return httpx.Response(status_code=resp.status, headers=resp.headers,
                              stream=_Body(resp.stream), extensions=resp.extensions)

    def close(self) -> None:
        self._pool.close()


def proxy_for(url: httpx.URL) -> str | None:
    """The proxy the environment (``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY``, less
    ``NO_PROXY``) sends requests for ``url`` through, or None: the one rule for the
    client's requests and the download engine's range reader."""
    proxies = urllib.request.getproxies()
    if not proxies:
        return None
    # NO_PROXY names a host, or a host with its port (`reg.local:5000`): both are asked
    if urllib.request.proxy_bypass(f"{url.host}:{url.port}" if url.port else url.host):
        return None
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if proxy and "://" not in proxy:  # `proxy.corp:3128`, as httpx reads it: plain http
        proxy = f"http://{proxy}"
    return proxy


class RoutingTransport(httpx.BaseTransport):
    """Requests the environment proxies go to httpx's proxy transport for that proxy;
    the rest to :class:`HeadDeadlineTransport`. (Handing httpx a transport turns its own
    reading of the proxy variables off: this does that job, by :func:`proxy_for`.)
    Thread-safe."""

    def __init__(self, *, ssl_context: ssl.SSLContext, limits: httpx.Limits) -> None:
        self._ssl_context = ssl_context
        self._limits = limits
        self._direct = HeadDeadlineTransport(ssl_context=ssl_context, limits=limits)
        self._proxied: dict[str, httpx.BaseTransport] = {}
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        proxy = proxy_for(request.url)
        if proxy is None:
            return self._direct.handle_request(request)
        with self._lock:
            transport = self._proxied.get(proxy)
            if transport is None:
                transport = self._proxied[proxy] = (
                    HeadDeadlineTransport(ssl_context=self._ssl_context, limits=self._limits,
                                          proxy=proxy)
                    if proxy.lower().startswith(("http://", "https://")) else
                    # socks5://: httpx's own (httpcore's SOCKS pool, needs socksio)
                    httpx.HTTPTransport(verify=self._ssl_context, limits=self._limits,
                                        proxy=proxy))
        return transport.handle_request(request)

    def close(self) -> None:
        with self._lock:
            proxied, self._proxied = list(self._proxied.values()), {}
        self._direct.close()
        for transport in proxied:
            transport.close()
