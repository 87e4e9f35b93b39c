"""The fault proxy itself: keep-alive relaying, chunked bodies, every fault kind, the byte
counts and the rate limit, checked with raw sockets and httpx against the real registry
(and a tiny chunked upstream)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.faultproxy import Fault, FaultProxy
from tests.registry_client.pullcheck import KiB, PushedModel, push_model
from tests.servers import DOCKER_MANIFEST, DockerRegistry

SIZE = 200 * KiB


@pytest.fixture(scope="module")
def proxy(registry: DockerRegistry) -> Iterator[FaultProxy]:
    with FaultProxy(registry.port) as px:
        yield px


@pytest.fixture(scope="module")
def model(registry: DockerRegistry) -> PushedModel:
    return push_model(registry, [SIZE])


def _layer(model: PushedModel) -> tuple[str, bytes]:
    hexd, data = next((h, b) for h, b in model.blobs.items() if len(b) == SIZE)
    return f"/v2/{model.repo}/blobs/sha256:{hexd}", data


def test_keep_alive_relays_several_requests_on_one_connection(proxy: FaultProxy,
                                                              model: PushedModel) -> None:
    path, data = _layer(model)
    proxy.set_faults()
    mark = proxy.mark()
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        r = c.get(f"/v2/{model.repo}/manifests/t", headers={"Accept": DOCKER_MANIFEST})
        assert r.content == model.raw
        assert c.head(path).headers["content-length"] == str(SIZE)
        r = c.get(path, headers={"Range": "bytes=100-199"})
        assert r.status_code == 206 and r.content == data[100:200]
        assert c.get(path).content == data
    # the client can have the last block before the relay counted it: wait for the relay
    proxy.wait_idle(model.path_match)
    seen = proxy.exchanges()[mark:]
    assert [x.method for x in seen] == ["GET", "HEAD", "GET", "GET"]
    assert len({x.conn for x in seen}) == 1  # one client connection, kept alive
    assert [x.range for x in seen] == [None, None, "bytes=100-199", None]
    assert [x.status for x in seen] == [200, 200, 206, 200]
    assert proxy.blob_bytes_sent(model.path_match, since=mark) == 100 + SIZE
    assert all(x.done and x.ended for x in seen)


@pytest.mark.parametrize(("kind", "error"), [("rst", httpx.ReadError),
                                             ("fin", httpx.RemoteProtocolError),
                                             ("stall_close", httpx.RemoteProtocolError)])
def test_cut_bodies(proxy: FaultProxy, model: PushedModel, kind: str,
                    error: type[Exception]) -> None:
    path, _ = _layer(model)
    proxy.set_faults(Fault(kind, 5000, first=1, seconds=0.05, match=model.path_match))
    mark = proxy.mark()
    with httpx.Client(base_url=proxy.url, timeout=10) as c, pytest.raises(error):
        c.get(path).read()
    proxy.wait_idle(model.path_match)
    (x,) = proxy.exchanges()[mark:]
    assert x.fault == kind and x.sent == 5000 and not x.done


def test_trickle_slows_the_rest_of_the_body(proxy: FaultProxy, model: PushedModel) -> None:
    path, data = _layer(model)
    proxy.set_faults(Fault("trickle", 4096, first=1, rate=20_000, match=model.path_match))
    mark = proxy.mark()
    with httpx.Client(base_url=proxy.url, timeout=10) as c, \
            c.stream("GET", path, headers={"Range": "bytes=0-24575"}) as r:
        body = bytearray()
        t0 = time.monotonic()
        times = []
        for block in r.iter_raw():
            body += block
            times.append((len(body), time.monotonic() - t0))
    assert bytes(body) == data[:24576]
    # 20 KiB after the strike at 20 KB/s: about a second, in small steady blocks
    assert 0.8 < times[-1][1] < 5.0, times[-1]
    # ~10 blocks of 2000 bytes a second; a reader slowed by a loaded machine may get a
    # few together, a burst would come in one or two
    assert len(times) >= 4, f"bursty: {len(times)} blocks"
    assert [x.fault for x in proxy.exchanges()[mark:]] == ["trickle"]


def test_faults_follow_their_selector(proxy: FaultProxy, model: PushedModel) -> None:
    path, data = _layer(model)
    proxy.set_faults(Fault("status5xx", every=2, status=502, retry_after="1",
                           match=model.path_match))
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        answers = [c.get(path) for _ in range(4)]
    assert [r.status_code for r in answers] == [200, 502, 200, 502]
    assert answers[1].headers["retry-after"] == "1"
    assert answers[0].content == data
    proxy.set_faults(Fault("status5xx", first=1, status=500, match=model.path_match))
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        assert [c.get(path).status_code for _ in range(3)] == [500, 200, 200]


def test_corrupt_flips_exactly_one_byte(proxy: FaultProxy, model: PushedModel) -> None:
    path, data = _layer(model)
    for offset, at in [(0.5, SIZE // 2), (10**9, SIZE - 1), (0, 0), (16384, 16384)]:
        proxy.set_faults(Fault("corrupt", offset, match=model.path_match))
        got = httpx.get(f"{proxy.url}{path}", timeout=10).content
        diff = [i for i in range(SIZE) if got[i] != data[i]]
        assert diff == [at], (offset, diff[:5])


def test_wrong_range_rewrites_content_range(proxy: FaultProxy, model: PushedModel) -> None:
    path, data = _layer(model)
    proxy.set_faults(Fault("wrong_range", shift=4096, match=model.path_match))
    r = httpx.get(f"{proxy.url}{path}", headers={"Range": "bytes=10-19"}, timeout=10)
    assert r.headers["content-range"] == f"bytes 4106-4115/{SIZE}"
    assert r.content == data[10:20]  # the body itself is untouched
    proxy.set_faults(Fault("wrong_range", shift=-4096, match=model.path_match))
    r = httpx.get(f"{proxy.url}{path}", headers={"Range": "bytes=10-19"}, timeout=10)
    assert r.headers["content-range"] == f"bytes 4106-4115/{SIZE}"  # never below 0


def test_stall_continue_pauses_then_completes(proxy: FaultProxy, model: PushedModel) -> None:
    path, data = _layer(model)
    proxy.set_faults(Fault("stall_continue", 0.25, seconds=0.4, match=model.path_match))
    t0 = time.monotonic()
    assert httpx.get(f"{proxy.url}{path}", timeout=10).content == data
    assert time.monotonic() - t0 >= 0.4


def test_rate_limit_and_byte_watch(proxy: FaultProxy, model: PushedModel) -> None:
    path, data = _layer(model)
    proxy.set_faults(rate=400 * KiB)
    fired: list[float] = []
    t0 = time.monotonic()
    proxy.on_blob_bytes(SIZE // 2, lambda: fired.append(time.monotonic() - t0),
                        match=model.path_match)
    assert httpx.get(f"{proxy.url}{path}", timeout=10).content == data
    took = time.monotonic() - t0
    assert took >= 0.45  # 200 KiB at 400 KiB/s
    assert len(fired) == 1 and 0.15 <= fired[0] <= took
    proxy.set_faults()


def test_tls_probe_is_hung_up_on(proxy: FaultProxy) -> None:
    """A client probing https (as ``--insecure`` does) must fail fast, not wait."""
    t0 = time.monotonic()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"https://{proxy.netloc}/v2/", verify=False, timeout=5)
    assert time.monotonic() - t0 < 2


def test_chunked_response_and_stop_closes_everything() -> None:
    """A chunked upstream body is relayed intact, and stop() ends idle connections."""
    body = [b"hello ", b"chunked ", b"world"]
    ls = socket.create_server(("127.0.0.1", 0))

    def upstream() -> None:
        conn, _ = ls.accept()
        with conn:
            for _ in range(2):  # two requests on one connection
                buf = b""
                while b"\r\n\r\n" not in buf:
                    buf += conn.recv(4096)
                wire = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in body) + b"0\r\n\r\n"
                conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + wire)

    threading.Thread(target=upstream, daemon=True).start()
    px = FaultProxy(ls.getsockname()[1]).start()
    try:
        with httpx.Client(base_url=px.url, timeout=5) as c:
            assert c.get("/a").content == b"".join(body)
            assert c.get("/b").content == b"".join(body)
        idle = socket.create_connection(("127.0.0.1", px.port))
    finally:
        px.stop()
        ls.close()
    idle.settimeout(5)
    try:
        assert idle.recv(1) == b""  # closed by stop() ...
    except ConnectionResetError:
        pass  # ... or reset, when stop() came before the accept
    finally:
        idle.close()
