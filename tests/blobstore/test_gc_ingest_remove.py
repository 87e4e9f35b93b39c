"""GC removes a stale ingest folder through a tombstone (spec/gc.md, item 4): renamed
to ``.gc-<token>`` first, the owner and leases asked again, then deleted; a writer that
adopted it meanwhile gets it back; a failure is reported per entry, never aborts GC.
A lease names a writer's folder only while it exists (it stays small)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore.digest import Digest
from blobstore.gc import GCOptions, gc
from blobstore.ingest import Ingest, remove, scan
from blobstore.lease import Lease, live_leases
from blobstore.store import Store
from tests.blobstore.test_gc_ingest import set_heartbeat
from tests.blobstore.test_ingest_writer import crash

pytestmark = pytest.mark.timeout(120)


def test_remove_puts_back_a_folder_its_writer_holds(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    live = Ingest.new(store.layout)  # a writer that adopted the folder right before
    live.append(b"abc")
    live.checkpoint()
    before = sorted(p.name for p in live.dir.iterdir())
    assert remove(store.layout, live.dir) == "its writer came back"
    assert sorted(p.name for p in live.dir.iterdir()) == before
    assert [p.name for p in store.layout.ingest.iterdir()] == [live.key]  # no tombstone
    live.append(b"def")
    live.digest = Digest.of_bytes(b"abcdef")
    assert live.commit() == Digest.of_bytes(b"abcdef")


def test_remove_puts_back_a_folder_a_lease_names(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    dead = Ingest.new(store.layout)
    crash(dead)
    with Lease(store.layout, "pull") as lease:
        lease.add(ingests={dead.key})  # a pull about to adopt it
        assert remove(store.layout, dead.dir) == "its writer came back"
        assert dead.dir.is_dir()
    assert remove(store.layout, dead.dir) is None
    assert not store.layout.ingest.exists() or list(store.layout.ingest.iterdir()) == []


def test_a_tombstone_left_by_a_crash_is_collected(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    dead = Ingest.new(store.layout)
    dead.append(b"x" * 1000)
    crash(dead)
    tomb = store.layout.ingest / ".gc-0123456789abcdef"
    os.rename(dead.dir, tomb)  # GC died between its rename and its rmtree
    (entry,) = scan(store.layout, live_leases(store.layout))
    assert entry.path == tomb and not entry.held and entry.age(time.time()) > 1e9
    r = gc(store, GCOptions(ingest_grace=3600.0))
    assert str(tomb) in r.removed_ingests and not tomb.exists()


@pytest.mark.skipif(shutil.which("chattr") is None or os.geteuid() != 0,
                    reason="needs chattr and root (an immutable file)")
def test_a_folder_that_cannot_be_removed_is_reported_and_gc_goes_on(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    folders = []
    for _ in range(3):
        ing = Ingest.new(store.layout)
        ing.append(b"y" * 100)
        crash(ing)
        set_heartbeat(ing.dir, time.time() - 10 * 86400)
        folders.append(ing.dir)
    stuck = folders[0] / "stuck"
    stuck.write_bytes(b"")
    if subprocess.run(["chattr", "+i", str(stuck)], check=False).returncode != 0:
        pytest.skip("this filesystem has no immutable flag")
    try:
        r = gc(store, GCOptions(ingest_grace=0.0))
        assert all(not f.exists() for f in folders[1:])
        assert {str(f) for f in folders[1:]} <= set(r.removed_ingests)
        (why,) = [s.reason for s in r.skipped if s.what == str(folders[0])]
        assert "partly removed" in why
        (tomb,) = store.layout.ingest.glob(".gc-*")
    finally:
        for p in store.layout.ingest.glob("*/stuck"):
            subprocess.run(["chattr", "-i", str(p)], check=False)
    r = gc(store, GCOptions(ingest_grace=0.0))  # the next GC finishes it
    assert not tomb.exists() and str(tomb) in r.removed_ingests


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 40), fail_at=st.integers(0, 40))
def test_a_lease_names_only_folders_that_exist(tmp_path_factory: pytest.TempPathFactory,
                                              n: int, fail_at: int) -> None:
    """put_bytes / append writers under one lease (an archive load, an HF adoption): the
    lease names each folder while it exists, and none once they are committed or
    dropped (it does not grow with every file: each add rewrites the whole file)."""
    store = Store(tmp_path_factory.mktemp("s"))
    with Lease(store.layout, "load") as lease:
        for i in range(n):
            if i == fail_at:
                ing = Ingest.new(store.layout, lease=lease)
                ing.append(b"partial")
                assert ing.key in lease.ingests
                ing.drop()
            else:
                store.put_bytes(b"blob %d" % i, lease=lease)
        (info,) = [x for x in live_leases(store.layout) if x.purpose == "load"]
        assert info.ingests == frozenset()
        assert lease.ingests == set()
        assert len(info.digests) == n - (1 if fail_at < n else 0)


@pytest.mark.parametrize("ttl", [60.0, 600.0])
def test_a_foreign_owner_lapses_after_the_gc_lease_ttl(tmp_path: Path, ttl: float) -> None:
    """One setting for leases and ingest owners: GCOptions.lease_ttl."""
    store = Store(tmp_path / "s")
    ing = Ingest.new(store.layout)
    ing.append(b"z" * 100)
    crash(ing)
    set_heartbeat(ing.dir, time.time() - 300, host="elsewhere")  # silent for 300 s
    r = gc(store, GCOptions(ingest_grace=0.0, lease_ttl=ttl))
    assert ing.dir.exists() == (ttl > 300), r.skipped


# ---------------------------------------------------------------------- bytes an ingest frees
# (the tester's repro_ingest_freed.sh: an interrupted HF-cache adoption's hardlink)
def _freeable(folder: Path) -> int:
    """Blocks of the files in ``folder`` whose last link is there."""
    return sum(p.lstat().st_blocks * 512 for p in folder.rglob("*")
               if p.is_file() and p.lstat().st_nlink == 1)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(st.sampled_from(["written", "linked", "linked, source deleted"]),
                      min_size=1, max_size=4),
       dry_run=st.booleans())
def test_an_ingest_linked_to_a_file_outside_frees_nothing(
        tmp_path_factory: pytest.TempPathFactory, kinds: list[str], dry_run: bool) -> None:
    """A dead ingest whose data is a hardlink of a file that keeps another name (an
    interrupted import --hardlink or HF-cache adoption) frees none of those bytes:
    gc's freed_bytes and du's ingest_bytes count a file only where its last link goes."""
    tmp = tmp_path_factory.mktemp("lk")
    store = Store(tmp / "s")
    folders = []
    for i, kind in enumerate(kinds):
        ing = Ingest.new(store.layout)
        if kind == "written":
            ing.append(os.urandom(50_000))
        crash(ing)
        if kind != "written":
            source = tmp / f"cache-{i}.gguf"
            source.write_bytes(os.urandom(50_000))
            ing.data_path.unlink()
            os.link(source, ing.data_path)
            if kind == "linked, source deleted":
                source.unlink()
        set_heartbeat(ing.dir, 1000.0)
        folders.append(ing.dir)
    expect = sum(_freeable(f) for f in folders)
    assert store.disk_usage().ingest_bytes == expect
    r = gc(store, GCOptions(grace=0, ingest_grace=0, dry_run=dry_run))
    assert sorted(r.removed_ingests) == sorted(str(f) for f in folders)
    assert r.freed_bytes == expect
