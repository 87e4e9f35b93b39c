"""The client's routes and its first connection (found by review of the head-deadline
transport): a registry that refuses the first connects and then answers must still be
pulled (a try-count once overwrote the body-size limit of the retry, so a manifest read
as "larger than 3 bytes"); the environment's proxies (``HTTP_PROXY``, ``ALL_PROXY``) are
used, and ``NO_PROXY`` hosts are reached directly, with the deadline on their heads."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import pytest

from blobstore.store import Store
from registry_client.pull import PullOptions, pull
from registry_client.retry import RetryPolicy
from tests.servers import Fault, FaultServer, free_port, sha

MODEL = "application/vnd.ollama.image.model"
LAYER = bytes(range(256)) * 4096  # 1 MiB: more than one range with 256 KiB chunks


class ForwardProxy:
    """A plain HTTP forward proxy on 127.0.0.1 (absolute-form requests, one request per
    connection) that counts what it forwards."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.requests: list[str] = []
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:  # (a client that hung up: its business)
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            first, _, rest = head.partition(b"\r\n")
            method, target, version = first.decode().split(" ")
            self.requests.append(f"{method} {target}")
            if method == "CONNECT":  # (the client's https probe): a tunnel, as proxies do
                host, _, port = target.partition(":")
                with socket.create_connection((host, int(port)), timeout=30) as up:
                    conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    back = threading.Thread(target=_pipe, args=(up, conn), daemon=True)
                    back.start()
                    _pipe(conn, up)
                    back.join(30)
                return
            hostport, _, path = target.removeprefix("http://").partition("/")
            host, _, port = hostport.partition(":")
            headers = [h for h in rest.split(b"\r\n\r\n")[0].split(b"\r\n")
                       if h and not h.lower().startswith((b"connection:", b"proxy-"))]
            with socket.create_connection((host, int(port or 80)), timeout=30) as up:
                up.sendall(f"{method} /{path} {version}\r\n".encode()
                           + b"\r\n".join(headers) + b"\r\nConnection: close\r\n\r\n")
                while data := up.recv(65536):
                    conn.sendall(data)

    def close(self) -> None:
        self._stop = True
        self.sock.close()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)


