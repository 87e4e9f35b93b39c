"""The store as a library inside another program (spec/api.md, "Embedding the store"):
threads, the reentrant lock, pins, the caller's own mapped files, errors."""

from __future__ import annotations

import mmap
import os
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore.errors import (
    BlobctlError,
    CapNotMet,
    InsufficientSpace,
    InvalidDigest,
    ModelNotFound,
    ModelPinned,
    StateUnreadable,
    StoreBusy,
)
from blobstore.gc import GCOptions, gc
from blobstore.importer import import_gguf
from blobstore.lease import Lease
from blobstore.name import ModelName
from blobstore.store import Store
from tests.blobstore.gcutil import add_model, assert_no_missing_blobs
from tests.helpers import make_gguf

LATER = time.time() + 10 * 86400
N = ModelName.parse


def test_invalid_digest_is_also_a_value_error() -> None:
    from blobstore.digest import Digest

    with pytest.raises(ValueError):
        Digest.parse("md5:abc")
    assert issubclass(InvalidDigest, BlobctlError)


# ------------------------------------------------------------------ threads
def test_pins_are_seen_from_every_thread(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    add_model(store, "keep", [b"k" * 1000], used=1)
    add_model(store, "old", [b"o" * 1000], used=2)
    store.set_pinned(N("keep"), True)  # the connection of this thread
    out: list[object] = []

    def worker() -> None:
        try:
            out.append(gc(store, GCOptions(max_size=0), now=LATER))
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=worker)
    t.start()
    t.join(60)
    assert len(out) == 1 and type(out[0]).__name__ == "GCCapNotMet"  # kept: pinned
    assert store.has_model(N("keep")) and not store.has_model(N("old"))
    assert_no_missing_blobs(store)


