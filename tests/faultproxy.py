"""A fault-injecting HTTP/1.1 TCP proxy for pull tests.

``FaultProxy`` listens on its own port on 127.0.0.1 and forwards to one upstream (the real
``docker-registry`` from ``tests/servers.py``), connection for connection, with keep-alive:
each client connection gets its own upstream connection, and every request on it is parsed
(request line + headers), forwarded, and its response head parsed so that exactly the body
(``Content-Length`` bytes, a chunked body, or up to EOF) is relayed before the next request.

Faults strike **blob GET bodies** (paths containing ``/blobs/sha256:``), one ``Fault``
each, chosen per request by its selector (first k matching requests, every n-th, or
always); the schedule is swapped with ``set_faults`` without restarting anything:

=================  ============================================================
``rst``            at the body offset: ``SO_LINGER`` 0, close (the client sees RST)
``fin``            at the body offset: clean close (the client sees EOF mid-body)
``stall_continue`` at the body offset: pause ``seconds``, then go on
``stall_close``    at the body offset: pause ``seconds``, then close cleanly
``corrupt``        flip the byte at the body offset
``wrong_range``    rewrite the ``Content-Range`` start (and end) of a 206 by ``shift``
``status5xx``      answer ``status`` (500/502/503) with ``Retry-After`` itself; the
                   registry never sees the request
``trickle``        at the body offset: go on at ``rate`` bytes/s (a slow CDN edge: bytes
                   keep coming, so no stall timeout fires)
``short``          a 206 covers only the body up to the offset (at least ``SHORT_MIN``
                   bytes), its ``Content-Range`` and ``Content-Length`` saying so: legal
                   (RFC 9110 allows a server to send less than asked), so no fault for
                   the client; the proxy drops the upstream connection (rest unread)
=================  ============================================================

An optional per-connection rate limit (bytes/s over each response body) makes a pull last
long enough to be killed. The proxy counts, per request (``Exchange.sent``) and in total,
the body bytes it handed to the client's socket, records each request (method, path,
Range, status, the fault actually applied), and can call a function once when the blob
bytes sent cross a threshold (``on_blob_bytes``), from the relaying thread, before the next
block goes out (the kill tests use it to SIGKILL a pull at a precise byte).

``stop()`` (or leaving the ``with`` block) closes the listener and every socket.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BLOB_PATH", "KINDS", "Exchange", "Fault", "FaultProxy"]

BLOB_PATH = "/blobs/sha256:"
KINDS = ("rst", "fin", "stall_continue", "stall_close", "corrupt", "wrong_range",
         "status5xx", "trickle", "short")
SHORT_MIN = 16 * 1024  # a "short" response still carries this much (or all there is)
CUT_KINDS = frozenset({"rst", "fin", "stall_continue", "stall_close", "trickle"})
BLOCK = 16384
MAX_HEAD = 64 * 1024
_REASONS = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}


@dataclass(frozen=True)
class Fault:
    """One misbehaviour on blob GET bodies.

    ``offset``: where in the response body it strikes; a ``float`` is a fraction of the
    body length, an ``int`` an absolute byte offset; either is clamped to the body (to its
    last byte for ``corrupt``, to its end for the cutting kinds: a cut at the very end
    strikes after the whole body was sent). Selector: ``first`` > 0 strikes the first
    ``first`` matching requests, else ``every`` > 0 every ``every``-th (1 = all), else
    every request. ``match`` narrows which blob paths count (e.g. one repository).
    """

    kind: str
    offset: float | int = 0.5
    first: int = 0
    every: int = 0
    seconds: float = 0.0
    status: int = 503
    retry_after: str = "0"
    shift: int = 1
    rate: int = 2000              # bytes/s, for "trickle"
    match: str = BLOB_PATH

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}")

    def selects(self, n: int) -> bool:
        """Whether the ``n``-th (1-based) matching request is struck."""
        if self.first > 0:
            return n <= self.first
        if self.every > 0:
            return n % self.every == 0
        return True

    def strike_at(self, length: int) -> int | None:
        """The body offset for a body of ``length`` bytes (None: nothing to strike)."""
        if self.kind == "corrupt" and length == 0:
            return None
        top = length - 1 if self.kind == "corrupt" else length
        at = int(self.offset * length) if isinstance(self.offset, float) else int(self.offset)
        return max(0, min(top, at))


@dataclass
class Exchange:
    """One request the proxy saw, and what it did with it."""

    conn: int
    method: str
    path: str
    range: str | None
    status: int = 0
    sent: int = 0                 # body bytes handed to the client's socket
    fault: str | None = None      # the kind actually applied (None: none struck)
    done: bool = False            # the whole response was relayed
    ended: bool = False           # the proxy is finished with it (relayed or cut)


class _Closed(Exception):
    """The peer closed (or reset) a connection."""


class _Reader:
    """Buffered reads from a socket (request/response heads, exact-length bodies)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except OSError:
            return False
        if not data:
            return False
        self.buf += data
        return True

    def head(self) -> bytes | None:
        """Bytes up to and including the blank line; None at EOF before any byte."""
        while True:
            i = self.buf.find(b"\r\n\r\n")
            if i >= 0:
                out = bytes(self.buf[:i + 4])
                del self.buf[:i + 4]
                return out
            if len(self.buf) > MAX_HEAD:
                raise _Closed("head too large")
            if not self._fill():
                if self.buf:
                    raise _Closed("EOF inside a head")
                return None

    def line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                out = bytes(self.buf[:i + 2])
                del self.buf[:i + 2]
                return out
            if len(self.buf) > MAX_HEAD or not self._fill():
                raise _Closed("EOF inside a chunk header")

    def some(self, most: int) -> bytes:
        """Between 1 and ``most`` bytes; raises ``_Closed`` at EOF."""
        if not self.buf and not self._fill():
            raise _Closed("EOF inside a body")
        out = bytes(self.buf[:most])
        del self.buf[:most]
        return out

    def some_or_eof(self, most: int) -> bytes:
        if not self.buf and not self._fill():
            return b""
        out = bytes(self.buf[:most])
        del self.buf[:most]
        return out


