"""A writer judged dead while it was paused (spec/store-layout.md, "Ingest"): once
another writer took its folder over, it neither beats into the taker's owner file, nor
writes, nor commits (which would give the taker's file, still being written, a digest
name). The writer taken over runs in another process whose owner identity is another
host with a lagging clock (its heartbeat is older than OWNER_TTL from the start)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from blobstore.digest import Digest
from blobstore.ingest import Ingest
from blobstore.store import Store

ROOT = Path(__file__).parents[2]
CHUNK = 1 << 16
pytestmark = pytest.mark.timeout(120)

PAUSED = textwrap.dedent("""
    import socket, sys, time
    _real = time.time
    socket.gethostname = lambda: "another-host"     # seen from elsewhere ...
    time.time = lambda: _real() - 100_000            # ... with a heartbeat long gone
    from pathlib import Path
    from blobstore.digest import Digest
    from blobstore.errors import StoreUnwritable
    from blobstore.ingest import Ingest
    from blobstore.layout import Layout
    layout, data = Layout(Path(sys.argv[1])), Path(sys.argv[2]).read_bytes()
    d = Digest.of_bytes(data)
    ing = Ingest.for_digest(layout, d, len(data), int(sys.argv[3]))
    ing.write_at(memoryview(data), 0)
    print(ing.dir, flush=True)
    sys.stdin.readline()                             # paused while another takes over
    ing.heartbeat()
    for what, step in (("write", lambda: ing.write_at(memoryview(b"x"), 0)),
                       ("commit", lambda: ing.commit(d))):
        try:
            step()
            print(what, "done", flush=True)
        except StoreUnwritable as exc:
            print(what, "refused", exc.message, flush=True)
    ing.close()                                      # gives up nothing of B's
