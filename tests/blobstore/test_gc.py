from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from blobstore.errors import CapNotMet
from blobstore.gc import GCOptions, auto_gc, gc
from blobstore.lease import Lease
from blobstore.name import ModelName
from blobstore.store import Store
from tests.blobstore.gcutil import add_model, assert_no_missing_blobs, blob_total, digest_of

LATER = time.time() + 10 * 86400  # "now" for GC: everything is past every grace period
MB = 1 << 20


def names(store: Store) -> set[str]:
    return {e.name.display() for e in store.list_models()}


def test_sweeps_unreferenced_keeps_referenced(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    add_model(store, "keep", [b"k" * 100])
    orphan = store.put_bytes(b"o" * 50)
    r = gc(store, GCOptions(), now=LATER)
    assert r.removed_blobs == [str(orphan)] and r.freed_bytes == 50
    assert not store.has_blob(orphan)
    assert_no_missing_blobs(store)


def test_grace_protects_young_blobs(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    orphan = store.put_bytes(b"young")
    r = gc(store, GCOptions())  # real now: the blob is seconds old
    assert store.has_blob(orphan)
    assert any(s.reason == "younger than the grace period" for s in r.skipped)
    gc(store, GCOptions(grace=0))
    assert not store.has_blob(orphan)


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    add_model(store, "a", [b"a" * 100], used=1000)
    add_model(store, "b", [b"b" * 100], used=2000)
    store.put_bytes(b"orphan")
    before = sorted(p.name for p in store.layout.blobs.iterdir())
    r = gc(store, GCOptions(max_size=150, dry_run=True), now=LATER)
    assert r.removed_models == ["registry.ollama.ai/library/a:latest"]
    assert len(r.removed_blobs) == 3
    assert sorted(p.name for p in store.layout.blobs.iterdir()) == before
    assert names(store) == {"a:latest", "b:latest"}


def test_lru_eviction_under_cap(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    add_model(store, "old", [b"1" * MB], used=1000)
    add_model(store, "mid", [b"2" * MB], used=2000)
    add_model(store, "new", [b"3" * MB], used=3000)
    r = gc(store, GCOptions(max_size=2 * MB + 1000), now=LATER)
    assert r.removed_models == ["registry.ollama.ai/library/old:latest"]
    assert names(store) == {"mid:latest", "new:latest"}
    assert r.total_bytes_after == blob_total(store) <= 2 * MB + 1000
    gc(store, GCOptions(max_size=MB + 100), now=LATER)
    assert names(store) == {"new:latest"}
    assert_no_missing_blobs(store)


def test_never_used_models_fall_back_to_manifest_mtime(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    a = add_model(store, "a", [b"1" * MB])
    b = add_model(store, "b", [b"2" * MB])
    os.utime(store.find_manifest_path(a), (5000, 5000))  # type: ignore[arg-type]
    os.utime(store.find_manifest_path(b), (4000, 4000))  # type: ignore[arg-type]
    for d in store.list_models():  # model blob atimes are older still
        layer = d.manifest.model_layer()  # type: ignore[union-attr]
        os.utime(store.blob_path(layer.digest), (100, 100))  # type: ignore[union-attr]
    gc(store, GCOptions(max_size=MB + 100), now=LATER)
    assert names(store) == {"a:latest"}


def test_pinned_never_evicted_and_cap_error(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    add_model(store, "pinned", [b"p" * MB], used=1)
    add_model(store, "other", [b"o" * MB], used=2)
    store.set_pinned(ModelName.parse("pinned"), True)
    with pytest.raises(CapNotMet) as exc:
        gc(store, GCOptions(max_size=MB // 2), now=LATER)
    assert "pinned" in exc.value.message and "over" in exc.value.message
    assert names(store) == {"pinned:latest"}  # it still evicted what it could
    assert_no_missing_blobs(store)


def test_dedupe_aware_victims(tmp_path: Path) -> None:
    """Evicting a model whose blobs are all shared frees nothing: it is passed over."""
    store = Store(tmp_path / "s")
    shared = b"s" * (4 * MB)
    cfg = b'{"same":"config"}'
    add_model(store, "alias", [shared], config=cfg, used=1000)       # oldest, shares all
    add_model(store, "base", [shared], config=cfg, used=2000)
    add_model(store, "small", [b"x" * MB], used=1500)
    # cap needs 1 MiB freed: LRU order is alias, small, base; alias frees nothing
    r = gc(store, GCOptions(max_size=4 * MB + 100), now=LATER)
    assert r.removed_models == ["registry.ollama.ai/library/small:latest"]
    assert names(store) == {"alias:latest", "base:latest"}
    # now a cap that needs the shared blob: both of its users must go
    gc(store, GCOptions(max_size=100), now=LATER)
    assert names(store) == set()
    assert blob_total(store) == 0


def test_older_than(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    add_model(store, "stale", [b"a"], used=LATER - 40 * 86400)
    add_model(store, "fresh", [b"b"], used=LATER - 86400)
    gc(store, GCOptions(older_than=30 * 86400), now=LATER)
    assert names(store) == {"fresh:latest"}


def test_lease_protects_blobs(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    d = store.put_bytes(b"being pulled")
    with Lease(store.layout, "test", digests={d}):
        r = gc(store, GCOptions(), now=LATER)
        assert store.has_blob(d)
        assert any(s.reason == "held by a running test" for s in r.skipped)
    gc(store, GCOptions(), now=LATER)
    assert not store.has_blob(d)


def test_dead_process_lease_lapses(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    d = store.put_bytes(b"orphaned by a crash")
    code = textwrap.dedent(f"""
        import os
        from blobstore.store import Store
        from blobstore.lease import Lease
        from blobstore.digest import Digest
        s = Store({str(store.root)!r})
        Lease(s.layout, "crashy", digests={{Digest.parse({str(d)!r})}}).acquire()
        os._exit(0)   # dies holding the lease
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
    assert list(store.layout.leases.iterdir())
    gc(store, GCOptions(), now=LATER)
    assert not store.has_blob(d)
    assert not list(store.layout.leases.iterdir())  # the dead process's lease file too


def test_stale_and_live_ingests(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    stale = store.layout.ingest / "put-1-abc.tmp"
    stale.write_bytes(b"x" * 5000)
    os.utime(stale, (1000, 1000))
    partial = store.layout.blobs / ("sha256-" + "c" * 64 + "-partial")
    partial.write_bytes(b"y" * 10)
    os.utime(partial, (1000, 1000))
    resumable = store.layout.ingest / ("sha256-" + "d" * 64)
    resumable.mkdir()
    (resumable / "data").write_bytes(b"z")
    os.utime(resumable / "data", (1000, 1000))
    os.utime(resumable, (1000, 1000))
    # an old mtime is no proof of idleness: a file just renamed or linked into the
    # ingest area keeps the user's old mtime; its ctime says when it last changed
    r = gc(store, GCOptions())
    assert stale.exists() and partial.exists() and resumable.exists()
    assert not r.removed_ingests
    day_later = time.time() + 86400 + 60
    held_open = store.layout.ingest / "put-2-def.tmp"
    held_open.write_bytes(b"new")
    with Lease(store.layout, "pull", ingests={resumable.name}), open(held_open, "rb"):
        r = gc(store, GCOptions(), now=day_later)
        assert not stale.exists() and not partial.exists() and resumable.exists()
        assert held_open.exists()  # this very process has it open
        assert len(r.removed_ingests) == 2
        assert any(s.reason == "open by a running process" for s in r.skipped)
    gc(store, GCOptions(), now=day_later)
    assert not resumable.exists() and not held_open.exists()


def test_undecodable_manifest_keeps_what_it_names(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    d = store.put_bytes(b"weights of a model in a format we do not know")
    weird = store.layout.manifests / "registry.ollama.ai" / "library" / "future" / "latest"
    weird.parent.mkdir(parents=True)
    weird.write_bytes(b'{"schemaVersion":3,"weird":["' + str(d).encode() + b'"]}')
    with pytest.raises(CapNotMet):
        gc(store, GCOptions(max_size=0), now=LATER)
    assert store.has_blob(d) and weird.exists()


def test_auto_gc_uses_store_setting(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    assert auto_gc(store) is None
    add_model(store, "a", [b"1" * MB], used=1)
    store.set_config("max-size", "100")
    with pytest.raises(CapNotMet):  # "a" is younger than the grace period
        auto_gc(store)
    for e in store.list_models():
        os.utime(e.path, (1000, 1000))
    for _d, p, _ in list(store.iter_blob_files()):
        os.utime(p, (1000, 1000))
    r = auto_gc(store)
    assert r is not None and r.max_size == 100


MMAP_HOLDER = """
import mmap, sys, time
f = open(sys.argv[1], "rb")
m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
f.close()                    # only the mapping keeps it in use
print("mapped", flush=True)
time.sleep(60)
"""


def test_mmapped_blob_is_never_deleted(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    name = add_model(store, "served", [b"w" * MB], used=1)
    add_model(store, "idle", [b"i" * MB], used=2)
    path = store.resolve(name, record=False).model_path
    proc = subprocess.Popen([sys.executable, "-c", MMAP_HOLDER, str(path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "mapped"
        with pytest.raises(CapNotMet) as exc:
            gc(store, GCOptions(max_size=0), now=LATER)
        assert "in use" in exc.value.message
        assert names(store) == {"served:latest"}
        skipped = [s for s in exc.value.report.skipped if s.kind == "model"]  # type: ignore[attr-defined]
        assert f"[{proc.pid}]" in skipped[0].reason
        assert path is not None and path.exists()
    finally:
        proc.kill()
        proc.wait()
    gc(store, GCOptions(max_size=0), now=LATER)
    assert names(store) == set()


KILLER = """
import os, signal, sys, time
from blobstore.store import Store
from blobstore.gc import GCOptions, gc
step = sys.argv[2]; count = int(sys.argv[3]); seen = [0]
import threading
lock = threading.Lock()
def hook(s):
    if s == step:
        with lock:  # hooks may run on several threads (parallel unlinks)
            seen[0] += 1
            if seen[0] >= count:
                os.kill(os.getpid(), signal.SIGKILL)
gc(Store(sys.argv[1]), GCOptions(max_size=int(sys.argv[4])), now=time.time() + 864000, hook=hook)
"""


@pytest.mark.parametrize(("step", "count"), [
    ("intent-written", 1), ("manifest-removed", 1), ("manifest-removed", 2),
    ("blob-removed", 1), ("blob-removed", 3),
])
def test_sigkill_during_gc_leaves_consistent_store(tmp_path: Path, step: str, count: int) -> None:
    store = Store(tmp_path / "s")
    shared = b"shared" * 1000
    for i in range(4):
        add_model(store, f"m{i}", [shared, bytes([i]) * 50_000], used=1000 + i)
    p = subprocess.run([sys.executable, "-c", KILLER, str(store.root), step, str(count),
                        "60000"], cwd=Path(__file__).parents[2])
    assert p.returncode == -9
    assert_no_missing_blobs(store)
    assert store.layout.gc_intent.exists()
    r = gc(store, GCOptions(max_size=60000), now=LATER)
    assert r.finished_intent
    assert not store.layout.gc_intent.exists()
    assert_no_missing_blobs(store)
    assert blob_total(store) <= 60000
    assert names(store) == {"m3:latest"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("after", ["nothing", "written again", "linked again",
                                   "ollama downloads"])
def test_finishing_a_killed_gc_keeps_a_blob_come_back_or_ollamas(tmp_path: Path,
                                                                  after: str) -> None:
    """Found from outside: a GC killed right after its intent record listed an orphan
    blob; then the blob came back (an upload landing it again before its manifest PUT,
    an import linking it) or an Ollama download started. The next plain gc finished the
    intent and deleted the blob, which its own plan keeps (``--grace``; no unreferenced
    blob goes while Ollama downloads: spec/gc.md, "Never deleted")."""
    store = Store(tmp_path / "s")
    add_model(store, "kept", [b"weights" * 1000])
    data = b"an orphan layer" * 1000
    blob = store.layout.blob(digest_of(data))
    blob.write_bytes(data)
    p = subprocess.run([sys.executable, "-c", KILLER, str(store.root), "intent-written",
                        "1", str(10**12)], cwd=Path(__file__).parents[2])
    assert p.returncode == -9 and store.layout.gc_intent.exists()
    assert str(digest_of(data)) in store.layout.gc_intent.read_text()
    time.sleep(0.05)  # (what follows is later than the record, on any clock resolution)
    if after == "written again":
        blob.unlink()
        blob.write_bytes(data)
    elif after == "linked again":  # a file of the same bytes made before the record
        blob.unlink()           # (its mtime says so, its ctime not), linked in
        source = tmp_path / "cache-file"
        source.write_bytes(data)
        os.utime(source, (time.time() - 1800,) * 2)
        os.link(source, blob)
    elif after == "ollama downloads":
        os.utime(blob, (time.time() - 3 * 3600,) * 2)  # (the plan would remove it)
        partial = store.layout.blobs / f"{digest_of(b'big').filename}-partial"
        partial.write_bytes(b"\0" * 4096)
    r = gc(Store(store.root), GCOptions())
    assert r.finished_intent and not store.layout.gc_intent.exists()
    assert blob.exists() == (after != "nothing"), r
    assert_no_missing_blobs(store)
    if after == "ollama downloads":
        reasons = [s.reason for s in r.skipped if s.what == str(digest_of(data))]
        assert len(reasons) == 1 and reasons[0].startswith("an Ollama download is running")
        assert r.ollama_kept_blobs == 1


@pytest.mark.timeout(60)
def test_finishing_a_killed_gc_sees_an_ollama_download_begun_while_it_waited(
        tmp_path: Path) -> None:
    """Found by review: the finishing step took Ollama's downloads from the plan, made
    before the store lock was taken; an Ollama pull that began while GC waited for the
    lock (it takes none) was not seen, and a blob it was about to name went."""
    import threading

    store = Store(tmp_path / "s")
    data = b"an orphan layer" * 1000
    blob = store.layout.blob(digest_of(data))
    blob.write_bytes(data)
    os.utime(blob, (time.time() - 3 * 3600,) * 2)
    p = subprocess.run([sys.executable, "-c", KILLER, str(store.root), "intent-written",
                        "1", str(10**12)], cwd=Path(__file__).parents[2])
    assert p.returncode == -9 and store.layout.gc_intent.exists()
    partial = store.layout.blobs / f"{digest_of(b'big').filename}-partial"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from blobstore.store import Store; "
         "l = Store(sys.argv[1]).lock(); l.__enter__(); print('held', flush=True); "
         "sys.stdin.readline()", str(store.root)],
        cwd=Path(__file__).parents[2], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True)
    result: list[object] = []
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        t = threading.Thread(target=lambda: result.append(
            gc(Store(store.root), GCOptions(lock_timeout=30))))
        t.start()
        time.sleep(1.0)  # GC has planned (a few ms) and waits for the lock
        partial.write_bytes(b"\0" * 8192)  # an Ollama pull begins
    finally:
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait(10)
    t.join(30)
    assert result, "gc did not end"
    assert blob.exists(), result
    assert_no_missing_blobs(store)


def test_finishing_a_killed_gc_rechecks_what_changed_since(tmp_path: Path) -> None:
    """A GC killed right after its intent record: before the next GC, one listed model
    is pinned, one used, one has its blob mapped by a running process, one is imported
    again (same bytes, a new file). The next plain GC finishes the intent, but only as
    the killed GC's own apply would have: those four stay, the others go."""
    store = Store(tmp_path / "s")
    models = [add_model(store, f"m{i}", [bytes([i]) * 50_000], used=1000 + i)
              for i in range(6)]
    p = subprocess.run([sys.executable, "-c", KILLER, str(store.root), "intent-written",
                        "1", "0"], cwd=Path(__file__).parents[2])
    assert p.returncode == -9 and store.layout.gc_intent.exists()
    store = Store(store.root)
    store.set_pinned(models[0], True)
    store.record_use(models[1])
    blob = store.layout.blob(digest_of(bytes([2]) * 50_000))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import mmap,sys,time; f=open(sys.argv[1],'rb'); "
         "m=mmap.mmap(f.fileno(),0,prot=mmap.PROT_READ); print('ok',flush=True); "
         "time.sleep(60)", str(blob)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ok"
        time.sleep(0.01)
        add_model(store, "m3", [bytes([3]) * 50_000])  # the same bytes, a new file
        r = gc(store, GCOptions(), now=LATER)
    finally:
        holder.kill()
        holder.wait()
    assert r.finished_intent and not store.layout.gc_intent.exists()
    assert names(store) == {"m0:latest", "m1:latest", "m2:latest", "m3:latest"}
    assert sorted(r.removed_models) == ["registry.ollama.ai/library/m4:latest",
                                        "registry.ollama.ai/library/m5:latest"]
    reasons = {s.what: s.reason for s in r.skipped if s.kind == "model"}
    assert reasons["registry.ollama.ai/library/m0:latest"] == "pinned"
    assert reasons["registry.ollama.ai/library/m1:latest"].startswith("used since")
    assert reasons["registry.ollama.ai/library/m2:latest"].startswith("in use by")
    assert reasons["registry.ollama.ai/library/m3:latest"].startswith("changed since")
    assert_no_missing_blobs(store)
    assert store.is_pinned(models[0])
    library = store.layout.manifests / "registry.ollama.ai" / "library"
    assert sorted(p.name for p in library.iterdir()) == ["m0", "m1", "m2", "m3"]  # pruned


def test_manifest_at_an_invalid_path_is_kept_with_its_blobs(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    d = store.put_bytes(b"weights someone put under an odd name")
    odd = store.layout.manifests / "-odd-host" / "ns" / "m" / "t"
    odd.parent.mkdir(parents=True)
    odd.write_bytes(b'{"schemaVersion":2,"config":{"mediaType":"x","digest":"' + str(d).encode()
                    + b'","size":1},"layers":[]}')
    gc(store, GCOptions(), now=LATER)
    assert store.has_blob(d) and odd.exists()


def test_index_is_used_and_never_trusted_for_a_rewritten_manifest(tmp_path: Path) -> None:
    """gc reads summaries from the manifest index, but a rewrite (new ctime) is re-read."""
    store = Store(tmp_path / "s")
    add_model(store, "m", [b"old layer"], used=1)
    time.sleep(2.1)      # past the racy window: the summary taken now will be trusted
    store.list_models()  # fills the index
    # rewrite the manifest in place to reference a different blob (as another tool might)
    new = store.put_bytes(b"new layer")
    path = store.find_manifest_path(ModelName.parse("m"))
    assert path is not None
    raw = path.read_bytes().replace(str(digest_of(b"old layer")).encode(), str(new).encode())
    path.write_bytes(raw)
    gc(store, GCOptions(), now=LATER)
    assert store.has_blob(new)
    assert_no_missing_blobs(store)


def test_large_eviction_rechecks_each_manifest_on_many_threads(tmp_path: Path) -> None:
    """Hundreds of victims take the threaded removal paths; a manifest rewritten and a
    model used between plan and apply are kept with their blobs, all else goes."""
    store = Store(tmp_path / "s")
    shared = b"shared by everyone" * 10
    models = [add_model(store, f"ns{i % 3}/m{i}", [shared, b"own %d" % i * 20],
                        used=1000 + i) for i in range(300)]
    survivor = add_model(store, "ns0/survivor", [shared, b"survivor"], used=10**9)
    store.set_pinned(survivor, True)
    rewritten, used = models[5], models[7]
    rewritten_path = store.find_manifest_path(rewritten)
    assert rewritten_path is not None
    # the rewrite below swaps a digest and keeps its size: the new layer has that size
    extra = store.put_bytes(b"layer added by another tool".ljust(len(b"own 5" * 20), b"."))

    def hook(step: str) -> None:
        if step == "intent-written":  # under the lock, after planning
            raw = rewritten_path.read_bytes().replace(
                str(digest_of(b"own 5" * 20)).encode(), str(extra).encode())
            rewritten_path.write_bytes(raw)
            store.record_use(used, when=LATER + 1)

    with pytest.raises(CapNotMet) as exc:  # the pinned model alone is over 1 byte
        gc(store, GCOptions(max_size=1), now=LATER, hook=hook)
    r = exc.value.report  # type: ignore[attr-defined]
    assert names(store) == {"ns0/survivor:latest", "ns2/m5:latest", "ns1/m7:latest"}
    kept = {s.what for s in r.skipped if s.reason == "changed or used during gc"}
    assert kept == {str(rewritten), str(used)}
    assert len(r.removed_models) == 298
    assert r.removed_models == sorted(r.removed_models, key=lambda n: int(n.split("/m")[1][:-7]))
    assert store.has_blob(extra) and store.has_blob(digest_of(b"own 7" * 20))
    assert not store.has_blob(digest_of(b"own 5" * 20))  # named by nothing any more
    assert not any(store.has_blob(digest_of(b"own %d" % i * 20)) for i in range(8, 300))
    assert_no_missing_blobs(store)
    # the folders the evictions emptied are gone; the others stay
    top = store.layout.manifests / "registry.ollama.ai"
    assert {p.relative_to(top).as_posix() for p in top.glob("*/*")} == {
        "ns0/survivor", "ns2/m5", "ns1/m7"}
    assert r.removed_dirs == 298


def test_cap_reason_counts_what_a_pinned_model_keeps_after_evictions(tmp_path: Path) -> None:
    """A big blob shared by a pinned model and an evicted one is the pinned model's
    alone once the other goes: the reason must count it."""
    store = Store(tmp_path / "s")
    big = b"w" * 100_000
    keep = add_model(store, "keep", [big], used=2000)
    add_model(store, "other", [big, b"o" * 10], used=1000)
    store.set_pinned(keep, True)
    with pytest.raises(CapNotMet) as exc:
        gc(store, GCOptions(max_size=1), now=LATER)
    assert names(store) == {"keep:latest"}
    reason = exc.value.report.cap_reason  # type: ignore[attr-defined]
    assert reason == "100 KB pinned"  # the shared 100 000 B blob plus its config


def test_cap_reason_names_a_lease_that_holds_unreferenced_blobs(tmp_path: Path) -> None:
    """Found from outside: blobs kept by a running pull's lease were reported as "0 B
    needed by models that cannot be evicted"."""
    store = Store(tmp_path / "s")
    with Lease(store.layout, "test pull") as lease:
        store.put_bytes(b"p" * 50_000, lease=lease)
        with pytest.raises(CapNotMet) as exc:
            gc(store, GCOptions(max_size=0), now=LATER)
    reason = exc.value.report.cap_reason  # type: ignore[attr-defined]
    assert reason == "50 KB held by a running test pull", reason


def test_removing_one_case_variant_keeps_the_other_s_pin(tmp_path: Path) -> None:
    """Two manifests whose names differ only in case (Ollama, or a copy between stores,
    can make them) share one state row, since state is keyed case-insensitively. Removing
    one of them, by rm or by gc, must not drop the pin of the other (found from outside:
    gc then evicted the pinned model)."""
    store = Store(tmp_path / "s")
    upper = add_model(store, "Foo:Bar", [b"u" * 50_000], used=1000)
    lower = add_model(store, "tmp:x", [b"l" * 50_000], used=1000)
    src = store.find_manifest_path(lower)
    assert src is not None
    dst = store.layout.manifests / "registry.ollama.ai" / "library" / "foo" / "bar"
    dst.parent.mkdir(parents=True)
    src.rename(dst)
    store.set_pinned(upper, True)
    exact_lower = ModelName("registry.ollama.ai", "library", "foo", "bar")
    assert store.find_manifest_path(exact_lower) == dst
    store.remove_model(exact_lower, force=True)
    assert not dst.exists() and store.find_manifest_path(upper) is not None
    assert store.is_pinned(upper)
    with pytest.raises(CapNotMet):
        gc(store, GCOptions(max_size=0, grace=0), now=LATER)
    assert names(store) == {"Foo:Bar"} and store.is_pinned(upper)


@pytest.mark.timeout(60)
def test_a_gc_that_planned_before_another_ran_reports_what_is_left(tmp_path: Path) -> None:
    """Two `gc --max-size` at once (found from outside): the second planned while the
    first held the lock, found its victims gone, and still reported the bytes of its
    snapshot, failing with CapNotMet on a store that was empty. The total after GC is
    what is there under the lock, not the plan's arithmetic."""
    import threading

    store = Store(tmp_path / "s")
    add_model(store, "a:1", [b"a" * MB], used=1)
    add_model(store, "b:1", [b"b" * MB], used=2)
    outcome: list[object] = []

    def second() -> None:
        try:
            outcome.append(gc(Store(tmp_path / "s"), GCOptions(max_size=1000), now=LATER))
        except Exception as exc:
            outcome.append(exc)

    with store.lock():  # the first GC holds the lock; the second plans, then waits
        t = threading.Thread(target=second)
        t.start()
        time.sleep(1.0)  # its snapshot and plan take milliseconds; then it waits here
        first = gc(store, GCOptions(max_size=1000), now=LATER)
    t.join(30)
    assert first.removed_models and first.cap_met
    assert len(outcome) == 1 and not isinstance(outcome[0], Exception), outcome
    report = outcome[0]
    assert report.cap_met, report  # type: ignore[attr-defined]
    assert report.total_bytes_after == blob_total(store) <= 1000  # type: ignore[attr-defined]