def _parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    headers: list[tuple[str, str]] = []
    for ln in lines[1:]:
        if not ln:
            continue
        k, sep, v = ln.partition(":")
        if not sep:
            raise _Closed(f"bad header line {ln!r}")
        headers.append((k.strip(), v.strip()))
    return lines[0], headers


def _get(headers: list[tuple[str, str]], name: str) -> str | None:
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def _build_head(first: str, headers: list[tuple[str, str]]) -> bytes:
    return ("\r\n".join([first, *(f"{k}: {v}" for k, v in headers)]) + "\r\n\r\n").encode(
        "latin-1")


def _shut(sock: socket.socket | None, *, rst: bool = False) -> None:
    if sock is None:
        return
    try:
        if rst:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


@dataclass
class _Watch:
    threshold: int
    callback: Callable[[], None]
    match: str
    count: int = 0


@dataclass(repr=False)
class FaultProxy:
    """Fault-injecting HTTP/1.1 proxy in front of ``upstream_port`` on 127.0.0.1."""

    upstream_port: int
    host: str = "127.0.0.1"
    upstream_host: str = "127.0.0.1"
    log: list[Exchange] = field(default_factory=list)
    _faults: list[Fault] = field(default_factory=list)
    _counts: list[int] = field(default_factory=list)
    _rate: int = 0
    _watches: list[_Watch] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _listener: socket.socket | None = None
    _socks: set[socket.socket] = field(default_factory=set)
    _threads: list[threading.Thread] = field(default_factory=list)
    _next_conn: int = 0

    def __repr__(self) -> str:  # short: hypothesis prints fixtures with a failing example
        where = self.netloc if self._listener is not None else "stopped"
        return f"FaultProxy({where} -> {self.upstream_host}:{self.upstream_port})"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # hypothesis' pretty printer
        p.text(repr(self))

    # ------------------------------------------------------------------ control
    def set_faults(self, *faults: Fault, rate: int = 0) -> None:
        """Replace the schedule (counters restart) and the per-connection rate limit."""
        with self._lock:
            self._faults = list(faults)
            self._counts = [0] * len(faults)
            self._rate = rate
            self._watches = []

    def on_blob_bytes(self, threshold: int, callback: Callable[[], None], *,
                      match: str = BLOB_PATH) -> None:
        """Call ``callback`` once, as soon as the blob body bytes sent on paths containing
        ``match`` (counted from now) reach ``threshold``, before any further block."""
        with self._lock:
            self._watches.append(_Watch(threshold, callback, match))

    def exchanges(self, match: str = "") -> list[Exchange]:
        with self._lock:
            return [x for x in self.log if match in x.path]

    def mark(self) -> int:
        """A point in the request log: pass it as ``since`` to count only later requests."""
        with self._lock:
            return len(self.log)

    def blob_bytes_sent(self, match: str = BLOB_PATH, *, since: int = 0) -> int:
        """Body bytes of blob GETs on paths containing ``match``, handed to clients, for
        the requests made after ``mark()`` returned ``since``."""
        with self._lock:
            return sum(x.sent for x in self.log[since:] if match in x.path
                       and x.method == "GET" and BLOB_PATH in x.path)

    def applied(self, match: str = "") -> list[str]:
        """The fault kinds that actually struck, in order."""
        with self._lock:
            return [x.fault for x in self.log if x.fault is not None and match in x.path]

    def wait_idle(self, match: str = "", timeout: float = 10.0) -> None:
        """Wait until every request on paths containing ``match`` has ended (e.g. the
        responses to a killed client): their ``sent`` counts are final from then on."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if all(x.ended for x in self.log if match in x.path):
                    return
            time.sleep(0.01)
        raise TimeoutError(f"proxy still relaying {match!r} after {timeout:g} s")

    def drop_connections(self) -> None:
        """Close every client and upstream connection (the listener stays)."""
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            _shut(s)

    # ------------------------------------------------------------------ lifecycle
    @property
    def port(self) -> int:
        assert self._listener is not None
        return int(self._listener.getsockname()[1])

    @property
    def netloc(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.netloc}"

    def start(self) -> FaultProxy:
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((self.host, 0))
        ls.listen(128)
        ls.settimeout(0.2)
        self._listener = ls
        t = threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._listener is not None:
            _shut(self._listener)
        self.drop_connections()
        for t in list(self._threads):
            t.join(2.0)
        self._threads.clear()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ relaying
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._stop.is_set():  # stop() ran between accept and here:
                    _shut(client)        # its drop_connections() did not see us
                    return
                self._next_conn += 1
                cid = self._next_conn
                self._socks.add(client)
                self._threads = [t for t in self._threads if t.is_alive()]
            t = threading.Thread(target=self._serve, args=(client, cid),
                                 name=f"faultproxy-{cid}", daemon=True)
            with self._lock:
                self._threads.append(t)
            t.start()

    def _track(self, sock: socket.socket | None, add: bool) -> None:
        if sock is None:
            return
        with self._lock:
            if add:
                self._socks.add(sock)
            else:
                self._socks.discard(sock)

    def _connect_upstream(self) -> tuple[socket.socket, _Reader]:
        up = socket.create_connection((self.upstream_host, self.upstream_port), timeout=30)
        up.settimeout(None)
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._track(up, True)
        return up, _Reader(up)

    def _serve(self, client: socket.socket, cid: int) -> None:
        up: socket.socket | None = None
        upr: _Reader | None = None
        rst = False
        try:
            try:
                first = client.recv(1, socket.MSG_PEEK)
            except OSError:
                return
            if not first or first[0] == 0x16:
                return  # EOF, or a TLS ClientHello (the client probing https): hang up
            cr = _Reader(client)
            while not self._stop.is_set():
                head = cr.head()
                if head is None:
                    return
                try:
                    keep, rst, up, upr = self._exchange(cid, client, cr, head, up, upr)
                finally:
                    with self._lock:
                        for x in reversed(self.log):
                            if x.conn == cid:
                                x.ended = True
                                break
                if not keep:
                    return
        except (_Closed, OSError):
            return
        finally:
            self._track(client, False)
            self._track(up, False)
            _shut(client, rst=rst)
            _shut(up)

    def _pick_fault(self, method: str, path: str) -> Fault | None:
        if method != "GET" or BLOB_PATH not in path:
            return None
        with self._lock:
            chosen = None
            for i, f in enumerate(self._faults):
                if f.match not in path:
                    continue
                self._counts[i] += 1
                if chosen is None and f.selects(self._counts[i]):
                    chosen = f
            return chosen

    def _exchange(self, cid: int, client: socket.socket, cr: _Reader, head: bytes,
                  up: socket.socket | None, upr: _Reader | None,
                  ) -> tuple[bool, bool, socket.socket | None, _Reader | None]:
        """Relay one request and its response. Returns (keep-alive, rst, up, up reader)."""
        first, headers = _parse_head(head)
        parts = first.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _Closed(f"bad request line {first!r}")
        method, path, version = parts
        rec = Exchange(cid, method, path, _get(headers, "range"))
        with self._lock:
            self.log.append(rec)
        req_body = self._body_kind(headers, method=None, status=None)
        client_close = (_get(headers, "connection") or "").lower() == "close" or (
            version == "HTTP/1.0")
        fault = self._pick_fault(method, path)
        if fault is not None and fault.kind == "status5xx":
            self._relay_body(cr, None, req_body, None, None)  # drain any request body
            body = (b'{"errors":[{"code":"UNAVAILABLE","message":"injected by faultproxy"}]}')
            status = fault.status
            resp = _build_head(f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", [
                ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                ("Retry-After", fault.retry_after)])
            client.sendall(resp + body)
            rec.status, rec.fault, rec.done = status, "status5xx", True
            return not client_close, False, up, upr
        # forward the request (one reconnect if a kept-alive upstream connection closed)
        for attempt in (1, 2):
            fresh = up is None
            if up is None or upr is None:
                up, upr = self._connect_upstream()
            try:
                up.sendall(head)
                if req_body != ("length", 0):
                    self._relay_body(cr, up, req_body, None, None)
                rhead = upr.head()
            except (OSError, _Closed):
                rhead = None
            if rhead is not None:
                break
            self._track(up, False)
            _shut(up)
            up, upr = None, None
            if fresh or attempt == 2 or req_body != ("length", 0):
                raise _Closed("upstream closed")
        assert up is not None and upr is not None and rhead is not None
        status_line, rheaders = _parse_head(rhead)
        status = int(status_line.split(" ")[1])
        rec.status = status
        if fault is not None and fault.kind == "wrong_range" and status == 206:
            rheaders, changed = self._shift_range(rheaders, fault.shift)
            if changed:
                rec.fault = "wrong_range"
        kind = self._body_kind(rheaders, method=method, status=status)
        if fault is not None and fault.kind == "short" and status == 206 \
                and kind[0] == "length":
            keep = max(min(SHORT_MIN, kind[1]), fault.strike_at(kind[1]) or 0)
            if keep < kind[1]:
                return self._short(rec, client, status_line, rheaders, keep, up, upr,
                                   client_close)
        up_close = (_get(rheaders, "connection") or "").lower() == "close" or kind[0] == "eof"
        client.sendall(_build_head(status_line, rheaders))
        cut = fault if fault is not None and fault.kind in CUT_KINDS | {"corrupt"} else None
        outcome = self._relay_body(upr, client, kind, cut, rec)
        if outcome != "ok":
            # the client connection ends here; the upstream body is unfinished
            self._track(up, False)
            _shut(up)
            return False, outcome == "rst", None, None
        rec.done = True
        if up_close:
            self._track(up, False)
            _shut(up)
            up, upr = None, None
        return not (client_close or up_close), False, up, upr

    def _short(self, rec: Exchange, client: socket.socket, status_line: str,
               rheaders: list[tuple[str, str]], keep: int, up: socket.socket,
               upr: _Reader, client_close: bool,
               ) -> tuple[bool, bool, socket.socket | None, _Reader | None]:
        """Relay the first ``keep`` bytes of a 206 as a complete, shorter 206; the rest of
        the upstream body stays unread, so that connection is dropped."""
        headers: list[tuple[str, str]] = []
        for k, v in rheaders:
            value = v
            if k.lower() == "content-range":
                span, _, total = v[6:].partition("/")
                a = int(span.partition("-")[0])
                value = f"bytes {a}-{a + keep - 1}/{total}"
            elif k.lower() == "content-length":
                value = str(keep)
            headers.append((k, value))
        client.sendall(_build_head(status_line, headers))
        out = self._relay_body(upr, client, ("length", keep), None, rec)
        with self._lock:
            rec.fault = "short"
        self._track(up, False)  # the rest of the upstream body stays unread
        _shut(up)
        rec.done = out == "ok"
        return out == "ok" and not client_close, out == "rst", None, None

    @staticmethod
    def _shift_range(headers: list[tuple[str, str]], shift: int,
                     ) -> tuple[list[tuple[str, str]], bool]:
        out: list[tuple[str, str]] = []
        changed = False
        for k, v in headers:
            if k.lower() == "content-range" and v.startswith("bytes ") and "-" in v:
                span, _, total = v[6:].partition("/")
                a, _, b = span.partition("-")
                s = shift if int(a) + shift >= 0 else abs(shift)
                out.append((k, f"bytes {int(a) + s}-{int(b) + s}/{total}"))
                changed = True
            else:
                out.append((k, v))
        return out, changed

    @staticmethod
    def _body_kind(headers: list[tuple[str, str]], *, method: str | None,
                   status: int | None) -> tuple[str, int]:
        """("length", n), ("chunked", 0) or ("eof", 0) for a request/response body."""
        if method == "HEAD" or (status is not None and (status < 200 or status in (204, 304))):
            return "length", 0
        te = (_get(headers, "transfer-encoding") or "").lower()
        if "chunked" in te:
            return "chunked", 0
        cl = _get(headers, "content-length")
        if cl is not None:
            return "length", int(cl)
        return ("length", 0) if status is None else ("eof", 0)

    def _relay_body(self, src: _Reader, dst: socket.socket | None, kind: tuple[str, int],
                    fault: Fault | None, rec: Exchange | None) -> str:
        """Copy one body; "ok", or how the client connection ended ("rst", "closed")."""
        mode, length = kind
        if mode == "chunked":  # relayed as is (no faults: registry blobs have a length)
            while True:
                line = src.line()
                size = int(line.split(b";")[0].strip(), 16)
                self._send(dst, line, rec)
                left = size + 2 if size else 0
                while left:
                    data = src.some(min(BLOCK, left))
                    self._send(dst, data, rec)
                    left -= len(data)
                if size == 0:
                    while True:  # trailers up to the blank line
                        t = src.line()
                        self._send(dst, t, rec)
                        if t == b"\r\n":
                            return "ok"
        strike = fault.strike_at(length) if fault is not None and mode == "length" else None
        with self._lock:
            rate = self._rate if rec is not None else 0
        block = BLOCK if not rate else max(1024, min(BLOCK, rate // 100))
        t0 = time.monotonic()
        pos = 0
        while True:
            if fault is not None and strike == pos and fault.kind != "corrupt":
                ended = self._strike(fault, rec)
                if ended:
                    return ended
                strike = None
                if fault.kind == "trickle":  # small blocks: a steady trickle, no bursts
                    rate = max(1, fault.rate)
                    block = max(64, min(BLOCK, rate // 10))
                t0 = time.monotonic() - (pos / rate if rate else 0.0)  # no catch-up burst
            if mode == "length" and pos >= length:
                return "ok"
            want = block if mode == "eof" else min(block, length - pos)
            if strike is not None and strike > pos:
                want = min(want, strike - pos)
            data = src.some_or_eof(want) if mode == "eof" else src.some(want)
            if not data:
                return "closed"  # an EOF-delimited body ended: so does the connection
            if fault is not None and strike == pos:  # corrupt: flip the byte at `strike`
                data = bytes([data[0] ^ 0xFF]) + data[1:]
                strike = None
                self._strike(fault, rec)
            self._send(dst, data, rec)
            pos += len(data)
            if rate:
                ahead = pos / rate - (time.monotonic() - t0)
                if ahead > 0 and self._stop.wait(ahead):
                    return "closed"

    def _strike(self, fault: Fault, rec: Exchange | None) -> str | None:
        """Apply a body fault at its offset; the way the connection ended, or None."""
        if rec is not None:
            with self._lock:
                rec.fault = fault.kind
        if fault.kind == "rst":
            return "rst"
        if fault.kind == "fin":
            return "closed"
        if fault.kind in ("stall_continue", "stall_close"):
            if self._stop.wait(fault.seconds):
                return "closed"
            return "closed" if fault.kind == "stall_close" else None
        return None  # corrupt: flipped by the caller; trickle: slowed by the caller

    def _send(self, dst: socket.socket | None, data: bytes, rec: Exchange | None) -> None:
        if dst is None:
            return
        dst.sendall(data)
        if rec is None:
            return
        fire: list[Callable[[], None]] = []
        with self._lock:
            rec.sent += len(data)
            if self._watches and rec.method == "GET" and BLOB_PATH in rec.path:
                for w in list(self._watches):
                    if w.match in rec.path:
                        w.count += len(data)
                        if w.count >= w.threshold:
                            self._watches.remove(w)
                            fire.append(w.callback)
        for cb in fire:
            cb()
