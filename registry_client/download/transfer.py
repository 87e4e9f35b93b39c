"""Bytes of one range over HTTP/1.1, straight into a caller's buffer (spec/pull.md,
"Data path").

The bulk of a pull is range bodies. httpx hands each 64 KiB of a body over as a new
``bytes`` object after several layers of Python; at 300+ MB/s on a 2-core machine that is
a large share of the CPU. :class:`RangeReader` speaks just enough HTTP/1.1 for a ranged
``GET`` on a kept-alive socket and reads the body with ``recv_into`` into the worker's
batch buffer (reused: no allocation, no page faults) that is then written to disk.

It is used only where it cannot change behaviour: for a URL an httpx request of the same
blob already reached (after redirects and auth), with the ``Authorization`` that request
carried, and never through a proxy. Anything but a clean ``206``/``200`` with a
``Content-Length`` (a redirect, 401, an error status, chunked or compressed bodies) is
returned as a :class:`RawResponse` the engine treats as "ask httpx instead", except
transient statuses, which it retries like any other failure. Response heads are read as
h11 (httpx's parser) reads them: lines may end with a bare LF, the head ends at the first
blank line, folded header lines are joined. A head h11 would refuse or that this reader
cannot make out raises :class:`UnreadableHead`: the engine then asks httpx, which
decides.
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import httpx

from registry_client.client import USER_AGENT
from registry_client.transport import proxy_for

__all__ = ["RangeReader", "RawResponse", "UnreadableHead", "proxied", "shutdown"]

_MAX_HEAD = 64 * 1024
# as h11 (httpx's HTTP/1.1 parser) reads a response head (h11/_receivebuffer.py,
# h11/_readers.py, h11/_abnf.py): it ends at the first blank line, whether its lines end
# with CRLF or a bare LF; a line that starts with a space or tab continues the last one
_BLANK_LINE = re.compile(rb"\n\r?\n")
_STATUS_LINE = re.compile(rb"HTTP/(?P<version>[0-9]\.[0-9]) (?P<status>[0-9]{3})"
                          rb"(?: (?:[ \t]|[^\x00\s])*)?")
_FIELD = re.compile(rb"(?P<name>[-!#$%&'*+.^_`|~0-9a-zA-Z]+):[ \t]*"
                    rb"(?P<value>(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?)[ \t]*")
_FOLD = re.compile(rb"[ \t]+")


class UnreadableHead(ConnectionError):
    """A response head this reader cannot take (h11 would refuse it, or it is larger
    than ``_MAX_HEAD``): the range is to be asked of httpx instead, not retried here."""


def parse_head(block: bytes) -> tuple[int, str, dict[str, str]]:
    """Status, HTTP version and headers (names lower-cased, repeated ones joined with
    ", ") of a response head up to and without its blank line; UnreadableHead for what
    h11 would refuse."""
    lines = [line[:-1] if line.endswith(b"\r") else line for line in block.split(b"\n")]
    status = _STATUS_LINE.fullmatch(lines[0]) if lines else None
    if status is None:
        raise UnreadableHead(f"not an HTTP/1.x response: {lines[0][:80]!r}")
    folded: list[bytes] = []
    for line in lines[1:]:
        fold = _FOLD.match(line)
        if fold is None:
            folded.append(line)
        elif folded:
            folded[-1] += b" " + line[fold.end():]
        else:
            raise UnreadableHead("a continuation line at the start of the headers")
    headers: dict[str, str] = {}
    for line in folded:
        field = _FIELD.fullmatch(line)
        if field is None:
            raise UnreadableHead(f"illegal header line: {line[:80]!r}")
        name = field["name"].decode("ascii").lower()
        value = field["value"].decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return int(status["status"]), status["version"].decode("ascii"), headers
_T = TypeVar("_T")
# a plain socket's kernel receive timeout: a read returns what arrived at least this
# often (so a slow connection's progress shows), never later than a quarter of the stall
# timeout (so a stall is found within 1.25 stall timeouts)
_TICK = 0.25


def _late_head(limit: float) -> str:
    return f"response head not complete within {limit:g} s"


def _timeval(seconds: float) -> bytes:
    """``struct timeval`` for ``SO_RCVTIMEO`` / ``SO_SNDTIMEO`` (0 would mean "never")."""
    whole = int(seconds)
    micro = round((seconds - whole) * 1e6)
    return struct.pack("@ll", whole, micro or (0 if whole else 1))


def shutdown(sock: socket.socket) -> None:
    """Shut ``sock`` down both ways, from any thread: a reader blocked on it wakes at once
    (it sees what had arrived, then the end). The base class's method, also for a TLS
    socket, whose own would drop its TLS state under a reader's feet."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def proxied(url: httpx.URL) -> bool:
    """True if the environment sends requests for ``url`` through a proxy."""
    return proxy_for(url) is not None


