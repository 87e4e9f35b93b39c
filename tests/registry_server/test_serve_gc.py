"""GC (``--grace 0``, in a loop, other processes) while four clients stream blobs that no
manifest references: every stream completes with the right bytes, no blob is removed
while it is streamed, and once the streams end the same GC does remove them (so only
the server's hold kept them)."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from blobstore import Digest, Store
from tests.registry_server.conftest import ROOT, cli_env, start_serve
from tests.servers import sha

pytestmark = pytest.mark.timeout(240)

# The server's response is over once the kernel took its last byte; a client still has up
# to the socket buffers (a small receive buffer here, the server's send buffer: ~4 MiB on
# loopback) to read after that. "Streaming" below means more than this is still unread.
SLACK = 8 << 20


def gc_once(store: Path) -> None:
    subprocess.run([sys.executable, "-m", "cli", "--store", str(store), "gc", "--grace", "0",
                    "--ingest-grace", "0s"], env=cli_env(), cwd=ROOT, capture_output=True,
                   timeout=120, check=True)


def test_gc_loop_never_removes_a_streamed_blob(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    blobs = [os.urandom(40 << 20), os.urandom(32 << 20)]
    for b in blobs:
        store.put_bytes(b)  # unreferenced: GC with --grace 0 deletes them unless held
    sp = start_serve(store.root, log_dir=tmp_path / "logs")
    errors: list[str] = []
    started = threading.Barrier(5, timeout=60)
    stop_gc = threading.Event()
    gc_runs = [0]  # GC runs started while a long stream was active
    active = [0, 0]  # long streams in progress, per blob
    lock = threading.Lock()
    violations: list[str] = []

    def client(i: int) -> None:
        rnd = random.Random(i)
        data = blobs[i % 2]
        url = f"{sp.url}/v2/ns/any/blobs/{sha(data)}"
        try:
            small = httpx.HTTPTransport(socket_options=[
                (socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)])
            with httpx.Client(timeout=60, transport=small) as long_c, \
                    httpx.Client(timeout=60) as c:
                # one slow whole (or ranged) stream held open across the GC runs ...
                a = rnd.randrange(0, len(data) // 2) if i >= 2 else 0
                headers = {"Range": f"bytes={a}-"} if a else {}
                with long_c.stream("GET", url, headers=headers) as r:
                    assert r.status_code == (206 if a else 200)
                    it = r.iter_bytes(256 << 10)
                    got = bytearray(next(it))
                    with lock:
                        active[i % 2] += 1
                    started.wait()
                    streaming = True
                    for piece in it:
                        got += piece
                        time.sleep(0.03)
                        if streaming and len(data) - a - len(got) <= SLACK:
                            streaming = False
                            with lock:
                                active[i % 2] -= 1
                        # ... while ranged requests on another connection come and go
                        if streaming and rnd.random() < 0.15:
                            s = rnd.randrange(0, len(data))
                            e = min(len(data) - 1, s + rnd.randrange(1, 3 << 20))
                            rr = c.get(url, headers={"Range": f"bytes={s}-{e}"})
                            if rr.status_code != 206 or rr.content != data[s:e + 1]:
                                errors.append(f"client {i}: range {s}-{e}: {rr.status_code}")
                    if streaming:
                        with lock:
                            active[i % 2] -= 1
                    if bytes(got) != data[a:]:
                        errors.append(f"client {i}: long stream bytes differ")
        except Exception as exc:  # any failure of a client is the finding
            errors.append(f"client {i}: {type(exc).__name__}: {exc}")
            started.abort()

    def gc_loop() -> None:
        try:
            started.wait()
        except threading.BrokenBarrierError:
            return
        while not stop_gc.is_set():
            with lock:
                streaming = any(active)
            gc_once(store.root)
            gc_runs[0] += streaming

    def watch() -> None:
        paths = [store.layout.blob(Digest.parse(sha(b))) for b in blobs]
        while not stop_gc.is_set():
            with lock:
                held = [p for p, n in zip(paths, active, strict=True) if n > 0]
                gone = [p.name for p in held if not p.exists()]
            if gone:
                violations.append(f"removed while streamed: {gone}")
            time.sleep(0.005)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    g = threading.Thread(target=gc_loop)
    w = threading.Thread(target=watch)
    for t in [*threads, g, w]:
        t.start()
    try:
        for t in threads:
            t.join(180)
        stop_gc.set()
        g.join(120)
        w.join(10)
        assert errors == []
        assert violations == []
        assert gc_runs[0] >= 2
        time.sleep(0.5)  # the last responses' leases are released after their last byte
        gc_once(store.root)  # with no stream left, GC removes them: the hold was the server's
        assert not any(store.has_blob(Digest.parse(sha(b))) for b in blobs)
    finally:
        stop_gc.set()
        assert sp.stop() == 0