def test_an_unreadable_state_database_stops_gc_rather_than_forget_pins(
        tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    add_model(store, "keep", [b"k" * 1000], used=1)
    store.set_pinned(N("keep"), True)
    store.close()
    for extra in ("-wal", "-shm"):
        Path(f"{store.layout.state_db}{extra}").unlink(missing_ok=True)
    store.layout.state_db.write_bytes(b"this is not a sqlite database" * 100)  # damaged
    store = Store(tmp_path / "s", create=False)
    with pytest.raises(StateUnreadable):
        gc(store, GCOptions(max_size=0), now=LATER)
    with pytest.raises(StateUnreadable):
        store.remove_model(N("keep"))
    assert store.has_model(N("keep"))


def test_the_store_lock_is_reentrant_and_excludes_other_threads(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    add_model(store, "a", [b"a" * 100])
    other = Store(tmp_path / "s")  # a second Store object on the same folder
    busy: list[BaseException] = []

    def contender() -> None:
        try:
            with other.lock(timeout=0.3):
                pass
        except StoreBusy as exc:
            busy.append(exc)

    with store.lock(timeout=1), store.lock(timeout=1):
        add_model(store, "b", [b"b" * 100])  # put_manifest takes the lock again
        store.remove_model(N("a"))
        gc(store, GCOptions(grace=0, lock_timeout=1))
        t = threading.Thread(target=contender)
        t.start()
        t.join(30)
    assert len(busy) == 1
    with other.lock(timeout=1):  # released by the outermost holder
        pass
    assert store.has_model(N("b")) and not store.has_model(N("a"))


def _spellings(base: Path) -> list[Path]:
    """Paths that all lead to the store at ``base / "s"``."""
    (base / "sub").mkdir(exist_ok=True)
    for link, target in (("link", base / "s"), ("link2", base / "link"), ("up", base)):
        if not (base / link).is_symlink():
            os.symlink(target, base / link)
    return [base / "s", base / "sub" / ".." / "s", base / "link", base / "link2",
            base / "up" / "s", base / "link" / ".", base / "up" / "sub" / ".." / "link"]


@pytest.mark.timeout(120)
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(outer=st.integers(0, 6), inner=st.integers(0, 6), other=st.integers(0, 6),
       op=st.sampled_from(["pin", "put_manifest", "rm", "gc", "lock"]))
def test_the_store_lock_is_one_lock_whatever_the_path_is_spelled(outer: int, inner: int,
                                                                 other: int, op: str) -> None:
    """Found from outside: inside `with st.lock():`, set_pinned through a Store opened
    on a symlink to the store (or `sub/../s`) waited 30 s on the file lock its own
    thread held and raised StoreBusy: the process's lock was kept per spelling. Every
    spelling now shares one reentrant lock, which still excludes other threads."""
    tmp = Path(tempfile.mkdtemp(prefix="blobctl-alias-"))
    try:
        paths = _spellings(tmp)
        first = Store(paths[0])
        add_model(first, "a:1", [b"a" * 100])
        a, b = Store(paths[outer]), Store(paths[inner])
        busy: list[BaseException] = []

        def contender() -> None:
            try:
                with Store(paths[other]).lock(timeout=0.3):
                    pass
            except StoreBusy as exc:
                busy.append(exc)

        with a.lock(timeout=5):
            if op == "pin":
                b.set_pinned(N("a:1"), True)
            elif op == "put_manifest":
                add_model(b, "b:1", [b"b" * 100])
            elif op == "rm":
                b.remove_model(N("a:1"))
            elif op == "gc":
                gc(b, GCOptions(grace=0, lock_timeout=2))
            else:
                with b.lock(timeout=2):
                    pass
            t = threading.Thread(target=contender)
            t.start()
            t.join(30)
        assert len(busy) == 1  # another thread still waits, by any spelling
        with Store(paths[other]).lock(timeout=2):  # released by the outermost holder
            pass
        first.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_remove_model_enforces_pins(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    add_model(store, "p", [b"p" * 100])
    store.set_pinned(N("p"), True)
    with pytest.raises(ModelPinned) as info:
        store.remove_model(N("P"))  # names match case-insensitively
    assert info.value.hint and "--force" in info.value.hint
    assert store.has_model(N("p"))
    store.remove_model(N("p"), force=True)
    assert not store.has_model(N("p"))


def _program() -> st.SearchStrategy[list[tuple[str, int, int]]]:
    ops = st.sampled_from(["import", "import", "pin", "unpin", "resolve", "gc", "rm",
                           "rm_pinned", "verify"])
    return st.lists(st.tuples(ops, st.integers(0, 5), st.integers(0, 3)),
                    min_size=40, max_size=120)


@pytest.mark.timeout(600)
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(program=_program(), seed=st.integers(0, 2**16))
def test_one_store_driven_from_eight_threads(program: list[tuple[str, int, int]],
                                             seed: int) -> None:
    """import / pin / unpin / resolve / gc / rm at random from 8 threads on one Store:
    no pinned model is evicted, no manifest lacks a blob, nothing outside the error
    tree escapes."""
    tmp = Path(tempfile.mkdtemp(prefix="blobctl-threads-"))
    try:
        src = tmp / "src"
        src.mkdir()
        files = [make_gguf(src / f"{i}.gguf", seed=i, n_vocab=100 + i) for i in range(3)]
        store = Store(tmp / "s")
        # pinned for good before the threads start: must survive everything below
        permanent = [N(f"keep{i}") for i in range(2)]
        for i, name in enumerate(permanent):
            import_gguf(store, files[i], name, system=f"keep {i}")
            store.set_pinned(name, True)
        names = [N(f"m{i}") for i in range(6)]
        failures: list[str] = []
        done: dict[str, int] = {}
        rng = random.Random(seed)
        parts = [program[i::8] for i in range(8)]

        def run(ops: list[tuple[str, int, int]]) -> None:
            for op, i, k in ops:
                try:
                    if op == "import":
                        import_gguf(store, files[k % len(files)], names[i], system=f"s{k}")
                    elif op == "pin":
                        store.set_pinned(names[i], True)
                    elif op == "unpin":
                        store.set_pinned(names[i], False)
                    elif op == "resolve":
                        r = store.resolve(names[i])
                        assert r.model_path is not None
                    elif op == "gc":
                        gc(store, GCOptions(max_size=[0, 2000, 50_000, None][k], grace=0,
                                            ingest_grace=0, lock_timeout=60))
                    elif op == "rm":
                        store.remove_model(names[i])
                    elif op == "rm_pinned":
                        with_pin = permanent[i % 2]
                        try:
                            store.remove_model(with_pin)
                        except ModelPinned:
                            continue
                        failures.append(f"rm of pinned {with_pin} went through")
                    elif op == "verify":
                        store.verify(workers=1)
                except BlobctlError:
                    continue  # in the tree: ModelNotFound, CapNotMet, StoreDamaged, ...
                except BaseException as exc:
                    failures.append(f"{op}: {type(exc).__name__}: {exc}")
                    continue
                done[op] = done.get(op, 0) + 1
                if rng.random() < 0.1:
                    time.sleep(0.001)

        threads = [threading.Thread(target=run, args=(p,)) for p in parts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
            assert not t.is_alive(), "a thread hung"
        assert not failures, failures
        assert done.get("import", 0) + done.get("gc", 0) > 0, done  # real work happened
        for name in permanent:
            assert store.has_model(name), f"pinned {name} was evicted"
            assert store.is_pinned(name)
        assert_no_missing_blobs(store)
        store.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ in use
def test_a_model_mapped_by_this_process_survives_its_own_gc(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    add_model(store, "served", [b"w" * 100_000], used=1)
    add_model(store, "other", [b"x" * 100_000], used=2)
    path = store.resolve(N("served"), record=False).model_path
    assert path is not None
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        os.close(os.dup(f.fileno()))
        f.close()  # only the mapping is left, as llama.cpp leaves it
        with pytest.raises(BlobctlError) as info:
            gc(store, GCOptions(max_size=0), now=LATER)
        report = info.value.report  # type: ignore[attr-defined]
        assert store.has_model(N("served")) and path.exists()
        assert not store.has_model(N("other"))
        assert any(s.what.endswith("served:latest") and s.reason.startswith("in use by")
                   for s in report.skipped)
        assert mm[:1] == b"w"
        # rm keeps the mapped blob too (the manifest goes, the bytes stay while mapped)
        r = store.remove_model(N("served"))
        assert r.kept_in_use and path.exists()
    gc(store, GCOptions(), now=LATER)  # unmapped now: an orphan like any other
    assert not path.exists()


def test_the_stores_own_reads_do_not_count_as_use(tmp_path: Path) -> None:
    from blobstore.inuse import files_in_use, store_read

    store = Store(tmp_path / "s")
    d = store.put_bytes(b"blob")
    p = str(store.layout.blob(d))
    real = os.path.realpath(store.layout.blobs)
    with store_read(p):
        assert f"{real}/{d.filename}" not in files_in_use(real)
    with store.open_blob(d):  # a handle the caller holds: a use
        assert f"{real}/{d.filename}" in files_in_use(real)


# ------------------------------------------------------------------ errors
def test_a_writer_refused_for_space_leaves_no_temp_file(tmp_path: Path) -> None:
    import io

    store = Store(tmp_path / "s")
    with pytest.raises(InsufficientSpace):
        store.put_blob(io.BytesIO(b"x"), size=1 << 55)
    assert list(store.layout.ingest.iterdir()) == []


def test_enospc_during_a_copy_import_is_insufficient_space(tmp_path: Path) -> None:
    """A disk that fills up while the file is copied: InsufficientSpace (exit 8), not
    "cannot read", and nothing left behind."""
    import subprocess

    from cli.output import exit_code_for

    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(mnt)],
            capture_output=True).returncode != 0:
        pytest.skip("needs a small filesystem (mount tmpfs as root)")
    try:
        src = make_gguf(tmp_path / "model.gguf", n_embd=512, n_vocab=4096)  # 8 MiB
        store = Store(mnt / "s")
        filler = mnt / "filler"

        def fill_the_disk(done: int, total: int) -> None:
            if done >= 1 << 20 and not filler.exists():
                with open(filler, "wb") as f:  # take every free block left
                    try:
                        while True:
                            f.write(b"\0" * (1 << 20))
                            f.flush()
                    except OSError:
                        pass

        with pytest.raises(InsufficientSpace) as info:
            import_gguf(store, src, N("big"), progress=fill_the_disk)
        assert exit_code_for(info.value) == 8
        assert not store.has_model(N("big"))
        assert [p.name for p in store.layout.ingest.iterdir()] == []
        assert src.exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_odd_digests_in_a_lease_break_neither_gc_nor_rm(tmp_path: Path) -> None:
    import msgspec

    store = Store(tmp_path / "s")
    add_model(store, "a", [b"a" * 100])
    kept = store.put_bytes(b"leased orphan")
    doc = {"pid": os.getpid(), "start_time": 0.0, "created": time.time(),
           "digests": ["md5:abc", "sha256:" + "Z" * 64, str(kept)]}
    from blobstore.lease import process_start_time

    doc["start_time"] = process_start_time(os.getpid()) or 0.0
    (store.layout.leases / "odd.json").write_bytes(msgspec.json.encode(doc))
    gc(store, GCOptions(), now=LATER)
    assert store.has_blob(kept)  # the one valid digest is still honoured
    store.remove_model(N("a"))
    assert not store.has_model(N("a"))


def test_raw_os_errors_do_not_escape_the_store(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    src = tmp_path / "model.bin"
    src.write_bytes(b"weights")
    shutil.rmtree(store.layout.ingest)
    store.layout.ingest.write_bytes(b"a file where the ingest folder should be")
    for call in (lambda: store.put_file(src, mode="hardlink"),
                 lambda: store.put_file(src, mode="copy"),
                 lambda: store.put_bytes(b"data"),
                 lambda: add_model(store, "a", [b"a"])):
        with pytest.raises(BlobctlError) as info:
            call()
        assert not isinstance(info.value, OSError)
    with pytest.raises(BlobctlError):
        store.put_file(tmp_path / "missing.bin", mode="copy")  # cannot read: InvalidInput


def test_get_manifest_of_a_vanished_model_is_not_found(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    with pytest.raises(ModelNotFound):
        store.get_manifest(N("nothing"))


def test_lease_heartbeat_thread_stops_with_the_lease(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    before = threading.active_count()
    lease = Lease(store.layout, "t", heartbeat_seconds=0.05).acquire()
    assert lease.path is not None
    first = lease.path.read_bytes()
    time.sleep(0.3)
    assert lease.path.read_bytes() != first  # heartbeats rewrote it
    lease.release()
    assert threading.active_count() == before


def test_state_connections_of_finished_threads_are_closed(tmp_path: Path) -> None:
    import gc as pygc

    store = Store(tmp_path / "s")
    add_model(store, "a", [b"a"])
    state = store.state
    assert state is not None

    def use() -> None:
        store.list_models()
        store.record_use(N("a"))

    for _ in range(30):  # thread-per-request servers must not pile up connections
        t = threading.Thread(target=use)
        t.start()
        t.join(30)
    pygc.collect()
    opened = list(state._open)
    assert sum(1 for f in opened if f.alive) <= 2
    store.close()
    assert not any(f.alive for f in opened)


def _in_forked_child(root: str, op: str, q: object) -> None:
    t0 = time.monotonic()
    try:
        st = Store(root)
        if op == "pin":
            st.set_pinned(N("t/a:q"), True)
        elif op == "import":
            gguf = Path(root).parent / "b.gguf"
            import_gguf(st, gguf, N("t/b:q"))
        elif op == "rm":
            st.remove_model(N("t/a:q"), force=True)
        else:
            gc(st, GCOptions(grace=0))
        q.put(f"ok {time.monotonic() - t0:.1f}")  # type: ignore[attr-defined]
    except BaseException as exc:  # reported to the parent, whatever it is
        q.put(f"{type(exc).__name__}: {exc}")  # type: ignore[attr-defined]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("op", ["pin", "import", "rm", "gc"])
@pytest.mark.parametrize("held", [False, True])
def test_a_forked_child_with_a_new_store_takes_the_lock(tmp_path: Path, op: str,
                                                        held: bool) -> None:
    """Found from outside: spec/api.md tells a program that forks to open a new Store in
    the child, yet the child's Store reused the parent's process-wide lock state:
    filelock refused the inherited instance (RuntimeError, not a library error) and an
    RLock a parent thread held at the fork stayed held forever (StoreBusy after 30 s)."""
    import multiprocessing

    root = tmp_path / "s"
    st = Store(root)
    make_gguf(tmp_path / "a.gguf", seed=1)
    make_gguf(tmp_path / "b.gguf", seed=2)
    import_gguf(st, tmp_path / "a.gguf", N("t/a:q"))  # the parent took the lock once
    taken, let_go = threading.Event(), threading.Event()

    def hold() -> None:
        with st.lock():
            taken.set()
            let_go.wait(30)

    holder = threading.Thread(target=hold)
    if held:
        holder.start()
        assert taken.wait(10)
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_in_forked_child, args=(str(root), op, q))
    p.start()
    try:
        if held:
            time.sleep(0.5)
            let_go.set()
            holder.join(10)
        got = q.get(timeout=60)
    finally:
        let_go.set()
        p.join(30)
    assert got.startswith("ok"), got
    assert float(got.split()[1]) < 15, got


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["deleted", "moved"])
def test_pins_follow_the_store_path_after_its_folder_is_made_again(tmp_path: Path,
                                                                   how: str) -> None:
    """Found from outside: a Store kept its state database open after the store folder
    was deleted (or moved) and made again by a later import: pins went to the unlinked
    (or moved) database, and a GC reading the path's evicted a model the library said
    was pinned. The Store now notices the database at its path is another file."""
    root = tmp_path / "s"
    st = Store(root)
    import_gguf(st, make_gguf(tmp_path / "a.gguf", seed=1), N("t/a:q"))
    st.set_pinned(N("t/a:q"), True)
    if how == "deleted":
        shutil.rmtree(root)
    else:
        root.rename(tmp_path / "elsewhere")
    import_gguf(st, make_gguf(tmp_path / "b.gguf", seed=2), N("t/b:q"))
    st.set_pinned(N("t/b:q"), True)
    st.set_config("max-size", "1G")
    other = Store(root)  # another process's view: the path's database
    assert other.is_pinned(N("t/b:q"))
    assert other.get_config("max-size") == "1G"
    assert not other.is_pinned(N("t/a:q"))  # that pin went with its folder
    with pytest.raises(CapNotMet, match="pinned"):  # b's pin holds against a cap of 0
        gc(other, GCOptions(max_size=0, grace=0))
    assert other.has_model(N("t/b:q"))
    assert st.is_pinned(N("t/b:q"))
    if how == "moved":
        assert Store(tmp_path / "elsewhere").is_pinned(N("t/a:q"))
    st.close()
    other.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("host_logs", [False, True])
def test_the_library_prints_nothing_unless_the_host_configures_logging(
        tmp_path: Path, host_logs: bool) -> None:
    """Found from outside: with no logging configured by the host, the library's warnings
    (here: a manifest folder that cannot be read) reached the host's stderr through
    Python's last-resort handler. The "blobctl" logger now has a NullHandler: silent by
    default, and a host that configures logging still gets the record."""
    import subprocess
    import sys

    root = tmp_path / "s"
    Store(root).close()
    loop = root / "manifests" / "registry.ollama.ai" / "loop"
    loop.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(loop, loop)
    program = (
        ("import logging; logging.basicConfig()\n" if host_logs else "")
        + "from blobstore import Store\n"
        + f"problems = []\nStore({str(root)!r}).list_models(problems)\n"
        + "assert problems, problems\n")
    p = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                       timeout=30, cwd=Path(__file__).resolve().parents[2])
    assert p.returncode == 0, p.stderr
    if host_logs:
        assert "cannot read" in p.stderr and "loop" in p.stderr
    else:
        assert p.stderr == ""


# ------------------------------------------------------------------ close under use
_CLOSE_UNDER_USE = """
import json, os, sys, threading, time
from blobstore.errors import BlobctlError
from blobstore.name import ModelName
from blobstore.store import Store
from tests.blobstore.gcutil import add_model
plan = json.loads(sys.argv[1])
root = plan["root"]
store = Store(root)
names = [ModelName.parse(f"m{i}") for i in range(3)]
stop = time.monotonic() + plan["seconds"]
bad = []
remakes = [0]  # odd while the store folder is away: errors then are the folder's absence

def run(ops):
    k = 0
    while time.monotonic() < stop:
        op, i = ops[k % len(ops)]
        k += 1
        before = remakes[0]
        try:
            if op == "resolve":
                store.resolve(names[i])
            elif op == "list":
                store.list_models()
            elif op == "pin":
                store.set_pinned(names[i], True)
            elif op == "unpin":
                store.set_pinned(names[i], False)
            elif op == "states":
                store.model_states()
            elif op == "config":
                store.set_config("max-size", str(k))
                store.get_config("max-size")
            elif op == "refs":
                store.referenced_digests()
        except BlobctlError as exc:
            if before % 2 == 0 and remakes[0] == before:
                bad.append(f"{op}: {type(exc).__name__}: {exc}")

threads = [threading.Thread(target=run, args=(ops,)) for ops in plan["threads"]]
for t in threads:
    t.start()
for n, gap in enumerate(plan["closes"]):
    time.sleep(gap)
    if plan["remake"] and n % 3 == 2:  # the store folder moved away and made again
        remakes[0] += 1
        os.rename(root, f"{root}.{n}")
        for name in names:
            add_model(store, str(name), [name.key.encode()])
        remakes[0] += 1
    else:
        store.close()
for t in threads:
    t.join()
store.close()
print(json.dumps(bad))
"""


@pytest.mark.timeout(180)
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(threads=st.lists(st.lists(st.tuples(st.sampled_from(
           ["resolve", "list", "pin", "unpin", "states", "config", "refs"]),
           st.integers(0, 2)), min_size=1, max_size=6), min_size=1, max_size=4),
       closes=st.lists(st.floats(0.0, 0.02), min_size=1, max_size=60),
       remake=st.booleans())
def test_closing_a_store_while_threads_use_it(threads: list[list[tuple[str, int]]],
                                              closes: list[float], remake: bool) -> None:
    """Found from outside: store.close() while other threads resolved models closed
    their sqlite connections under a running statement, and the host process died of a
    segmentation fault (as did closing the databases of a store folder made again). Run
    in a child process, so that a crash fails the test: close() now waits for the
    statement, and a later use opens the database again (no error at all)."""
    import json
    import subprocess
    import sys

    tmp = Path(tempfile.mkdtemp(prefix="blobctl-close-"))
    try:
        store = Store(tmp / "s")
        for i in range(3):
            add_model(store, f"m{i}", [f"m{i}".encode()])
        store.close()
        plan = {"root": str(tmp / "s"), "threads": threads, "closes": closes,
                "remake": remake, "seconds": sum(closes) + 0.3}
        repo = Path(__file__).resolve().parents[2]
        p = subprocess.run([sys.executable, "-c", _CLOSE_UNDER_USE, json.dumps(plan)],
                           cwd=repo, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, (p.returncode, p.stderr[-3000:])
        assert json.loads(p.stdout) == [], p.stdout
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ resolve under a lease
_REIMPORTER = """
import os, sys
from pathlib import Path
from blobstore.gc import GCOptions, gc
from blobstore.store import Store
from tests.blobstore.gcutil import add_model
root, stop, counter = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
store = Store(root)
k = 0
while not stop.exists():
    k += 1
    add_model(store, "mine:q4", [f"version {k} ".encode() * 500])  # same name, new blob
    gc(store, GCOptions(grace=0, ingest_grace=0))  # what is not leased goes
    counter.with_suffix(".tmp").write_text(str(k))
    os.replace(counter.with_suffix(".tmp"), counter)
"""


def _rounds(counter: Path) -> int:
    try:
        return int(counter.read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


@pytest.mark.timeout(120)
@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(pauses=st.lists(st.floats(0, 0.01), min_size=4, max_size=8))
def test_a_model_resolved_under_a_lease_survives_another_process_reimporting_it(
        pauses: list[float]) -> None:
    """Found from outside: spec/api.md's llama-cpp-python recipe read the manifest, leased
    its blobs, then resolved: a re-import of the name by another process in between left
    the resolved blob outside the lease, and a GC or `rm` deleted it before the load.
    `store.resolve(name, lease=lease)` leases what it returns: while another process
    re-imports the name and collects garbage without a pause, every path resolved under
    a lease stays on disk while the lease is held."""
    import subprocess
    import sys

    tmp = Path(tempfile.mkdtemp(prefix="blobctl-reimport-"))
    repo = Path(__file__).resolve().parents[2]
    stop, counter = tmp / "stop", tmp / "rounds"
    store = Store(tmp / "s")
    add_model(store, "mine:q4", [b"version 0 " * 500])
    other = subprocess.Popen([sys.executable, "-c", _REIMPORTER, str(tmp / "s"), str(stop),
                              str(counter)], cwd=repo)
    try:
        deadline = time.monotonic() + 30
        while _rounds(counter) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        for pause in pauses:
            with Lease(store.layout, "my-app") as lease:
                time.sleep(pause)
                resolved = store.resolve(N("mine:q4"), lease=lease)
                assert resolved.model_path is not None
                assert resolved.manifest.blob_digests <= lease.digests
                seen = _rounds(counter)
                while _rounds(counter) < seen + 2 and time.monotonic() < deadline:
                    time.sleep(0.005)  # two more imports and GCs while the lease is held
                assert other.poll() is None, "the re-importing process died"
                assert resolved.model_path.exists(), "a leased model's blob was collected"
    finally:
        stop.touch()
        other.wait(30)
        store.close()
        shutil.rmtree(tmp, ignore_errors=True)
    assert other.returncode == 0
