"""Resume from what an earlier (killed) run left in the ingest folder: light checkpoints
(the journal) are trusted within one boot, durable ones (state.json) always; a resume
whose first window is already on disk starts at once (it used to wait forever)."""

from __future__ import annotations

import itertools
import logging
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
    return leave_ranges(store, data, [(i * CHUNK, min(len(data), (i + 1) * CHUNK))
                                      for i in done], durable=durable)


def as_if_another_boot(journal: Path) -> None:
    """Rewrite the journal's boot id: as after a reboot (the page cache is gone)."""
    head, _, body = journal.read_bytes().partition(b"\n")
    parts = head.split(b" ")
    parts[1] = b"00000000-0000-0000-0000-000000000000"
    journal.write_bytes(b" ".join(parts) + b"\n" + body)


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
    as_if_another_boot(d / "journal")
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


def leave_ranges(store: Store, data: bytes, ranges: list[tuple[int, int]], *,
                 durable: bool, written: bytes | None = None) -> Path:
    """What a run killed (or failed) after writing ``ranges`` at any offsets leaves
    (the bytes of ``written`` there, if given: a disk that lied)."""
    digest = Digest.parse(sha(data))
    src = data if written is None else written
    with Lease(store.layout, "earlier run") as lease:
        ing = ResumableIngest(store.layout, digest, len(data), CHUNK, lease)
        for s, e in ranges:
            ing.write_at(memoryview(src[s:e]), s)
            ing.note_written(s, e)
        if durable:
            ing.checkpoint()
        ing.close()
    return ing.dir


@st.composite
def written_ranges(draw: st.DrawFn, size: int) -> list[tuple[int, int]]:
    cuts = sorted(draw(st.sets(st.integers(0, size), max_size=24)) | {0, size})
    spans = list(itertools.pairwise(cuts))
    return [sp for sp in spans if draw(st.booleans())]


@pytest.mark.timeout(60)
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), durable=st.booleans(), connections=st.integers(1, 6),
       window=st.integers(1, 6))
def test_resume_keeps_bytes_written_anywhere(tmp_path_factory: pytest.TempPathFactory,
                                             server: FaultServer, data: st.DataObject,
                                             durable: bool, connections: int,
                                             window: int) -> None:
    """Light records are per write, not per chunk: whatever an earlier run wrote, also
    inside chunks it never finished (a kill mid-chunk, a pull that failed with every
    chunk partly done), is resumed, and only the rest is fetched."""
    store = Store(tmp_path_factory.mktemp("s"))
    ref, blob = setup_model(server, size=16 * CHUNK - 33)
    ranges = data.draw(written_ranges(len(blob)), label="ranges")
    d = leave_ranges(store, blob, ranges, durable=durable)
    if durable:  # after a power loss: state.json alone must carry the parts
        as_if_another_boot(d / "journal")
    r = pull(ref, store=store, options=opts(chunk_size=CHUNK, window_bytes=window * CHUNK,
                                            connections=connections))
    assert_intact(store, blob)
    have = sum(e - s for s, e in ranges)
    assert r.bytes_resumed == have
    assert r.bytes_fetched == len(blob) - have + len(b'{"a":1}') + len(b'{"model_format":"gguf"}')


def test_parts_in_a_journal_of_another_boot_are_not_trusted(server: FaultServer,
                                                             store: Store) -> None:
    ref, data = setup_model(server, size=8 * CHUNK)
    d = leave_ranges(store, data, [(100, 5000), (CHUNK + 7, 3 * CHUNK - 9)], durable=False)
    as_if_another_boot(d / "journal")
    r = pull(ref, store=store, options=opts(chunk_size=CHUNK))
    assert r.bytes_resumed == 0
    assert_intact(store, data)


def test_wrong_resumed_parts_are_caught_and_fetched_again(
        server: FaultServer, store: Store, caplog: pytest.LogCaptureFixture) -> None:
    """Bytes recorded as written that are not the blob's (a disk that lied): the digest
    does not match, and the blob is fetched once more from scratch."""
    ref, data = setup_model(server, size=8 * CHUNK)
    bad = bytearray(data)
    bad[CHUNK + 10] ^= 0xFF
    leave_ranges(store, data, [(CHUNK + 1, 2 * CHUNK - 1)], durable=True, written=bytes(bad))
    with caplog.at_level(logging.WARNING, logger="blobctl"):
        pull(ref, store=store, options=opts(chunk_size=CHUNK))
    assert_intact(store, data)
    # resumed, found bad at the commit, fetched again (ignoring the part would not notice)
    assert any("resumed from an earlier download" in m and "did not verify" in m
               for m in caplog.messages), caplog.messages


@pytest.mark.parametrize("durable", [False, True])
def test_a_commit_killed_between_its_renames_is_resumed(server: FaultServer, store: Store,
                                                        durable: bool) -> None:
    """A commit moves ``data`` out of reach (``data.commit-*``, read-only) before it
    renames it into ``blobs/``. A kill between the two left the verified bytes there
    and the next run fetched the whole blob again (found by the kill search in CI: a
    kill right after the last byte). The next run resumes those bytes instead."""
    ref, data = setup_model(server, size=16 * CHUNK + 5)
    d = leave_ranges(store, data, [(0, len(data))], durable=durable)
    private = d / "data.commit-0123abcd"
    (d / "data").rename(private)
    private.chmod(0o444)
    r = pull(ref, store=store, options=opts(chunk_size=CHUNK))
    assert_intact(store, data)
    assert r.bytes_resumed == len(data)
    assert r.bytes_fetched == len(b'{"a":1}') + len(b'{"model_format":"gguf"}')
