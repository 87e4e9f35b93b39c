from __future__ import annotations

import io
import multiprocessing
import os
import stat
from pathlib import Path

import pytest

from blobstore.digest import Digest
from blobstore.errors import (
    DigestMismatch,
    ModelNotFound,
    SizeMismatch,
    StoreDamaged,
)
from blobstore.manifest import Manifest
from blobstore.name import ModelName
from blobstore.store import Store
from tests.helpers import OllamaFixture, sha256_hex


def ingest_files(store: Store) -> list[str]:
    return [p.name for p in store.layout.ingest.iterdir()] if store.layout.ingest.exists() else []


def test_put_blob_is_verified_and_read_only(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    data = os.urandom(3 << 20)
    d = store.put_blob(io.BytesIO(data))
    assert d == Digest("sha256", sha256_hex(data))
    p = store.blob_path(d)
    assert p.read_bytes() == data and p.name == f"sha256-{d.hex}"
    assert not stat.S_IMODE(p.stat().st_mode) & 0o222
    assert ingest_files(store) == []


def test_put_blob_digest_mismatch_leaves_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    wrong = Digest("sha256", "0" * 64)
    with pytest.raises(DigestMismatch) as exc:
        store.put_blob(io.BytesIO(b"hello"), expected=wrong, source="test")
    assert "0" * 64 in exc.value.message and "test" in exc.value.message
    assert not store.has_blob(wrong)
    assert list(store.layout.blobs.iterdir()) == []
    assert ingest_files(store) == []


@pytest.mark.parametrize("size", [4, 6])
def test_put_blob_size_mismatch_leaves_nothing(tmp_path: Path, size: int) -> None:
    store = Store(tmp_path / "s")
    with pytest.raises(SizeMismatch):
        store.put_blob(io.BytesIO(b"hello"), size=size)
    assert list(store.layout.blobs.iterdir()) == []
    assert ingest_files(store) == []


def test_list_matches_what_ollama_list_shows(ollama_fx: OllamaFixture) -> None:
    store = Store(ollama_fx.root, create=False)
    got = {e.name.display(): (e.manifest.digest.short, e.manifest.size)  # type: ignore[union-attr]
           for e in store.list_models()}
    want = {m.display: (m.id, m.size) for m in ollama_fx.models.values()}
    assert got == want


def test_list_newest_first_and_skips_bad_paths(ollama_fx: OllamaFixture) -> None:
    (ollama_fx.root / "manifests" / "-badhost" / "x" / "y").mkdir(parents=True)
    (ollama_fx.root / "manifests" / "-badhost" / "x" / "y" / "z").write_bytes(b"{}")
    (ollama_fx.root / "manifests" / "h" / "n" / "m" / "broken").parent.mkdir(parents=True)
    (ollama_fx.root / "manifests" / "h" / "n" / "m" / "broken").write_bytes(b"not json")
    entries = Store(ollama_fx.root, create=False).list_models()
    names = [e.name.display() for e in entries]
    assert "h/n/m:broken" in names and not any("bad" in n for n in names)
    broken = next(e for e in entries if e.name.tag == "broken")
    assert broken.manifest is None and broken.error
    mtimes = [e.mtime for e in entries]
    assert mtimes == sorted(mtimes, reverse=True)


def test_case_insensitive_lookup_and_legacy_blob(ollama_fx: OllamaFixture) -> None:
    store = Store(ollama_fx.root)
    m = ollama_fx.models["hf.co/bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M"]
    r = store.resolve(ModelName.parse("HF.CO/Bartowski/qwen2.5-0.5b-instruct-gguf:q4_k_m"))
    assert r.model_path == ollama_fx.root / "blobs" / m.model_digest  # legacy "sha256:" name
    assert r.model_path is not None and r.model_path.exists()


def test_resolve_records_use_and_rm_keeps_shared(ollama_fx: OllamaFixture) -> None:
    store = Store(ollama_fx.root)
    llama = ollama_fx.models["llama3:8b"]
    r = store.resolve(ModelName.parse("llama3:8b"))
    assert r.model_path == ollama_fx.blob_path(llama.model_digest)
    assert store.state is not None
    assert store.state.get(ModelName.parse("llama3:8b")).use_count == 1

    res = store.remove_model(ModelName.parse("terse"))
    # only the system prompt and config were terse's own
    assert len(res.removed_blobs) == 2 and len(res.kept_shared) == 3
    assert not (ollama_fx.root / "manifests/registry.ollama.ai/library/terse").exists()
    assert store.resolve(ModelName.parse("llama3:latest")).model_path is not None
    store.remove_model(ModelName.parse("llama3:8b"))
    store.remove_model(ModelName.parse("llama3:latest"))
    assert not ollama_fx.blob_path(llama.model_digest).exists()
    with pytest.raises(ModelNotFound):
        store.remove_model(ModelName.parse("llama3:8b"))
    # nothing any remaining manifest needs is gone
    for e in store.list_models():
        assert e.manifest is not None and store.missing_blobs(e.manifest) == []


def test_verify_reports_corrupt_and_missing(ollama_fx: OllamaFixture) -> None:
    store = Store(ollama_fx.root)
    assert store.verify().ok
    gem = ollama_fx.models["localhost:5000/team/gem:v1"]
    p = ollama_fx.blob_path(gem.model_digest)
    os.chmod(p, 0o644)
    with open(p, "r+b") as f:
        f.seek(100)
        f.write(b"X")
    llama = ollama_fx.models["llama3:8b"]
    os.unlink(ollama_fx.blob_path(llama.model_digest))
    report = store.verify()
    kinds = {(p.problem, str(p.digest)) for p in report.problems}
    assert ("corrupt", gem.model_digest) in kinds
    assert ("missing", llama.model_digest) in kinds
    missing = next(p for p in report.problems if p.problem == "missing")
    assert set(missing.models) == {"llama3:8b", "llama3:latest", "terse:latest"}
    with pytest.raises(StoreDamaged):
        store.resolve(ModelName.parse("llama3:8b"))


def test_put_manifest_refuses_missing_blobs(tmp_path: Path, ollama_fx: OllamaFixture) -> None:
    store = Store(tmp_path / "empty")
    m = Manifest.decode(ollama_fx.models["llama3:8b"].raw)
    with pytest.raises(StoreDamaged):
        store.put_manifest(ModelName.parse("x"), m)
    assert store.list_models() == []


def test_put_manifest_replaces_other_case(ollama_fx: OllamaFixture) -> None:
    store = Store(ollama_fx.root)
    m = Manifest.decode(ollama_fx.models["llama3:8b"].raw)
    path = store.put_manifest(ModelName.parse("LLAMA3:8B"), m)
    assert path == ollama_fx.models["llama3:8b"].path
    assert len([e for e in store.list_models() if e.name.model.lower() == "llama3"]) == 2


def test_disk_usage_own_vs_shared(ollama_fx: OllamaFixture) -> None:
    r = Store(ollama_fx.root).disk_usage()
    by = {m.name.display(): m for m in r.models}
    terse = by["terse:latest"]
    assert terse.own_bytes == len(b"You are terse.") + len(
        b'{"model_format":"gguf","model_family":"llama"}\n')
    gem = by["localhost:5000/team/gem:v1"]
    assert gem.shared_bytes == 0 and gem.own_bytes == gem.size
    assert r.total_bytes == sum(len(b) for b in ollama_fx.blobs.values())
    assert r.blob_count == len(ollama_fx.blobs)
    assert r.unreferenced_bytes == 0
    assert r.ingest_bytes >= 1000  # Ollama's -partial file: an unfinished download


def test_disk_usage_counts_as_gc_sees(tmp_path: Path) -> None:
    """Found from outside: blobs that only an undecodable manifest names showed as
    unreferenced (GC keeps them), and files that are not blobs counted as blobs. A blob
    under both its names is one blob whose bytes are its files' (found from outside
    later: du counted two copies once while GC counted, and removes, both; two names
    of one file, a hardlink, count once)."""
    from tests.blobstore.gcutil import add_model

    store = Store(tmp_path / "s")
    add_model(store, "a", [b"a" * 1000])
    kept = store.put_bytes(b"k" * 500)  # named only by a damaged manifest below
    bad = store.layout.manifests / "registry.ollama.ai" / "library" / "bad" / "1"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"schemaVersion": 2, "layers": [{"digest": "' + str(kept) + '"')
    twice = store.put_bytes(b"t" * 300)  # unreferenced, also under the legacy name
    (store.layout.blobs / twice.legacy_filename).write_bytes(b"t" * 300)
    linked = store.put_bytes(b"l" * 200)  # unreferenced, its legacy name a hardlink
    os.link(store.layout.blob(linked), store.layout.blobs / linked.legacy_filename)
    (store.layout.blobs / "notes.txt").write_bytes(b"x" * 700)
    r = store.disk_usage()
    blobs = {d for d, _, _ in store.iter_blob_files() if d is not None}
    assert r.blob_count == len(blobs) == 5  # a's config and layer, kept, twice, linked
    assert r.unreferenced_bytes == 2 * 300 + 200
    assert r.total_bytes == r.referenced_bytes + 800


def test_verify_hashes_a_blob_linked_from_another_disk(tmp_path: Path) -> None:
    """A big blob moved elsewhere and symlinked back is hashed through the link, not
    reported missing (found from outside), and damage behind the link is found."""
    from tests.blobstore.gcutil import add_model

    store = Store(tmp_path / "s")
    add_model(store, "a", [b"a" * 1000])
    d = Digest.of_bytes(b"a" * 1000)
    blob = store.layout.blob(d)
    elsewhere = tmp_path / "other-disk" / "blob"
    elsewhere.parent.mkdir()
    blob.rename(elsewhere)
    blob.symlink_to(elsewhere)
    r = store.verify()
    assert r.problems == [] and r.blobs_checked == 2, r.problems
    elsewhere.write_bytes(b"b" * 1000)
    assert [p.problem for p in store.verify().problems] == ["corrupt"]


def _record(root: str, n: int) -> None:
    store = Store(root)
    for _ in range(n):
        store.record_use(ModelName.parse("llama3:8b"))


def test_state_is_safe_with_several_processes(ollama_fx: OllamaFixture) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_record, args=(str(ollama_fx.root), 25)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    st = Store(ollama_fx.root).state
    assert st is not None and st.get(ModelName.parse("llama3:8b")).use_count == 100


_OPEN_AT_ONCE = """
import sys, time
from blobstore.name import ModelName
from blobstore.store import Store
t0, gap, roots = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
bad = 0
for k, root in enumerate(roots):
    time.sleep(max(0.0, t0 + k * gap - time.time()))
    store = Store(root)
    try:
        store.model_states()
        store.record_use(ModelName.parse("m:1"))
    except Exception as exc:
        bad += 1
        print(root, repr(exc))
    store.close()
sys.exit(1 if bad else 0)
"""


@pytest.mark.timeout(120)
def test_processes_that_open_a_new_store_at_once_all_can_write(tmp_path: Path) -> None:
    """6 processes open each of 30 new stores at the same instant: none may find the
    state locked or without its tables (switching a new database to WAL answered
    SQLITE_BUSY at once to the others: about one store in four failed to open, and the
    failed process went on with the state read-only)."""
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[2]
    roots = [str(tmp_path / f"s{k}") for k in range(30)]
    t0 = time.time() + 3.0  # every child is up and has imported by then
    procs = [subprocess.Popen([sys.executable, "-c", _OPEN_AT_ONCE, str(t0), "0.08", *roots],
                              cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(6)]
    try:
        outs = [p.communicate(timeout=90)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0] * 6, outs
    for r in roots:
        st = Store(r).state
        assert st is not None and st.get(ModelName.parse("m:1")).use_count == 6


@pytest.mark.timeout(60)
def test_a_state_opened_without_waiting_still_waits_out_a_writer(tmp_path: Path) -> None:
    """A state opened with no wait for a busy database (a Store's later tries) keeps
    sqlite's whole busy timeout for its statements: a write while another process holds
    the write lock for a moment waits for it, rather than failing at once (the open
    had left each connection's busy timeout at what was left of its budget: 0 s)."""
    import sqlite3
    import threading

    from blobstore.state import State

    store = Store(tmp_path / "s")
    store.record_use(ModelName.parse("m:1"))
    store.close()
    db = store.layout.state_db
    st = State(db, busy_wait=0.0)
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # the write lock, as another process's write holds it
    release = threading.Timer(1.0, lambda: holder.execute("COMMIT"))
    release.start()
    try:
        st.record_use(ModelName.parse("m:1"))  # raised StoreUnwritable ("locked") at once
    finally:
        release.join()
        holder.close()
    assert st.get(ModelName.parse("m:1")).use_count == 2
    st.close()


def test_a_model_is_found_past_an_empty_folder_of_another_case(tmp_path: Path) -> None:
    """A removal killed between unlinking a manifest and pruning its folder can leave
    library/Foo/ empty beside library/foo/y: Foo:y is still found (every case variant
    is tried, not only the first one listed)."""
    from tests.blobstore.gcutil import add_model

    store = Store(tmp_path / "s")
    name = add_model(store, "foo:y", [b"w" * 10])
    for odd in ("Foo", "FOO", "fOo"):
        (store.layout.manifests / "registry.ollama.ai" / "library" / odd).mkdir()
    path = store.find_manifest_path(ModelName.parse("Foo:y"))
    assert path is not None and path == store.find_manifest_path(name)
    assert store.has_model(ModelName.parse("FOO:Y"))


def test_a_new_tag_in_another_case_joins_its_repository_folder(tmp_path: Path) -> None:
    """Found from outside (through serve): `PUT /v2/T/M/manifests/UP` beside `t/m` made
    a second folder `T/M`, and the repository's tags were split between the two."""
    from tests.blobstore.gcutil import add_model

    store = Store(tmp_path / "s")
    add_model(store, "t/m:v1", [b"layer"])
    add_model(store, "T/M:UP", [b"layer"])
    folders = sorted(p.name for p in (store.layout.manifests / "registry.ollama.ai").iterdir())
    assert folders == ["t"]
    assert sorted(p.name for p in (store.layout.manifests / "registry.ollama.ai" / "t" / "m"
                                   ).iterdir()) == ["UP", "v1"]
    assert store.has_model(ModelName.parse("t/m:up")) and store.has_model(
        ModelName.parse("T/M:v1"))
