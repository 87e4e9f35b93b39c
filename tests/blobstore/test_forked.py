"""The forked helper GC uses to stat and unlink on a second core, and its fallbacks."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blobstore.digest import Digest
from blobstore.gc import GCOptions, _blob_table, _stat_blob_folder, gc
from blobstore.store import Store
from tests.blobstore.gcutil import add_model, assert_no_missing_blobs

ROOT = Path(__file__).resolve().parents[2]
LATER = time.time() + 10 * 86400


def test_blob_table_reads_every_kind_of_entry(tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    a = Digest.of_bytes(b"a")
    (blobs / a.filename).write_bytes(b"a" * 10)
    (blobs / a.legacy_filename).write_bytes(b"a" * 5)  # Ollama's pre-2024 name, same blob
    b = Digest.of_bytes(b"b")
    (blobs / b.filename).write_bytes(b"")
    (blobs / f"{b.filename}-partial-3").write_bytes(b"xx")  # Ollama's unfinished download
    (blobs / "notes.txt").write_bytes(b"not a blob")
    os.mkdir(blobs / Digest.of_bytes(b"dir").filename)  # a folder with a blob's name
    link = Digest.of_bytes(b"link")  # a blob moved elsewhere and linked back
    os.symlink(blobs / a.filename, blobs / link.filename)
    gone = Digest.of_bytes(b"gone")
    os.symlink(tmp_path / "nowhere", blobs / gone.filename)  # dangling: damage
    (blobs / os.fsdecode(b"sha256-\xff\xfe")).write_bytes(b"undecodable name")
    os.utime(blobs / b.filename, (1000.5, 2000.25))
    table, partials, dangling = _blob_table(_stat_blob_folder(str(blobs)))
    assert set(table) == {a, b, link}
    assert table[a].size == 15 and table[a].freed == 15  # both copies count
    assert sorted(table[a].names) == sorted([a.filename, a.legacy_filename])
    assert table[b] == ((b.filename,), 0, 2000.25, 1000.5, 0, 0)
    assert table[link].size == 10 and table[link].freed == 0  # its target stays
    assert table[link].links == 1
    assert set(dangling) == {gone}
    assert partials == [f"{b.filename}-partial-3"]
    assert _blob_table(_stat_blob_folder(str(tmp_path / "missing"))) == ({}, [], {})


CHILD = """
import os, sys, threading, time
from blobstore import _forked
from blobstore.gc import _stat_blob_folder

folder = sys.argv[1]
child = _forked.start(lambda out: out.write(_stat_blob_folder(folder)))
assert child is not None and child.pid != os.getpid()
assert child.result() == _stat_blob_folder(folder)
failing = _forked.start(lambda out: 1 / 0)
assert failing is not None and failing.result() is None  # failure reported, not raised
slow = _forked.start(lambda out: time.sleep(60))
assert slow is not None
t0 = time.monotonic()
slow.cancel()  # killed and reaped at once: no zombie left behind
assert time.monotonic() - t0 < 5
try:
    os.kill(slow.pid, 0)
    raise AssertionError("child still there")
except ProcessLookupError:
    pass
stop = threading.Event()
t = threading.Thread(target=stop.wait)
t.start()
try:
    assert _forked.start(lambda out: None) is None  # never fork a threaded process
finally:
    stop.set()
    t.join()
print("ok")
"""


def test_forked_child_gives_the_same_result_and_fails_safely(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    for i in range(50):
        store.put_bytes(b"blob %d" % i)
    # a fresh process: pytest's own threads must not decide whether forking is tried
    p = subprocess.run([sys.executable, "-c", CHILD, str(store.layout.blobs)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "ok"


THREADED_GC = """
import ctypes, json, logging, sys, threading, time
from blobstore import _forked
from blobstore.gc import GCOptions, gc
from blobstore.store import Store
from tests.blobstore.gcutil import add_model, assert_no_missing_blobs

