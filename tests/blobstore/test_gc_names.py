"""A blob under both of Ollama's names (``sha256-<hex>`` and the legacy ``sha256:<hex>``):
one blob for GC, ``du`` and ``rm`` (spec/gc.md, "Bytes"). Found from outside."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore.digest import Digest
from blobstore.errors import CapNotMet
from blobstore.gc import GCOptions, gc
from blobstore.store import Store
from tests.blobstore.gcutil import add_model, digest_of, held

LATER = time.time() + 10 * 86400


def legacy_copy(store: Store, d: Digest, *, hardlink: bool = False) -> Path:
    """Put the blob ``d`` under Ollama's legacy name too (a copy, or a hardlink)."""
    src, dst = store.layout.blob(d), store.layout.legacy_blob(d)
    if hardlink:
        os.link(src, dst)
    else:
        shutil.copyfile(src, dst)
    return dst


@pytest.mark.timeout(60)
@pytest.mark.parametrize("held_name", ["canonical", "legacy"])
def test_a_model_mapped_under_either_name_is_kept(tmp_path: Path, held_name: str) -> None:
    """Found from outside: the model blob existed under both names and a process mapped
    one; GC kept only the name it scanned last, so when the other was mapped the model
    was evicted, the mapped copy left unreferenced, and the report claimed both freed."""
    store = Store(tmp_path / "s")
    add_model(store, "served", [b"w" * 50_000], used=1)
    add_model(store, "idle", [b"i" * 50_000], used=2)
    d = digest_of(b"w" * 50_000)
    legacy = legacy_copy(store, d)
    path = legacy if held_name == "legacy" else store.layout.blob(d)
    with held(path) as proc:
        with pytest.raises(CapNotMet) as exc:
            gc(store, GCOptions(max_size=0), now=LATER)
        report = exc.value.report  # type: ignore[attr-defined]
        assert [e.name.display() for e in store.list_models()] == ["served:latest"]
        assert [s.reason for s in report.skipped if s.kind == "model"] == [
            f"in use by python[{proc.pid}]"]
        assert store.layout.blob(d).exists() and legacy.exists()
        # the report adds up: what went is what the store lost
        assert report.total_bytes_before - report.freed_bytes == report.total_bytes_after
        assert "changed while GC ran" not in report.cap_reason


# which names each blob has: the current one, the legacy one, both as two copies, both
# as two names of one file
SHAPES = ["canonical", "legacy", "copies", "hardlinks"]


def make_orphans(root: Path, shapes: list[str]) -> tuple[Store, int, list[Digest]]:
    """Unreferenced blobs of 1000·(i+1) bytes in the given shapes; their bytes on disk."""
    store = Store(root)
    on_disk, digests = 0, []
    for i, shape in enumerate(shapes):
        data = bytes([i]) * (1000 * (i + 1))
        d = store.put_bytes(data)
        digests.append(d)
        if shape in ("copies", "hardlinks"):
            legacy_copy(store, d, hardlink=shape == "hardlinks")
        elif shape == "legacy":
            os.rename(store.layout.blob(d), store.layout.legacy_blob(d))
        on_disk += len(data) * (2 if shape == "copies" else 1)
    return store, on_disk, digests


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes=st.lists(st.sampled_from(SHAPES), min_size=1, max_size=6))
def test_gc_and_du_count_bytes_on_disk_and_remove_every_name(shapes: list[str]) -> None:
    """Found from outside: six blobs under both names, unreferenced; GC removed only one
    name of each (the legacy copies stayed until a second GC) while reporting all freed,
    and ``du`` counted each digest once while GC counted both copies."""
    root = Path(tempfile.mkdtemp(prefix="blobctl-names-"))
    try:
        store, on_disk, digests = make_orphans(root / "s", shapes)
        try:
            assert store.disk_usage().total_bytes == on_disk
            dry = gc(store, GCOptions(dry_run=True), now=LATER)
            assert dry.total_bytes_before == on_disk
            assert sorted(dry.removed_blobs) == sorted(str(d) for d in digests)
            r = gc(store, GCOptions(), now=LATER)
            assert r.total_bytes_before == on_disk == r.freed_bytes == dry.freed_bytes
            assert sorted(r.removed_blobs) == sorted(str(d) for d in digests)
            assert r.total_bytes_after == 0
            assert list(store.layout.blobs.iterdir()) == []
            assert store.disk_usage().total_bytes == 0
        finally:
            store.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("shape", ["copies", "hardlinks"])
