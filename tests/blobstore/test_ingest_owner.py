"""One writer per resumable ingest folder, whether or not file locks work: a second
writer of the same blob gets a private folder and never touches the owner's file; a dead
owner's folder is taken over and resumed."""

from __future__ import annotations

import os
import socket
import time

import msgspec

from blobstore.digest import Digest
from blobstore.ingest import OWNER_TTL, ResumableIngest, boot_id
from blobstore.ingest.folder import Owner as _Owner
from blobstore.store import Store
from tests.servers import sha

DATA = os.urandom(256 * 1024)
DIGEST = Digest.parse(sha(DATA))
CHUNK = 64 * 1024


def _owner_file(store: Store) -> bytes:
    return (store.layout.ingest / DIGEST.filename / "owner").read_bytes()


def test_second_writer_gets_a_private_folder(tmp_path: object) -> None:
    store = Store(tmp_path / "s")  # type: ignore[operator]
    a = ResumableIngest(store.layout, DIGEST, len(DATA), CHUNK)
    a.write_at(memoryview(DATA[:CHUNK]), 0)
    a.mark_done(0, CHUNK)
    b = ResumableIngest(store.layout, DIGEST, len(DATA), CHUNK)
    assert b.dir != a.dir and b.dir.name.startswith(DIGEST.filename + ".")
    assert b.adopted == set()
    # the owner's bytes are untouched (no truncate by the second writer)
    assert os.pread(a.fd, CHUNK, 0) == DATA[:CHUNK]
    b.drop()
    a.write_at(memoryview(DATA[CHUNK:]), CHUNK)
    a.commit(Digest.of_bytes(DATA))
    assert store.blob_path(DIGEST).read_bytes() == DATA


def test_dead_owner_is_taken_over_and_resumed(tmp_path: object) -> None:
    store = Store(tmp_path / "s")  # type: ignore[operator]
    a = ResumableIngest(store.layout, DIGEST, len(DATA), CHUNK)
    a.write_at(memoryview(DATA[:CHUNK]), 0)
    a.mark_done(0, CHUNK)
    a.close()
    # a kill -9 leaves the owner file behind, naming a process that is gone
    dead = msgspec.json.encode(_Owner(socket.gethostname(), boot_id(), 2**22 + 12345, 1.0))
    (a.dir / "owner").write_bytes(dead)
    b = ResumableIngest(store.layout, DIGEST, len(DATA), CHUNK)
    assert b.dir == a.dir and b.adopted == {(0, CHUNK)}
    assert _owner_file(store) != dead
    b.close()
    assert not (a.dir / "owner").exists()  # a clean close gives the folder up


def test_owner_on_another_host_is_alive_while_it_writes(tmp_path: object) -> None:
    store = Store(tmp_path / "s")  # type: ignore[operator]
    d = store.layout.ingest / DIGEST.filename
    d.mkdir(parents=True)
    other = msgspec.json.encode(_Owner("elsewhere", "some-boot", 4242, 1.0))
    (d / "owner").write_bytes(other)
    (d / "data").write_bytes(b"\0" * 10)
    b = ResumableIngest(store.layout, DIGEST, len(DATA), CHUNK)
    assert b.dir != d  # fresh writes there: the other host is alive
    b.drop()
    old = time.time() - OWNER_TTL - 10
    for f in d.iterdir():
        os.utime(f, (old, old))
    c = ResumableIngest(store.layout, DIGEST, len(DATA), CHUNK)
    assert c.dir == d  # silent longer than the TTL: stale, taken over
    c.drop()


def test_owner_elsewhere_is_judged_by_its_heartbeat_not_file_times(tmp_path: object) -> None:
    """A writer on another host (or in a container) is alive while its heartbeat is
    younger than OWNER_TTL: ancient file times do not make it stale, fresh data/state
    files do not keep a silent one."""
    store = Store(tmp_path / "s")  # type: ignore[operator]
    d = store.layout.ingest / DIGEST.filename
    d.mkdir(parents=True)
    (d / "data").write_bytes(b"\0" * 10)
    now = time.time()
    (d / "owner").write_bytes(msgspec.json.encode(
        _Owner("elsewhere", "some-boot", 4242, 1.0, beat=now - 5)))
    for f in [*d.iterdir(), d]:
        os.utime(f, (1000, 1000))
    b = ResumableIngest(store.layout, DIGEST, len(DATA), CHUNK)
    assert b.dir != d  # its heartbeat is fresh: alive, whatever the mtimes
    b.drop()
    (d / "owner").write_bytes(msgspec.json.encode(
        _Owner("elsewhere", "some-boot", 4242, 1.0, beat=now - OWNER_TTL - 10)))
    # its heartbeat is its owner file's mtime (set by the writer only): silent as well
    os.utime(d / "owner", (now - OWNER_TTL - 10, now - OWNER_TTL - 10))
    c = ResumableIngest(store.layout, DIGEST, len(DATA), CHUNK)  # other files just written
    assert c.dir == d  # silent longer than the TTL: taken over
    c.drop()