LATER = time.time() + 10 * 86400
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(message)s")
logging.getLogger("blobctl.gc").setLevel(logging.DEBUG)


def build(root):
    store = Store(root)
    for i in range(120):
        add_model(store, f"m{i}", [b"shared", b"own %d" % i], used=1000 + i)
    for i in range(200):
        store.put_bytes(b"orphan %d" % i)
    return store


def native_thread():
    # a C-level thread Python knows nothing about (as llama.cpp / OpenMP start them):
    # pthread_create on libc's sleep(), argument 30 seconds
    libc = ctypes.CDLL(None)
    tid = ctypes.c_ulong()
    sleep = ctypes.cast(libc.sleep, ctypes.c_void_p)
    assert libc.pthread_create(ctypes.byref(tid), None, sleep, ctypes.c_void_p(30)) == 0
    assert threading.active_count() == 1 and _forked.thread_count() == 2


out = {}
root = sys.argv[1]
for kind in ("alone", "native", "python"):
    store = build(f"{root}/{kind}")
    stop = threading.Event()
    if kind == "native":
        native_thread()
    elif kind == "python":
        t = threading.Thread(target=stop.wait)
        t.start()
    print(f"== {kind}", file=sys.stderr, flush=True)
    r = gc(store, GCOptions(max_size=2000, fork=True), now=LATER)
    stop.set()
    assert_no_missing_blobs(store)
    out[kind] = [r.removed_models, r.removed_blobs, r.total_bytes_after]
print(json.dumps(out))
"""


@pytest.mark.timeout(120)
def test_gc_with_a_native_or_python_thread_does_not_fork_and_gives_the_same_result(
        tmp_path: Path) -> None:
    """GC forks only from a single-threaded process: a thread started by C code (invisible
    to ``threading``) counts. Whether it forked or not, the outcome is the same."""
    p = subprocess.run([sys.executable, "-c", THREADED_GC, str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=100)
    assert p.returncode == 0, p.stderr
    logs = dict(part.split("\n", 1) for part in p.stderr.split("== ")[1:])
    assert "(blob folder forked)" in logs["alone"]
    assert "orphans went (forked;" in logs["alone"]
    for kind in ("native", "python"):
        assert "(blob folder in-process)" in logs[kind], logs[kind]
        assert "orphans went (in-process;" in logs[kind]
    out = json.loads(p.stdout)
    assert out["alone"] == out["native"] == out["python"]
    assert len(out["alone"][1]) >= 200 and out["alone"][2] <= 2000


def test_library_gc_never_forks_unless_asked(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="blobctl.gc")
    store = Store(tmp_path / "s")
    for i in range(20):
        add_model(store, f"m{i}", [b"own %d" % i], used=1000 + i)
        store.put_bytes(b"orphan %d" % i)
    gc(store, GCOptions(max_size=100), now=LATER)
    assert "(blob folder in-process)" in caplog.text
    assert "orphans went (in-process;" in caplog.text
    assert_no_missing_blobs(store)


CHILD_DIES = """
import os, sys, time
from blobstore import _forked
child = _forked.start(lambda out: time.sleep(60))
assert child is not None
print(child.pid, flush=True)
t0 = time.monotonic()
assert child.result(timeout=0.5) is None  # gave up: killed and reaped
assert time.monotonic() - t0 < 5
try:
    os.kill(child.pid, 0)
    raise AssertionError("child still there")
except ProcessLookupError:
    pass
child2 = _forked.start(lambda out: time.sleep(60))
print(child2.pid, flush=True)
os._exit(0)  # the parent dies without reaping: the child must follow it
"""


@pytest.mark.timeout(60)
def test_forked_child_has_a_timeout_and_dies_with_its_parent(tmp_path: Path) -> None:
    import psutil

    p = subprocess.run([sys.executable, "-c", CHILD_DIES], cwd=ROOT, capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    orphan = int(p.stdout.split()[1])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if psutil.Process(orphan).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the forked child outlived its parent")
