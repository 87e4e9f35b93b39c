"""The pull engine starts writeback as it writes (spec/pull.md, "Writeback as it goes"),
also on the path no chunk journal covers: a server that ignores ``Range`` and sends the
blob as one stream. Watched from the kernel's side (/proc/meminfo ``Dirty``) while the
pull runs, against the control in tests/blobstore/test_writeback.py."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import pytest

from blobstore.store import Store
from registry_client.pull import pull
from tests.blobstore.test_writeback import SIZE, dirty, stays_dirty
from tests.registry_client.test_pull_faults import assert_intact, opts, setup_model
from tests.servers import Fault, FaultServer

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20


@pytest.mark.parametrize("ranges", [False, True], ids=["one-stream", "ranges"])
def test_a_pull_leaves_little_dirty_while_it_runs(server: FaultServer, store: Store,
                                                  tmp_path: Path, ranges: bool) -> None:
    before = stays_dirty(tmp_path / "control")
    ref, data = setup_model(server, size=SIZE)
    if not ranges:
        server.faults.append(Fault("ignore_range", times=1000))
    server.default_rate = 24 * MiB  # ~4 s per stream: time to look while it runs
    seen: list[tuple[int, int]] = []

    def progress(ev: dict[str, Any]) -> None:
        if ev.get("total") == len(data) and ev.get("completed"):
            seen.append((ev["completed"], dirty() - before))

    pull(ref, store=store, options=opts(connections=4, window_bytes=32 * MiB),
         progress=progress)
    assert_intact(store, data)
    late = [d for done, d in seen if done >= 0.6 * len(data)]
    assert len(late) >= 2, f"too few progress events late in the pull: {seen}"
    # without writeback the page cache holds ~60-96 MiB dirty by then
    assert statistics.median(late) <= SIZE // 4, [(c // MiB, d // MiB) for c, d in seen]
