"""A pull reports each blob when it moved, not every blob at every tick of the engine
(found from outside: a pull of 4,000 layers reported all 4,000 ten times a second, so
its cost grew with the square of the layer count)."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import pytest

from blobstore.store import Store
from registry_client.pull import pull
from tests.registry_client.test_pull_faults import opts
from tests.servers import Fault, FaultServer

MODEL = "application/vnd.ollama.image.model"
MiB = 1 << 20


@pytest.mark.timeout(120)
def test_a_blob_that_did_not_move_is_not_reported_again(server: FaultServer,
                                                       store: Store) -> None:
    tiny = [(MODEL, f"tiny {i} ".encode() + os.urandom(16)) for i in range(150)]
    big = (MODEL, os.urandom(3 * MiB))
    server.add_model("library/many", "1", b'{"model_format":"gguf"}', [big, *tiny])
    server.default_rate = 3 * MiB  # the big one takes ~1 s: ~10 ticks of the engine
    events: list[dict[str, Any]] = []
    pull(f"{server.netloc}/library/many:1", store=store,
         options=opts(connections=2), progress=events.append)
    per_blob = Counter(e["digest"] for e in events if e.get("digest"))
    last = {e["digest"]: e for e in events if e.get("digest")}
    assert len(per_blob) == 152
    assert all(e["completed"] == e["total"] for e in last.values())
    sizes = {e["digest"]: e["total"] for e in events if e.get("digest")}
    small = {d: n for d, n in per_blob.items() if sizes[d] < MiB}
    # a tiny blob moves from 0 to its end at most once in between
    assert max(small.values()) <= 3, sorted(small.values())[-5:]


@pytest.mark.timeout(120)
def test_a_running_blob_that_stalls_is_reported_still(server: FaultServer,
                                                      store: Store) -> None:
    """A blob that began and then does not move (a stalled connection) is reported
    about once a second all the same: a terminal redraws its falling rate rather than a
    frozen line (found by review of the change above)."""
    data = os.urandom(2 * MiB)
    server.add_model("library/stall", "1", b'{"model_format":"gguf"}', [(MODEL, data)])
    server.faults[:] = [Fault("stall", after=512 * 1024, seconds=3.0, times=5)]
    events: list[dict[str, Any]] = []
    pull(f"{server.netloc}/library/stall:1", store=store,
         options=opts(connections=1, stall_timeout=10.0), progress=events.append)
    mine = [e for e in events if e.get("total") == len(data)]
    held = [e for e in mine if e["completed"] == 512 * 1024]
    assert len(held) >= 2, [e["completed"] for e in mine]