def _no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy variable of the environment this test runs in reaches the pull."""
    for v in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy",
              "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(v, raising=False)


def _options(**kw: object) -> PullOptions:
    return PullOptions(insecure=True, connections=4, chunk_size=256 * 1024, stall_timeout=2.0,
                       **kw)  # type: ignore[arg-type]


@pytest.mark.timeout(60)
def test_a_registry_that_refuses_the_first_connects_is_pulled(tmp_path: Path) -> None:
    port = free_port()
    srv = FaultServer(port=port)
    srv.add_model("library/late", "1", b'{"model_format":"gguf"}', [(MODEL, LAYER)])
    starter = threading.Timer(0.5, srv.start)  # nothing listens until then: refused
    starter.start()
    try:
        r = pull(f"127.0.0.1:{port}/library/late:1", store=Store(tmp_path / "s"),
                 options=_options(retry=RetryPolicy(attempts=20, unreachable_attempts=20,
                                                    base_delay=0.1, max_delay=0.2)))
        assert r.blobs_fetched == 2
    finally:
        starter.join()
        srv.stop()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("variable", ["HTTP_PROXY", "ALL_PROXY", "all_proxy"])
def test_the_environments_proxy_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        variable: str) -> None:
    _no_proxies(monkeypatch)
    proxy = ForwardProxy()
    monkeypatch.setenv(variable, proxy.url)
    try:
        with FaultServer() as srv:
            srv.add_model("library/p", "1", b'{"model_format":"gguf"}', [(MODEL, LAYER)])
            store = Store(tmp_path / "s")
            pull(f"{srv.netloc}/library/p:1", store=store, options=_options())
            assert store.blob_path(store.list_models()[0].manifest.layers[0].digest
                                   ).read_bytes() == LAYER
            seen = [r for r in proxy.requests if srv.netloc in r]
            assert any("/manifests/" in r for r in seen), proxy.requests
            assert sum(f"/blobs/{sha(LAYER)}" in r for r in seen) >= 4  # every range
    finally:
        proxy.close()


@pytest.mark.timeout(60)
def test_a_no_proxy_host_is_reached_directly_with_the_head_deadline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = ForwardProxy()
    monkeypatch.setenv("ALL_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    try:
        with FaultServer() as srv:
            srv.add_model("library/d", "1", b'{"model_format":"gguf"}', [(MODEL, LAYER)])
            # the manifest's head trickles in once: the deadline must end that try
            srv.faults.append(Fault(kind="trickle_head", match="/manifests/", times=1,
                                    seconds=0.2))
            store = Store(tmp_path / "s")
            t0 = time.monotonic()
            pull(f"{srv.netloc}/library/d:1", store=store,
                 options=_options(retry=RetryPolicy(attempts=3, base_delay=0.01,
                                                    max_delay=0.05)))
            assert time.monotonic() - t0 < 20
            assert proxy.requests == []
            assert len(store.list_models()) == 1
    finally:
        proxy.close()


@pytest.mark.timeout(60)
def test_a_proxy_without_a_scheme_and_no_proxy_with_a_port(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: `HTTP_PROXY=host:port` (no scheme, as many set it) made every
    request fail with exit 1, and a `NO_PROXY` entry with a port was not honoured; httpx
    read both the way these tests now expect."""
    _no_proxies(monkeypatch)
    proxy = ForwardProxy()
    try:
        with FaultServer() as srv:
            srv.add_model("library/s", "1", b'{"model_format":"gguf"}', [(MODEL, LAYER)])
            monkeypatch.setenv("HTTP_PROXY", f"127.0.0.1:{proxy.port}")
            pull(f"{srv.netloc}/library/s:1", store=Store(tmp_path / "a"), options=_options())
            assert any(srv.netloc in r for r in proxy.requests), proxy.requests
            proxy.requests.clear()
            monkeypatch.setenv("NO_PROXY", srv.netloc)  # host:port
            pull(f"{srv.netloc}/library/s:1", store=Store(tmp_path / "b"), options=_options())
            assert proxy.requests == []
    finally:
        proxy.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("match", ["/manifests/", "/blobs/"])
@pytest.mark.parametrize("variable", ["HTTP_PROXY", "ALL_PROXY"])
def test_a_trickling_head_through_the_proxy_is_ended_by_the_deadline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, match: str, variable: str) -> None:
    """A request through the environment's proxy went through httpx's own proxy transport,
    whose reads have only the per-read timeout: a head a byte every 0.2 s (relayed by the
    proxy as it comes) held the pull for as long as it trickled. Proxied heads now keep the
    deadline too: that try ends within the stall timeout and the retry succeeds."""
    _no_proxies(monkeypatch)
    proxy = ForwardProxy()
    monkeypatch.setenv(variable, proxy.url)
    try:
        with FaultServer() as srv:
            srv.add_model("library/t", "1", b'{"model_format":"gguf"}', [(MODEL, LAYER)])
            srv.faults.append(Fault(kind="trickle_head", match=match, times=1, seconds=0.2))
            store = Store(tmp_path / "s")
            t0 = time.monotonic()
            pull(f"{srv.netloc}/library/t:1", store=store,
                 options=_options(retry=RetryPolicy(attempts=3, base_delay=0.01,
                                                    max_delay=0.05)))
            took = time.monotonic() - t0
            assert took < 15, took  # the trickle lasts 60 s: only the deadline ends it
            assert any(match in r for r in proxy.requests), proxy.requests
            layer = store.list_models()[0].manifest.layers[0].digest  # type: ignore[union-attr]
            assert store.blob_path(layer).read_bytes() == LAYER
    finally:
        proxy.close()
