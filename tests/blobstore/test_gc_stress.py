"""Several processes import and remove models while another runs GC in a loop."""

from __future__ import annotations

import multiprocessing
import random
import time
from pathlib import Path

import pytest

from blobstore.errors import CapNotMet, ModelNotFound, StoreBusy
from blobstore.gc import GCOptions, gc
from blobstore.importer import import_gguf
from blobstore.name import ModelName
from blobstore.store import Store
from tests.blobstore.gcutil import assert_no_missing_blobs
from tests.helpers import make_gguf

SECONDS = 6.0


def writer(root: str, src: str, wid: int, q: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    rng = random.Random(wid)
    store = Store(root)
    files = sorted(Path(src).glob("*.gguf"))
    done = errors = 0
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline:
        name = ModelName.parse(f"w{wid}/m{rng.randrange(6)}")
        try:
            if rng.random() < 0.25:
                store.remove_model(name)
            else:
                import_gguf(store, rng.choice(files), name,
                            system=f"sys {rng.randrange(3)}")  # shared small layers too
                # the manifest we just wrote names only blobs that exist
                m = store.get_manifest(name)
                assert not store.missing_blobs(m) or not store.has_model(name)
                done += 1
        except (ModelNotFound, StoreBusy):
            pass
        except Exception as exc:  # reported to the parent, which fails the test
            errors += 1
            q.put(f"writer {wid}: {type(exc).__name__}: {exc}")
    q.put(("done", wid, done, errors))


def collector(root: str, q: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    store = Store(root)
    runs = 0
    deadline = time.monotonic() + SECONDS
    rng = random.Random(99)
    while time.monotonic() < deadline:
        try:
            gc(store, GCOptions(max_size=rng.choice([0, 200_000, 10**9]), grace=0,
                                ingest_grace=0))
        except (CapNotMet, StoreBusy):
            pass
        except Exception as exc:
            q.put(f"gc: {type(exc).__name__}: {exc}")
        runs += 1
    q.put(("gc", runs))


def test_concurrent_writers_and_gc_never_lose_a_blob(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        make_gguf(src / f"{i}.gguf", seed=i, n_vocab=100 + i)
    root = str(tmp_path / "store")
    Store(root)
    ctx = multiprocessing.get_context("spawn")
    q: multiprocessing.Queue = ctx.Queue()  # type: ignore[type-arg]
    procs = [ctx.Process(target=writer, args=(root, str(src), i, q)) for i in range(3)]
    procs.append(ctx.Process(target=collector, args=(root, q)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(SECONDS + 60)
        assert p.exitcode == 0
    messages = []
    while not q.empty():
        messages.append(q.get())
    problems = [m for m in messages if isinstance(m, str)]
    assert not problems, problems
    stats = [m for m in messages if isinstance(m, tuple)]
    assert sum(m[2] for m in stats if m[0] == "done") > 10  # real work happened
    assert next(m[1] for m in stats if m[0] == "gc") > 3
    store = Store(root)
    assert_no_missing_blobs(store)
    assert store.verify().ok


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["hardlink"])  # (a copy never finds the blob present)
def test_an_import_racing_gc_for_its_unreferenced_blob_succeeds(tmp_path: Path,
                                                                mode: str) -> None:
    """Found from outside: a hardlink import that found its blob already present (left
    unreferenced by a removal) while a GC that had read the leases before the import's
    lease named it unlinked that blob failed with BlobNotFound (exit 3 at the CLI) for a
    file that exists. One thread imports and removes the same model in a loop, two run
    GC; every import must succeed (the outside run hit it 2-4 times in 20 s)."""
    import threading

    from blobstore.errors import BlobctlError

    st = Store(tmp_path / "s")
    src = make_gguf(tmp_path / "m.gguf", seed=3)
    name = ModelName.parse("t/x:q")
    errors: list[str] = []
    imports = 0
    stop = time.monotonic() + 10

    def importer() -> None:
        nonlocal imports
        while time.monotonic() < stop:
            try:
                import_gguf(st, src, name, mode=mode)
                imports += 1
                st.remove_model(name)
            except BlobctlError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    def collector() -> None:
        while time.monotonic() < stop:
            gc(st, GCOptions(grace=0))

    threads = [threading.Thread(target=f) for f in (importer, collector, collector)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert imports >= 3  # (a throughput floor only: the check is that none failed)
    assert_no_missing_blobs(st)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("remover", ["rm", "gc"])
def test_verify_beside_removals_reports_no_damage(tmp_path: Path, remover: str) -> None:
    """Found from outside: a blob that a concurrent `rm` or GC removed (legitimately:
    unreferenced) between verify's listing and its hashing was reported `unreadable`
    (no such file), or `missing` when its model went meanwhile: exit 5 from verify run
    beside a GC loop. Gone and no longer referenced is no damage; a stable model's
    damage is still found (checked at the end)."""
    import os
    import threading

    st = Store(tmp_path / "s")
    stable = make_gguf(tmp_path / "stable.gguf", seed=1)
    import_gguf(st, stable, ModelName.parse("t/stable:q"))
    churn = make_gguf(tmp_path / "churn.gguf", seed=2, n_embd=256)
    name = ModelName.parse("t/churn:q")
    stop = time.monotonic() + 6
    reports = []

    def churner() -> None:
        while time.monotonic() < stop:
            if remover == "rm":
                import_gguf(st, churn, name)
                st.remove_model(name)
            else:
                for _ in range(20):
                    st.put_bytes(os.urandom(4096))
                gc(st, GCOptions(grace=0))

    def verifier() -> None:
        while time.monotonic() < stop:
            reports.append(st.verify())

    threads = [threading.Thread(target=churner), threading.Thread(target=verifier)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    bad = [p for r in reports for p in r.problems]
    assert not bad, bad[:3]
    assert len(reports) > 5
    # a referenced blob that is really gone is still reported
    layer = st.get_manifest(ModelName.parse("t/stable:q")).model_layer()
    assert layer is not None
    os.unlink(st.blob_path(layer.digest))
    r = st.verify()
    assert [(p.problem, p.digest) for p in r.problems] == [("missing", layer.digest)]
