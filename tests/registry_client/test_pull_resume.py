"""Resume from what an earlier (killed) run left in the ingest folder: light checkpoints
(the journal) are trusted within one boot, durable ones (state.json) always; a resume
whose first window is already on disk starts at once (it used to wait forever)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore.digest import Digest
from blobstore.ingest import ResumableIngest
from blobstore.lease import Lease
from blobstore.store import Store
from registry_client.pull import pull
from tests.registry_client.test_pull_faults import assert_intact, opts, setup_model
from tests.servers import FaultServer, sha

KiB = 1024
CHUNK = 64 * KiB


def leave_ingest(store: Store, data: bytes, done: list[int], *, durable: bool) -> Path:
    """What a run killed after finishing chunks ``done`` leaves behind."""
    digest = Digest.parse(sha(data))
    with Lease(store.layout, "earlier run") as lease:
        ing = ResumableIngest(store.layout, digest, len(data), CHUNK, lease)
        for i in done:
            s, e = i * CHUNK, min(len(data), (i + 1) * CHUNK)
            ing.write_at(memoryview(data[s:e]), s)
            ing.mark_done(s, e)
        if durable:
            ing.checkpoint()
        ing.close()
    return ing.dir


@pytest.mark.timeout(60)
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(done=st.sets(st.integers(0, 31), max_size=32), window=st.integers(1, 6),
       durable=st.booleans(), connections=st.integers(1, 8))
def test_resume_fetches_only_the_rest(tmp_path_factory: pytest.TempPathFactory,
                                      server: FaultServer, done: set[int], window: int,
                                      durable: bool, connections: int) -> None:
    store = Store(tmp_path_factory.mktemp("s"))
    ref, data = setup_model(server, size=32 * CHUNK - 100)
    leave_ingest(store, data, sorted(done), durable=durable)
    r = pull(ref, store=store, options=opts(chunk_size=CHUNK, window_bytes=window * CHUNK,
                                            connections=connections))
    assert_intact(store, data)
    have = sum(min(len(data), (i + 1) * CHUNK) - i * CHUNK for i in done)
    assert r.bytes_resumed == have
    assert r.bytes_fetched == len(data) - have + len(b'{"a":1}') + len(b'{"model_format":"gguf"}')


def test_journal_of_another_boot_is_not_trusted(server: FaultServer, store: Store) -> None:
    """After a power loss the page cache is gone: only the durable checkpoint counts."""
    ref, data = setup_model(server, size=16 * CHUNK)
    d = leave_ingest(store, data, list(range(8)), durable=False)
    journal = d / "journal"
    head, _, body = journal.read_bytes().partition(b"\n")
    parts = head.split(b" ")
    parts[1] = b"00000000-0000-0000-0000-000000000000"
    journal.write_bytes(b" ".join(parts) + b"\n" + body)
    r = pull(ref, store=store, options=opts(chunk_size=CHUNK))
    assert r.bytes_resumed == 0
    assert_intact(store, data)


def test_torn_journal_tail_and_damaged_state(server: FaultServer, store: Store) -> None:
    ref, data = setup_model(server, size=16 * CHUNK)
    d = leave_ingest(store, data, [0, 1, 2, 5], durable=True)
    with open(d / "journal", "ab") as f:
        f.write(b"\x07" * 9)  # half a record: the process died inside a write
    r = pull(ref, store=store, options=opts(chunk_size=CHUNK))
    assert r.bytes_resumed == 4 * CHUNK
    assert_intact(store, data)
    # a state file that does not decode is a fresh start, never an error
    store2 = Store(store.root.parent / "other")
    d = leave_ingest(store2, data, [0, 1], durable=True)
    (d / "state.json").write_bytes(b"{not json")
    r = pull(ref, store=store2, options=opts(chunk_size=CHUNK))
    assert r.bytes_resumed == 0
    assert_intact(store2, data)
