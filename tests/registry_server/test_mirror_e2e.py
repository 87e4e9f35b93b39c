"""The mirror through the real routes: ``blobctl pull`` from ``blobctl serve --upstream``
in front of the real ``docker-registry`` (behind the fault proxy, which counts and
throttles what the upstream sends).

Drives the OCI routes (``registry_server.app``) with ``serve --upstream`` wired to
``registry_server.mirror.mirror_for``.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import httpx
import pytest

import registry_server.app  # noqa: F401 - the serve routes under test (fail, never skip)
from blobstore.digest import Digest
from blobstore.store import Store
from tests.faultproxy import Fault, FaultProxy
from tests.registry_client.pullcheck import cli, finish
from tests.registry_server.mirrorkit import (
    KiB,
    MiB,
    assert_one_upstream_fetch,
    mirror_name,
    proxy,
    push_model,
    registry,
)
from tests.servers import DockerRegistry

__all__ = ["proxy", "registry"]  # fixtures



class Serve:
    def __init__(self, store: Path, upstream: str) -> None:
        self.proc = cli("serve", "--listen", "127.0.0.1:0", "--upstream", upstream,
                        "--insecure-upstream", "--json", "--store", str(store))
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            _, _, err = finish(self.proc, 10, "serve")
            pytest.fail(f"serve did not start: {err[-3000:]}")
        self.url = json.loads(line)["url"]
        self.netloc = httpx.URL(self.url).netloc.decode()

    def stop(self) -> str:
        """Stop it; its stderr (the log)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            _, _, err = finish(self.proc, 20, "serve after SIGTERM")
        except AssertionError:
            self.proc.kill()
            raise
        return err


@pytest.mark.timeout(120)
def test_blobctl_pull_through_serve_upstream(tmp_path: Path, registry: DockerRegistry,
                                             proxy: FaultProxy) -> None:
    model = push_model(registry, [3 * MiB + 17, 2 * KiB])
    serve = Serve(tmp_path / "served", proxy.url)
    mark = proxy.mark()
    try:
        ref = f"{serve.netloc}/{model.repo}:{model.tag}"
        code, _, err = finish(cli("pull", ref, "--insecure", "--json", "--store",
                                    str(tmp_path / "client")), 60, "pull through serve")
        assert code == 0, err[-3000:]
        client = Store(tmp_path / "client")
        for hexd, data in model.blobs.items():
            assert client.blob_path(Digest.parse(f"sha256:{hexd}")).read_bytes() == data
        # the mirror's own copy lands as `blobctl pull registry.ollama.ai/ns/repo:tag` would
        served = Store(tmp_path / "served")
        name = mirror_name(model)
        for _ in range(200):
            if served.has_model(name):
                break
            threading.Event().wait(0.05)
        ns, repo = model.repo.split("/")
        assert (tmp_path / "served" / "manifests" / "registry.ollama.ai" / ns / repo
                / model.tag).read_bytes() == model.raw
        for hexd, data in model.blobs.items():
            assert_one_upstream_fetch(proxy, f"{model.path_match}sha256:{hexd}", mark,
                                      len(data))
        # warm: a second pull is served from the store (nothing more upstream)
        mark2 = proxy.mark()
        code, _, err = finish(cli("pull", ref, "--insecure", "--json", "--store",
                                  str(tmp_path / "client2")), 60, "warm pull")
        assert code == 0, err[-3000:]
        assert proxy.blob_bytes_sent(model.path_match, since=mark2) == 0
    finally:
        serve.stop()