class RawResponse:
    """A response head; the body is read with :meth:`readinto`."""

    def __init__(self, reader: RangeReader, key: tuple[str, str, int], sock: socket.socket,
                 status: int, headers: dict[str, str], early: bytearray) -> None:
        self._reader = reader
        self._key = key
        self._sock: socket.socket | None = sock
        self.status = status
        self.headers = headers
        self._early = early
        length = headers.get("content-length", "")
        self.length = int(length) if length.isdigit() else -1
        self.remaining = self.length
        self._reusable = headers.get("connection", "").lower() != "close" and self.length >= 0
        # a plain TCP socket is blocking (its stall timeout is the kernel's): one recv
        # fills the whole view (MSG_WAITALL); a TLS socket keeps Python's timeout, no flags
        self._flags = socket.MSG_WAITALL if sock.gettimeout() is None else 0

    @property
    def plain(self) -> bool:
        """A body this reader can stream: a length, no transfer or content coding."""
        return (self.length >= 0 and "transfer-encoding" not in self.headers
                and self.headers.get("content-encoding", "identity") in ("", "identity"))

    def readinto(self, view: memoryview) -> int:
        """Read body bytes into ``view``; 0 at the end of the body. Over plain TCP one call
        waits until ``view`` (or the body) is full, or the kernel's receive timeout passed
        with some bytes (0.25 s at most), or the stall timeout with none, or the peer
        closed or reset (then it returns what arrived before). Raises
        OSError (a reset; ``BlockingIOError`` or ``socket.timeout`` when no byte came
        within the stall timeout) and ConnectionError when the peer closes before the
        body is complete."""
        if self.remaining <= 0 or not len(view):
            return 0
        want = min(len(view), self.remaining)
        if self._early:
            n = min(want, len(self._early))
            view[:n] = self._early[:n]
            del self._early[:n]
        else:
            sock = self._sock
            assert sock is not None, "response is closed"
            n = self._reader._recv(lambda: sock.recv_into(view, want, self._flags))
            if n == 0:
                raise ConnectionError(f"connection closed with {self.remaining} bytes of "
                                      "the body outstanding")
        self.remaining -= n
        return n

    def abort(self) -> bool:
        """Break the connection off, from another thread: a reader blocked in
        :meth:`readinto` returns what had arrived, the next read fails, and
        :meth:`close` drops the connection. False if the response was closed already."""
        sock = self._sock
        if sock is None:
            return False
        shutdown(sock)
        return True

    def close(self) -> None:
        """Give the connection back for reuse if the body was read whole, else drop it."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self._reader._done(sock)
        if self.remaining == 0 and self._reusable and not self._early:
            self._reader._put(self._key, sock)
        else:
            with contextlib.suppress(OSError):
                sock.close()

    def __enter__(self) -> RawResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RangeReader:
    """A pool of kept-alive HTTP/1.1 connections for ranged GETs. Thread-safe."""

    def __init__(self, *, insecure: bool, connect_timeout: float, stall_timeout: float,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.connect_timeout = connect_timeout
        self.stall_timeout = stall_timeout
        self._ssl = ssl_context or httpx.create_ssl_context(verify=not insecure)
        self._idle: dict[tuple[str, str, int], list[socket.socket]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._busy: set[socket.socket] = set()  # sockets a response is reading from

    def abort(self) -> None:
        """Wake every reader blocked on a socket (they see a reset) and close the pool."""
        with self._lock:
            busy = list(self._busy)
        for s in busy:
            shutdown(s)
        self.close()

    def _done(self, sock: socket.socket) -> None:
        with self._lock:
            self._busy.discard(sock)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        for socks in idle.values():
            for s in socks:
                with contextlib.suppress(OSError):
                    s.close()

    def _put(self, key: tuple[str, str, int], sock: socket.socket) -> None:
        with self._lock:
            if not self._closed:
                self._idle.setdefault(key, []).append(sock)
                return
        with contextlib.suppress(OSError):
            sock.close()

    def _recv(self, call: Callable[[], _T], deadline: float | None = None) -> _T:
        """Run one receive ``call`` on a socket of this pool; raise ``TimeoutError`` only
        when no byte came for the stall timeout, or ``deadline`` (monotonic) passed. A
        plain socket's kernel timeout is 0.25 s or a quarter of it, whichever is less (one
        call that got some bytes returns them when it passes), so a stall is found within
        1.25 stall timeouts after the last byte."""
        since = time.monotonic()
        while True:
            try:
                return call()
            except BlockingIOError:  # SO_RCVTIMEO passed without a byte
                now = time.monotonic()
                if now - since >= self.stall_timeout:
                    raise TimeoutError(f"no data for {self.stall_timeout:g} s") from None
                if deadline is not None and now >= deadline:
                    raise TimeoutError(_late_head(self.stall_timeout)) from None

    def _connect(self, key: tuple[str, str, int]) -> socket.socket:
        scheme, host, port = key
        sock = socket.create_connection((host, port), timeout=self.connect_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if scheme == "https":
            sock = self._ssl.wrap_socket(sock, server_hostname=host)
            sock.settimeout(self.stall_timeout)
            return sock
        # Blocking, with the stall timeout kept by the kernel (SO_RCVTIMEO/SO_SNDTIMEO):
        # Python's own timeout costs a poll() and a second GIL hand-off per recv. A read
        # blocked here still wakes at once on abort() (shutdown) and on a reset.
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                        _timeval(min(_TICK, self.stall_timeout / 4)))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(self.stall_timeout))
        return sock

    def get(self, url: httpx.URL, start: int, end: int, auth: str | None) -> RawResponse:
        """Send ``GET url`` for bytes ``[start, end)`` and read the response head."""
        port = url.port or (443 if url.scheme == "https" else 80)
        key = (url.scheme, url.host, port)
        target = url.raw_path.decode("ascii")
        host = url.netloc.decode("ascii")
        head = (f"GET {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {USER_AGENT}\r\n"
                f"Accept-Encoding: identity\r\nRange: bytes={start}-{end - 1}\r\n")
        if auth:
            head += f"Authorization: {auth}\r\n"
        request = (head + "\r\n").encode("latin-1")
        for fresh in (False, True):
            sock = None
            if not fresh:
                with self._lock:
                    idle = self._idle.get(key)
                    sock = idle.pop() if idle else None
                if sock is None:
                    continue
            else:
                sock = self._connect(key)
            with self._lock:
                self._busy.add(sock)
            try:
                sock.sendall(request)
                return self._read_head(key, sock)
            except (OSError, ConnectionError) as exc:
                self._done(sock)
                with contextlib.suppress(OSError):
                    sock.close()
                if fresh or isinstance(exc, (TimeoutError, UnreadableHead)):
                    raise  # (a server too slow to answer is no closed kept-alive socket)
                # a kept-alive connection the server had closed: once more, fresh
        raise AssertionError("unreachable")  # pragma: no cover

    def _read_head(self, key: tuple[str, str, int], sock: socket.socket) -> RawResponse:
        """Receive the response head, whole within the stall timeout of the request
        having been sent (a head trickling in a byte at a time is no answer: spec/pull.md,
        "Stalls"); ``TimeoutError`` otherwise. ``UnreadableHead`` for a head h11 would
        refuse or one larger than ``_MAX_HEAD``."""
        deadline = time.monotonic() + self.stall_timeout
        tls = sock.gettimeout() is not None  # (a TLS socket keeps Python's timeout)
        buf = bytearray()
        try:
            while True:
                if buf[:1] == b"\n" or buf[:2] == b"\r\n":
                    raise UnreadableHead("no response line received")
                blank = _BLANK_LINE.search(buf)
                if blank is not None:
                    end, body = blank.start(), blank.end()
                    if end > _MAX_HEAD:  # (httpx takes up to 100 KiB: let it decide)
                        raise UnreadableHead("response head too large")
                    break
                if len(buf) > _MAX_HEAD:
                    raise UnreadableHead("response head too large")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(_late_head(self.stall_timeout))
                if tls:
                    sock.settimeout(min(self.stall_timeout, left))
                try:
                    data = self._recv(lambda: sock.recv(65536), deadline)
                except TimeoutError:
                    if time.monotonic() >= deadline:
                        raise TimeoutError(_late_head(self.stall_timeout)) from None
                    raise
                if not data:
                    raise ConnectionError("connection closed before the response head")
                buf += data
        finally:
            if tls:
                sock.settimeout(self.stall_timeout)
        status, version, headers = parse_head(bytes(buf[:end]))
        if version != "1.1" and "keep-alive" not in headers.get("connection", "").lower():
            headers["connection"] = "close"
        return RawResponse(self, key, sock, status, headers, buf[body:])
