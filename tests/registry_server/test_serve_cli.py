"""``blobctl serve`` as a process: startup line, listen rules, access log, clean shutdown
on SIGTERM/SIGINT with streams in flight."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from blobstore import Store
from tests.registry_server.conftest import ROOT, add_model, cli_env, start_serve
from tests.servers import sha

pytestmark = pytest.mark.timeout(120)


def run_cli(store: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", "--store", str(store), *args],
                          capture_output=True, text=True, env=cli_env(), cwd=ROOT,
                          timeout=timeout)


def test_startup_line_and_access_log(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    raw = add_model(store, "ns/m:1", [b"abc" * 1000])
    sp = start_serve(store.root, log_dir=tmp_path / "logs")
    try:
        assert sp.startup["event"] == "listening" and sp.startup["push"] is False
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", sp.url)
        assert not sp.url.endswith(":0")
        r = httpx.get(f"{sp.url}/v2/ns/m/manifests/1")
        assert r.content == raw
        httpx.get(f"{sp.url}/v2/ns/m/blobs/{sha(b'abc' * 1000)}", headers={"Range": "bytes=0-9"})
        deadline = time.monotonic() + 10  # counted as its handler returns: poll
        while 'blobctl_http_requests_total{method="GET",status="206"} 1' not in (
                metrics := httpx.get(f"{sp.url}/metrics").text):
            assert time.monotonic() < deadline, metrics
            time.sleep(0.05)
    finally:
        assert sp.stop() == 0
    lines = [ln for ln in sp.log().splitlines() if " /v2/ns/m/" in ln]
    assert len(lines) == 2
    # remote, method, path, status, bytes, ms, subject
    assert re.fullmatch(r"127\.0\.0\.1:\d+ GET /v2/ns/m/manifests/1 200 "
                        rf"{len(raw)} \d+\.\dms anonymous", lines[0]), lines[0]
    assert re.fullmatch(r"127\.0\.0\.1:\d+ GET /v2/ns/m/blobs/sha256:[0-9a-f]{64} 206 10 "
                        r"\d+\.\dms anonymous", lines[1]), lines[1]
    # without --json: one human line with the address
    p = subprocess.Popen([sys.executable, "-m", "cli", "--store", str(store.root), "serve",
                          "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, env=cli_env(), cwd=ROOT)
    assert p.stdout is not None
    line = p.stdout.readline().decode()
    p.send_signal(signal.SIGINT)
    assert p.wait(30) == 0
    assert re.match(r"blobctl serve: listening on http://127\.0\.0\.1:\d+ \(read-only", line)


def test_listen_rules(tmp_path: Path) -> None:
    store = tmp_path / "store"
    r = run_cli(store, "serve", "--listen", "0.0.0.0:0", "--push")
    assert r.returncode == 2
    assert "--push on a non-loopback address" in r.stderr and "needs --auth" in r.stderr
    r = run_cli(store, "serve", "--listen", "nonsense")
    assert r.returncode == 2 and "HOST:PORT" in r.stderr
    # a non-loopback bind without --auth warns, then serves
    store.mkdir()  # (read-only: a store that is not there is exit 3, test_serve_outside)
    p = subprocess.Popen([sys.executable, "-m", "cli", "--store", str(store), "serve",
                          "--listen", "0.0.0.0:0", "--json"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=cli_env(), cwd=ROOT)
    assert p.stdout is not None and p.stderr is not None
    doc = json.loads(p.stdout.readline())
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 0
    assert doc["url"].startswith("http://0.0.0.0:")
    assert "warning: serving 0.0.0.0 without --auth" in p.stderr.read().decode()
    # a port in use is one error line
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = run_cli(store, "serve", "--listen", f"127.0.0.1:{s.getsockname()[1]}")
    assert r.returncode != 0 and r.stderr.startswith("error: cannot listen on")


def test_plain_http_upstream_needs_insecure_upstream(tmp_path: Path) -> None:
    r = run_cli(tmp_path / "store", "serve", "--upstream", "http://127.0.0.1:9")
    assert r.returncode == 4
    assert r.stderr.startswith("error: --upstream 'http://127.0.0.1:9': plain http needs "
                               "--insecure-upstream")


def _raw_get(url: str, path: str, rcvbuf: int | None = None) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect((host, int(port)))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return s


def _read_all(s: socket.socket, pace: float = 0.0) -> bytes:
    out = bytearray()
    while True:
        try:
            b = s.recv(1 << 20)
        except ConnectionResetError:
            break
        if not b:
            break
        out += b
        if pace:
            time.sleep(pace)
    return bytes(out)


def test_sigterm_lets_a_stream_finish_and_exits_0(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    data = os.urandom(24 << 20)
    store.put_bytes(data)
    sp = start_serve(store.root, log_dir=tmp_path / "logs")
    s = _raw_get(sp.url, f"/v2/ns/x/blobs/{sha(data)}", rcvbuf=64 << 10)
    first = s.recv(65536)
    assert first.startswith(b"HTTP/1.1 200")
    sp.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(httpx.HTTPError):  # no new connections once shutting down
        httpx.get(f"{sp.url}/v2/", timeout=2)
    body = first + _read_all(s, pace=0.01)  # a slow reader: ~2-4 s
    s.close()
    _head, _, payload = body.partition(b"\r\n\r\n")
    assert payload == data
    assert sp.proc.wait(30) == 0


@pytest.mark.timeout(90)
def test_sigterm_cuts_a_stalled_stream_within_the_bound(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    data = os.urandom(48 << 20)
    store.put_bytes(data)
    sp = start_serve(store.root, log_dir=tmp_path / "logs")
    s = _raw_get(sp.url, f"/v2/ns/x/blobs/{sha(data)}", rcvbuf=16 << 10)
    assert s.recv(4096).startswith(b"HTTP/1.1 200")
    time.sleep(0.5)  # the reader stalls: the server's send blocks
    t0 = time.monotonic()
    sp.proc.send_signal(signal.SIGTERM)
    assert sp.proc.wait(40) == 0
    took = time.monotonic() - t0
    assert took < 10 + 15  # the grace (10 s) plus a generous margin on a loaded machine
    got = _read_all(s)
    s.close()
    assert len(got) < len(data)  # cut, not completed
    # the lease files of the cut stream are gone too
    assert list(store.layout.leases.glob("*.json")) == []


@pytest.mark.parametrize("stack", ["zerocopy", "h11"])
def test_a_client_hanging_up_after_the_headers_ends_the_response(tmp_path: Path,
                                                                 stack: str) -> None:
    """Ollama's first blob GET reads the headers and closes: the server stops sending
    (no error logged, far less than the blob sent), releases the lease, and goes on."""
    store = Store(tmp_path / "store")
    data = os.urandom(64 << 20)
    store.put_bytes(data)
    sp = start_serve(store.root, log_dir=tmp_path / "logs", env={"BLOBCTL_SERVE_STACK": stack})
    try:
        for _ in range(3):
            s = _raw_get(sp.url, f"/v2/library/m/blobs/{sha(data)}", rcvbuf=16 << 10)
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
            s.close()
        deadline = time.monotonic() + 20
        while True:
            text = httpx.get(f"{sp.url}/metrics").text
            if "blobctl_active_streams 0" in text and not list(
                    store.layout.leases.glob("*.json")):
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.1)
        r = httpx.get(f"{sp.url}/v2/library/m/blobs/{sha(data)}", headers={"Range": "bytes=5-9"})
        assert r.content == data[5:10]
        served = float(re.search(r"^blobctl_bytes_served_total (\S+)$", text, re.M)[1])  # type: ignore[index]
        assert served < len(data)  # three hang-ups cost less than one whole blob
    finally:
        assert sp.stop() == 0
    log = sp.log()
    assert "Traceback" not in log and "ERROR" not in log
    lines = [ln for ln in log.splitlines() if "/blobs/" in ln]
    assert len(lines) == 4 and all(" 200 " in ln for ln in lines[:3])