@pytest.mark.timeout(120)
def test_two_clients_through_serve_share_one_upstream_fetch(
        tmp_path: Path, registry: DockerRegistry, proxy: FaultProxy) -> None:
    size = 2 * MiB + 5
    model = push_model(registry, [size])
    truth = next(b for b in model.blobs.values() if len(b) == size)
    digest = Digest.of_bytes(truth)
    serve = Serve(tmp_path / "served", proxy.url)
    mark = proxy.mark()
    proxy.set_faults(rate=512 * KiB)
    got: list[bytes | BaseException] = []

    def fetch() -> None:
        try:
            r = httpx.get(f"{serve.url}/v2/{model.repo}/blobs/{digest}", timeout=60)
            got.append(r.content if r.status_code == 200 else RuntimeError(r.status_code))
        except httpx.HTTPError as exc:
            got.append(exc)

    try:
        threads = [threading.Thread(target=fetch) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert got == [truth, truth]
        assert_one_upstream_fetch(proxy, model.path_match, mark, size)
    finally:
        proxy.set_faults()
        serve.stop()




@pytest.mark.timeout(120)
def test_upstream_failure_cuts_the_client(tmp_path: Path, registry: DockerRegistry,
                                          proxy: FaultProxy) -> None:
    """Every client following the failing fetch is cut (a short body, never wrong bytes),
    or, when the fetch failed before its first byte, answered 502 with ``Retry-After``
    before any head (never a 200 cut at 0 bytes: found from outside); each is one line in
    serve's log, not "Exception in ASGI application" with an ExceptionGroup traceback per
    client (found from outside)."""
    size = 1 * MiB + 3
    model = push_model(registry, [size])
    truth = next(b for b in model.blobs.values() if len(b) == size)
    digest = Digest.of_bytes(truth)
    serve = Serve(tmp_path / "served", proxy.url)
    url = f"{serve.url}/v2/{model.repo}/blobs/{digest}"
    clients = 3
    got: list[bytes | BaseException | int] = [b""] * clients

    def fetch(i: int) -> None:
        buf = bytearray()
        try:
            with httpx.stream("GET", url, timeout=60) as r:
                if r.status_code == 502:  # failed before its first byte
                    assert r.headers.get("retry-after"), r.headers
                    got[i] = 502
                    return
                assert r.status_code == 200
                for block in r.iter_raw():
                    buf += block
            got[i] = bytes(buf)
        except httpx.HTTPError as exc:
            got[i] = exc
            assert bytes(buf) == truth[:len(buf)] and len(buf) < size

    log = ""
    try:
        proxy.set_faults(Fault("rst", 0.6, every=1, match=f"{model.path_match}{digest}"),
                         rate=1 << 20)
        threads = [threading.Thread(target=fetch, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert all(isinstance(g, httpx.HTTPError) or g == 502 for g in got), got
        assert not Store(tmp_path / "served").has_blob(digest)
        proxy.set_faults()
        r = httpx.get(url, timeout=60)  # the next request resumes and completes
        assert r.status_code == 200 and r.content == truth
    finally:
        proxy.set_faults()
        log = serve.stop()
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-4000:]
    cuts = [ln for ln in log.splitlines() if digest.short in ln
            and ("cut after" in ln or "not served" in ln)]
    assert len(cuts) == clients, log[-4000:]


@pytest.mark.timeout(120)
def test_a_blob_miss_while_the_upstream_is_down_is_502_not_404(tmp_path: Path) -> None:
    """Found from outside: with nothing listening upstream, a manifest miss was 502
    UNAVAILABLE but a blob miss 404 BLOB_UNKNOWN, telling clients the blob does not
    exist. Both say: try again later."""
    from tests.servers import free_port

    digest = Digest.of_bytes(b"a blob the mirror does not hold")
    serve = Serve(tmp_path / "served", f"http://127.0.0.1:{free_port()}")
    try:
        for method in ("GET", "HEAD"):
            r = httpx.request(method, f"{serve.url}/v2/library/x/blobs/{digest}",
                              timeout=60)
            assert r.status_code == 502, (method, r.status_code)
            assert r.headers.get("retry-after")
            if method == "GET":
                assert r.json()["errors"][0]["code"] == "UNAVAILABLE"
    finally:
        serve.stop()


@pytest.mark.timeout(120)
def test_an_upstream_that_never_answers_is_a_502_within_a_clients_patience(
        tmp_path: Path) -> None:
    """Found from outside: an upstream that accepts connections but never answers held a
    client's manifest request ~250 s (pull's 8 tries of a 30 s stall timeout) before the
    502; Ollama gives up after 30 s. What a client waits on (a manifest, a blob's HEAD)
    now gets two tries of 10 s: 502 + Retry-After well within that."""
    import socket
    import threading
    import time

    sock = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])  # and never a byte back
            except TimeoutError:
                continue
            except OSError:
                return

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    serve = Serve(tmp_path / "served", f"http://127.0.0.1:{sock.getsockname()[1]}")
    try:
        t0 = time.monotonic()
        r = httpx.get(f"{serve.url}/v2/library/x/manifests/v1", timeout=120)
        took = time.monotonic() - t0
        assert r.status_code == 502, r.text
        assert r.headers.get("retry-after")
        assert took < 28, took
        assert httpx.get(f"{serve.url}/v2/", timeout=10).status_code == 200
    finally:
        serve.stop()
        stop.set()
        t.join(5)
        sock.close()
        for c in held:
            c.close()