""")


def test_a_writer_taken_over_neither_beats_writes_nor_commits(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    blob = os.urandom(5 * CHUNK + 123)
    (tmp_path / "blob").write_bytes(blob)
    d = Digest.of_bytes(blob)
    a = subprocess.Popen([sys.executable, "-c", PAUSED, str(store.root), str(tmp_path / "blob"),
                          str(CHUNK)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert a.stdout is not None and a.stdin is not None
        folder = Path(a.stdout.readline().strip())
        b = Ingest.for_digest(store.layout, d, len(blob), CHUNK)
        assert b.dir == folder  # A's owner is foreign and silent: B takes the folder over
        b.write_at(memoryview(blob), 0)
        owner = folder / "owner"
        before = (owner.read_bytes(), owner.stat().st_mtime_ns, owner.stat().st_ino)
        a.stdin.write("go\n")
        a.stdin.flush()
        out, _ = a.communicate(timeout=60)
    finally:
        if a.poll() is None:
            a.kill()
    lines = out.splitlines()
    assert lines[0].startswith("write refused"), out
    assert lines[1].startswith("commit refused"), out
    # A touched nothing of B's: the owner file (its bytes, beat, inode), the data file
    assert (owner.read_bytes(), owner.stat().st_mtime_ns, owner.stat().st_ino) == before
    assert not store.layout.blob(d).exists()
    assert b.commit(d) == d
    assert store.blob_path(d).read_bytes() == blob
    assert not folder.exists()


@pytest.mark.parametrize("kind", ["append", "ranges"])
def test_closing_waits_for_a_write_in_progress(tmp_path: Path, kind: str) -> None:
    """A writer thread still writing while another closes the ingest (a server shutting
    down under a PATCH): the write ends cleanly or fails with StoreUnwritable, never
    with EBADF, and never writes into a file opened after the close (fd reuse)."""
    import threading

    from blobstore.errors import StoreUnwritable

    store = Store(tmp_path / "s")
    piece = os.urandom(1 << 20)
    for round_ in range(30):
        if kind == "append":
            ing = Ingest.new(store.layout)
        else:
            ing = Ingest.for_digest(store.layout, Digest.of_bytes(piece * 64), 64 << 20, CHUNK)
        errors: list[BaseException] = []
        started = threading.Event()

        def write(ing: Ingest = ing, started: threading.Event = started,
                  errors: list[BaseException] = errors) -> None:
            try:
                for i in range(64):
                    started.set()
                    if ing.kind == "append":
                        ing.append(piece)
                    else:
                        ing.write_at(memoryview(piece), i << 20)
            except BaseException as exc:  # collected and checked below
                errors.append(exc)

        t = threading.Thread(target=write)
        t.start()
        started.wait(10)
        ing.close()
        victim = tmp_path / f"victim-{round_}"
        fd = os.open(victim, os.O_RDWR | os.O_CREAT, 0o644)  # likely the freed number
        t.join(30)
        os.close(fd)
        assert victim.stat().st_size == 0
        assert all(isinstance(e, StoreUnwritable) for e in errors), errors
        ing.drop()


def test_checkpoints_leave_no_temp_file_outside_the_folder(tmp_path: Path) -> None:
    """A checkpoint's temp file is written inside the ingest folder (so GC sees it with
    the folder, never as a stray top-level temp file it may delete under a writer)."""
    import threading

    store = Store(tmp_path / "s")
    ing = Ingest.new(store.layout)
    stray: set[str] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            stray.update(n for n in os.listdir(store.layout.ingest) if n != ing.key)

    t = threading.Thread(target=watch)
    t.start()
    try:
        for _ in range(200):
            ing.append(b"x" * 100)
            ing.checkpoint()
    finally:
        stop.set()
        t.join(10)
    assert stray == set()
    assert not list(ing.dir.glob("*.tmp"))  # and none stays inside it either
    ing.drop()


class _Inotify:
    """The kernel's own record of what happens to one folder (Linux inotify, via libc):
    how often ``owner`` was rewritten, replaced or had its times set."""

    IN_ATTRIB, IN_MOVED_TO, IN_CLOSE_WRITE, IN_CREATE = 0x4, 0x80, 0x8, 0x100

    def __init__(self, folder: Path, mask: int = IN_ATTRIB | IN_MOVED_TO | IN_CLOSE_WRITE
                 ) -> None:
        import ctypes
        import ctypes.util

        self.libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK)
        assert self.fd >= 0
        assert self.libc.inotify_add_watch(self.fd, str(folder).encode(), mask) >= 0

    def owner_events(self, name: bytes | None = b"owner") -> int:
        """Events on ``name`` (any name: None) since the last call."""
        import struct

        n = 0
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return n
            i = 0
            while i < len(buf):
                _, _, _, length = struct.unpack_from("iIII", buf, i)
                got = buf[i + 16:i + 16 + length].rstrip(b"\0")
                n += name is None or got == name
                i += 16 + length

    def close(self) -> None:
        os.close(self.fd)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify")
def test_concurrent_writers_beat_once_per_interval(tmp_path: Path) -> None:
    """16 engine threads all find the heartbeat due at once: one beat, not sixteen."""
    import threading

    from blobstore.ingest import HEARTBEAT_SECONDS

    store = Store(tmp_path / "s")
    blob = os.urandom(16 * CHUNK)
    ing = Ingest.for_digest(store.layout, Digest.of_bytes(blob), len(blob), CHUNK)
    watch = _Inotify(ing.dir)
    try:
        for _round in range(5):
            watch.owner_events()  # drain
            ing._beat_at -= 2 * HEARTBEAT_SECONDS  # the last beat is long ago
            go = threading.Barrier(16)

            def write(i: int, go: threading.Barrier = go) -> None:
                go.wait()
                ing.write_at(memoryview(blob)[i * CHUNK:(i + 1) * CHUNK], i * CHUNK)

            threads = [threading.Thread(target=write, args=(i,)) for i in range(16)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert watch.owner_events() == 1
    finally:
        watch.close()
        ing.drop()