def test_rm_lists_a_blob_with_both_names_once(tmp_path: Path, shape: str) -> None:
    """Found from outside: ``rm --json`` listed such a digest twice in removed_blobs."""
    store = Store(tmp_path / "s")
    name = add_model(store, "m", [b"m" * 4000])
    d = digest_of(b"m" * 4000)
    legacy_copy(store, d, hardlink=shape == "hardlinks")
    r = store.remove_model(name)
    assert r.removed_blobs.count(d) == 1
    assert not store.layout.blob(d).exists() and not store.layout.legacy_blob(d).exists()
    config_bytes = len(b'{"model":"m"}')
    assert r.freed_bytes == 4000 * (2 if shape == "copies" else 1) + config_bytes


def move_away(store: Store, d: Digest, where: Path) -> Path:
    """Move blob ``d`` to another folder and link it back (spec/store-layout.md)."""
    where.mkdir(exist_ok=True)
    target = where / d.filename
    shutil.move(store.layout.blob(d), target)
    os.symlink(target, store.layout.blob(d))
    return target


@pytest.mark.timeout(60)
def test_a_symlinked_blob_counts_is_collected_and_kept_while_used(tmp_path: Path) -> None:
    """Found from outside: GC and du ignored blobs that are symlinks: an unreferenced one
    was never collected, du left its bytes out, eviction math ignored them. Now the link
    is the blob at its target's size; GC removes the link (never the target: freed 0),
    and a process using the blob through its link keeps its model."""
    store = Store(tmp_path / "s")
    add_model(store, "big", [b"B" * 30_000], used=1)
    add_model(store, "small", [b"s" * 1000], used=2)
    orphan = store.put_bytes(b"o" * 5000)
    big = digest_of(b"B" * 30_000)
    elsewhere = tmp_path / "other-disk"
    target = move_away(store, big, elsewhere)
    orphan_target = move_away(store, orphan, elsewhere)
    usage = store.disk_usage()
    assert usage.unreferenced_bytes == 5000
    assert usage.total_bytes == 30_000 + 1000 + 5000 + len(b'{"model":"big"}{"model":"small"}')
    with held(target) as proc:  # mapped through the link: the model stays
        with pytest.raises(CapNotMet) as exc:
            gc(store, GCOptions(max_size=0), now=LATER)
        r = exc.value.report  # type: ignore[attr-defined]
        assert [e.name.display() for e in store.list_models()] == ["big:latest"]
        assert f"in use by python[{proc.pid}]" in {s.reason for s in r.skipped}
        assert str(orphan) in r.removed_blobs
        assert not store.layout.blob(orphan).is_symlink()  # the link went
        assert orphan_target.exists()  # its target is the user's to remove
        assert store.layout.blob(big).is_symlink() and target.exists()
    r = gc(store, GCOptions(max_size=0), now=LATER)
    assert r.removed_models == ["registry.ollama.ai/library/big:latest"]
    assert not os.path.lexists(store.layout.blob(big)) and target.exists()
    assert r.freed_bytes == len(b'{"model":"big"}')  # the target's bytes stay on disk
    assert r.total_bytes_before - r.total_bytes_after == 30_000 + len(b'{"model":"big"}')


def test_a_blob_with_a_hardlink_outside_frees_nothing(tmp_path: Path) -> None:
    """Found from outside: after ``link --hardlink`` GC evicted the model and counted its
    blob's bytes as freed, though the inode lives on under the link."""
    store = Store(tmp_path / "s")
    add_model(store, "m", [b"m" * 20_000], used=1)
    os.link(store.layout.blob(digest_of(b"m" * 20_000)), tmp_path / "m.gguf")
    dry = gc(store, GCOptions(max_size=0, dry_run=True), now=LATER)
    r = gc(store, GCOptions(max_size=0), now=LATER)
    assert r.removed_models == ["registry.ollama.ai/library/m:latest"]
    assert r.freed_bytes == dry.freed_bytes == len(b'{"model":"m"}')
    assert r.total_bytes_before == 20_000 + len(b'{"model":"m"}') and r.total_bytes_after == 0
    assert (tmp_path / "m.gguf").stat().st_size == 20_000
