"""Small responses of a real ``blobctl serve`` on a kept-alive connection are not held back
by Nagle's algorithm (registry_server/server.py ``bind``: asyncio sets ``TCP_NODELAY`` only
on sockets whose protocol says TCP). Held back, each response's body waited for the
client's delayed ACK: ~44 ms per request on this machine, against ~1 ms."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import httpx
import pytest

from blobstore import Store
from tests.registry_server.conftest import add_model, start_serve


@pytest.mark.timeout(60)
def test_keep_alive_requests_answer_without_the_delayed_ack(tmp_path: Path) -> None:
    st = Store(tmp_path / "store")
    add_model(st, "library/m:v1", [b"layer"])
    sp = start_serve(st.root, log_dir=tmp_path / "logs")
    try:
        with httpx.Client(timeout=10) as c:
            c.get(f"{sp.url}/v2/")
            times = []
            for _ in range(15):
                t0 = time.perf_counter()
                r = c.get(f"{sp.url}/v2/library/m/tags/list")
                times.append(time.perf_counter() - t0)
                assert r.status_code == 200
        # the delayed ACK is 40 ms: a median under 25 ms leaves the loaded machine room
        assert statistics.median(times) < 0.025, [round(t * 1000, 1) for t in times]
    finally:
        assert sp.stop() == 0
