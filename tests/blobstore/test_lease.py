"""Leases across hosts and pid namespaces (blobstore/lease.py, spec/store-layout.md)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blobstore.gc import GCOptions, gc
from blobstore.lease import (
    LEASE_TTL,
    Lease,
    host_id,
    live_leases,
    pid_namespace,
    process_start_time,
)
from blobstore.name import ModelName
from blobstore.store import Store

LATER = time.time() + 10 * 86400
ROOT = Path(__file__).resolve().parents[2]


def write_lease(store: Store, name: str, **doc: object) -> Path:
    base: dict[str, object] = {"pid": 1, "start_time": 0.0, "created": time.time(),
                               "digests": [], "ingests": []}
    base.update(doc)
    path = store.layout.leases / f"{name}.json"
    path.write_bytes(msgspec.json.encode(base))
    return path


def test_this_process_lease_names_host_namespace_and_heartbeat(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    with Lease(store.layout, "me") as lease:
        assert lease.path is not None
        doc = msgspec.json.decode(lease.path.read_bytes())
        assert doc["host"] == host_id() and "/" in doc["host"]
        assert doc["pidns"] == pid_namespace()
        assert abs(doc["heartbeat"] - time.time()) < 60
        assert [info.path for info in live_leases(store.layout)] == [lease.path]


def test_a_lease_from_another_host_protects_until_its_heartbeat_expires(
        tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    blob = store.put_bytes(b"fetched by a pull on another machine")
    ingest = store.layout.ingest / "sha256-" / "x"
    ingest.parent.mkdir()
    ingest.write_bytes(b"partial")
    # pid 1 exists here, but on that host it is another process: the pid means nothing
    lease = write_lease(store, "remote", host="otherhost/4b1d-boot", pidns="pid:[1]",
                        pid=999_999, heartbeat=time.time(), digests=[str(blob)],
                        ingests=[ingest.parent.name])
    r = gc(store, GCOptions(), now=LATER)
    assert store.has_blob(blob) and ingest.exists()
    assert any(s.reason == "held by a running blobctl command" for s in r.skipped)
    # the remote writer stops beating: after the TTL its lease lapses
    write_lease(store, "remote", host="otherhost/4b1d-boot", pidns="pid:[1]",
                pid=999_999, heartbeat=time.time() - LEASE_TTL - 1,
                created=time.time() - LEASE_TTL - 1, digests=[str(blob)],
                ingests=[ingest.parent.name])
    gc(store, GCOptions(), now=LATER)
    assert not store.has_blob(blob) and not ingest.exists()
    assert not lease.exists()  # a lapsed lease file is cleaned up


def test_a_lease_from_another_pid_namespace_is_judged_by_heartbeat(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    blob = store.put_bytes(b"fetched in a container")
    # same host, another pid namespace: pid 999999 does not exist *here*, but may there
    write_lease(store, "container", host=host_id(), pidns="pid:[4026599999]",
                pid=999_999, heartbeat=time.time(), digests=[str(blob)])
    gc(store, GCOptions(lease_ttl=600), now=LATER)
    assert store.has_blob(blob)
    gc(store, GCOptions(lease_ttl=0), now=LATER)  # a TTL of 0: every heartbeat is stale
    assert not store.has_blob(blob)


def test_same_host_lease_is_judged_by_pid_and_start_time(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    blob = store.put_bytes(b"held by a crashed pull")
    # a fresh heartbeat does not keep a lease whose process is gone on this very host
    write_lease(store, "dead", host=host_id(), pidns=pid_namespace(), pid=os.getpid(),
                start_time=(process_start_time(os.getpid()) or 0) - 1000,  # a recycled pid
                heartbeat=time.time(), digests=[str(blob)])
    gc(store, GCOptions(), now=LATER)
    assert not store.has_blob(blob)


def test_an_old_lease_file_without_host_is_judged_by_pid(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    blob = store.put_bytes(b"old format")
    write_lease(store, "old", pid=os.getpid(),
                start_time=process_start_time(os.getpid()) or 0.0, digests=[str(blob)])
    gc(store, GCOptions(), now=LATER)
    assert store.has_blob(blob)


@settings(max_examples=40, deadline=None)
@given(host=st.sampled_from(["same", "other"]), ns=st.sampled_from(["same", "other"]),
       age=st.floats(0, 2 * LEASE_TTL), alive=st.booleans())
def test_liveness_rule(tmp_path_factory: pytest.TempPathFactory, host: str, ns: str,
                       age: float, alive: bool) -> None:
    """Same host and namespace: pid + start time decide; otherwise the heartbeat."""
    store = Store(tmp_path_factory.mktemp("s"))
    pid = os.getpid() if alive else 999_999
    start = process_start_time(os.getpid()) or 0.0
    write_lease(store, "l", host=host_id() if host == "same" else "elsewhere/boot",
                pidns=pid_namespace() if ns == "same" else "pid:[1]", pid=pid,
                start_time=start, heartbeat=time.time() - age, created=time.time() - age)
    live = bool(live_leases(store.layout))
    if host == "same" and ns == "same":
        assert live == alive
    else:
        assert live == (age < LEASE_TTL - 1) or abs(age - LEASE_TTL) < 2


CONTAINER = """
import sys, time
from blobstore.lease import Lease
from blobstore.layout import Layout
from pathlib import Path
lease = Lease(Layout(Path(sys.argv[1])), "pull elsewhere", heartbeat_seconds=0.2).acquire()
print(lease.path, flush=True)
time.sleep(60)
"""


@pytest.mark.timeout(60)
def test_a_live_holder_keeps_its_heartbeat_fresh(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    p = subprocess.Popen([sys.executable, "-c", CONTAINER, str(store.root)], cwd=ROOT,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        path = Path(p.stdout.readline().strip())
        first = msgspec.json.decode(path.read_bytes())["heartbeat"]
        deadline = time.monotonic() + 10
        while msgspec.json.decode(path.read_bytes())["heartbeat"] == first:
            assert time.monotonic() < deadline, "no heartbeat"
            time.sleep(0.05)
    finally:
        p.kill()
        p.wait(10)


@pytest.mark.timeout(60)
def test_lease_rewrites_stay_out_of_ingest_and_a_killed_rewrite_is_collected(
        tmp_path: Path) -> None:
    """A lease's rewrite writes its temp file beside the lease, never in ``ingest/`` (where
    GC judges files by their own rules and could delete it mid-write); a temp file left by
    a killed rewrite goes once it is older than the TTL, not before."""
    import threading

    from blobstore.digest import Digest

    store = Store(tmp_path / "s")
    store.layout.ingest.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.update(os.listdir(store.layout.ingest))

    t = threading.Thread(target=watch)
    t.start()
    lease = Lease(store.layout, "test").acquire()
    try:
        for i in range(100):
            lease.add(digests={Digest.of_bytes(str(i).encode())})
    finally:
        stop.set()
        t.join(10)
        lease.release()
    assert seen == set()
    left = store.layout.leases / "w-killed.tmp"
    left.write_bytes(b"{")
    live_leases(store.layout, remove_stale=True)
    assert left.exists()  # young: might be a rewrite in progress
    os.utime(left, (time.time() - LEASE_TTL - 5,) * 2)
    live_leases(store.layout, remove_stale=True)
    assert not left.exists()


def test_a_full_disk_is_a_store_error_not_an_oserror(tmp_path: Path) -> None:
    """A lease written on a full disk raises InsufficientSpace (the CLI's "not enough
    disk space", exit 8), like any other write of the store; the heartbeat goes on."""
    from blobstore.digest import Digest
    from blobstore.errors import InsufficientSpace
    from tests.cli.test_pull_cli import tmpfs

    with tmpfs(tmp_path / "small", "1m") as mnt:
        store = Store(mnt / "s")
        lease = Lease(store.layout, "test").acquire()
        try:
            with open(mnt / "filler", "wb") as f, contextlib.suppress(OSError):
                f.write(b"\0" * (2 << 20))
            d = Digest.parse("sha256:" + "ab" * 32)
            with pytest.raises(InsufficientSpace):
                lease.add(digests={d})
        finally:
            lease.release()


def test_a_lease_file_that_does_not_decode_is_collected_once_older_than_the_ttl(
        tmp_path: Path) -> None:
    """Leases are not fsynced (a rewrite renames a whole file into place): a power loss can
    leave one empty. It keeps nothing, and GC's sweep removes it once older than the TTL;
    a young one (another tool writing it this instant) stays."""
    store = Store(tmp_path / "s")
    store.layout.leases.mkdir(parents=True, exist_ok=True)
    old = store.layout.leases / "4242-0123456789ab.json"
    old.write_bytes(b"")
    os.utime(old, (time.time() - 2 * LEASE_TTL, time.time() - 2 * LEASE_TTL))
    young = store.layout.leases / "4243-0123456789ab.json"
    young.write_bytes(b'{"pid": 4243, "start_ti')
    with Lease(store.layout, "mine") as lease:
        assert [x.purpose for x in live_leases(store.layout, remove_stale=True)] == ["mine"]
        assert not old.exists() and young.exists()
        assert lease.path is not None and lease.path.exists()


@pytest.mark.timeout(60)
@settings(max_examples=5, deadline=None)
@given(purpose=st.sampled_from(["blobctl bench registry.ollama.ai/library/m:1",
                                "blobctl run registry.ollama.ai/library/m:1", "serve",
                                "pull registry.ollama.ai/library/m:1"]))
def test_rm_and_gc_name_what_holds_the_lease(tmp_path_factory: pytest.TempPathFactory,
                                             purpose: str) -> None:
    """Found from outside: rm and gc said "held by a running pull" for the leases bench
    and run hold (and serve's): they now say what holds it (the lease's purpose)."""
    from tests.blobstore.gcutil import add_model
    from tests.cli.clirun import run

    store = Store(tmp_path_factory.mktemp("s"))
    add_model(store, "m:1", [b"weights of m"])
    layer = store.get_manifest(ModelName.parse("m:1")).model_layer()
    assert layer is not None
    d = layer.digest
    with Lease(store.layout, purpose, digests={d}):
        plan = gc(store, GCOptions(older_than=1, dry_run=True), now=LATER)
        assert any(s.reason == f"a blob is held by a running {purpose}"
                   for s in plan.skipped), plan.skipped
        r = run("--store", str(store.root), "rm", "m:1")
        assert r.code == 0, r.err
        assert f"kept 1 held by a running {purpose})" in r.out, r.out
        assert "pull" not in r.out or purpose.startswith("pull"), r.out


def _child(lease: Lease, actions: list[str], extra: object, ready: int, go: int,
           exit_how: str) -> None:
    """A forked child's use of the lease it inherited, then its way out."""
    for a in actions:
        if a == "add":
            lease.add(digests={extra})  # type: ignore[arg-type]
        elif a == "discard":
            lease.discard(ingests={"ing-parent"})
        elif a == "release":
            lease.release()
    os.write(ready, b"x")
    import select

    select.select([go], [], [], 30)  # (the parent's word, or give up)
    if exit_how == "sys.exit":
        sys.exit(0)  # unwinds the parent's with-block, in the child
    if exit_how == "os._exit":
        os._exit(0)
    # "return": falls out of the with-block


def _parent_checks(store: Store, lease: Lease, pid: int, actions: list[str], mine: object,
                   extra: object, ready_r: int, go_w: int) -> None:
    import json
    import select

    assert select.select([ready_r], [], [], 30)[0], "the child did not get ready"
    assert os.read(ready_r, 1) == b"x"
    gc(store, GCOptions(grace=0, ingest_grace=0))
    assert store.has_blob(mine)  # type: ignore[arg-type]
    if "add" in actions and "release" not in actions:
        assert store.has_blob(extra)  # type: ignore[arg-type]  # the child's own lease
    os.write(go_w, b"x")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert lease.path is not None and lease.path.exists()
    doc = json.loads(lease.path.read_bytes())
    assert doc["pid"] == os.getpid()
    assert doc["digests"] == [str(mine)] and doc["ingests"] == ["ing-parent"]
    gc(store, GCOptions(grace=0, ingest_grace=0))
    assert store.has_blob(mine)  # type: ignore[arg-type]
    assert not store.has_blob(extra)  # type: ignore[arg-type]  # lapsed with the child
    assert [p.name for p in store.layout.leases.iterdir()] == [lease.path.name]


@pytest.mark.timeout(120)
@settings(max_examples=15, deadline=None)
@given(actions=st.lists(st.sampled_from(["add", "discard", "release"]), max_size=4),
       exit_how=st.sampled_from(["return", "sys.exit", "os._exit"]))
def test_a_forked_child_never_touches_its_parents_lease(tmp_path_factory: pytest.TempPathFactory,
                                                        actions: list[str],
                                                        exit_how: str) -> None:
    """Found from outside: a child forked inside `with Lease(...)` that left the block
    (sys.exit) unlinked the parent's lease file, and one that called add() rewrote it
    with the child's pid, so that it lapsed when the child exited: GC then deleted the
    blobs the parent still leased. The parent's file is the parent's; a child that adds
    gets its own, which protects while the child runs."""
    store = Store(tmp_path_factory.mktemp("fork") / "s")
    mine = store.put_bytes(b"the parent's blob, manifest not written yet")
    extra = store.put_bytes(b"what the child adds")
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    in_child = False
    try:
        with Lease(store.layout, "host", digests={mine}, ingests={"ing-parent"}) as lease:
            pid = os.fork()
            if pid == 0:
                in_child = True
                _child(lease, actions, extra, ready_w, go_r, exit_how)
            else:
                try:
                    _parent_checks(store, lease, pid, actions, mine, extra, ready_r, go_w)
                finally:
                    os.write(go_w, b"x")
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, 0)
    finally:
        if in_child:
            os._exit(0)
        for fd in (ready_r, ready_w, go_r, go_w):
            os.close(fd)
    gc(store, GCOptions(grace=0))
    assert not store.has_blob(mine)
    store.close()
