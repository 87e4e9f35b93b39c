"""GC learns about ingests only from blobstore.ingest: a live writer's folder is held
whatever its files' times; an abandoned one goes only once its writer's heartbeat is
older than the ingest grace, whatever its files' mtimes say (hypothesis picks writers,
heartbeats and mtimes)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore.gc import GCOptions, gc
from blobstore.ingest import OWNER_TTL, Ingest, scan
from blobstore.ingest import folder as ingest_folder
from blobstore.lease import live_leases
from blobstore.store import Store
from tests.blobstore.test_ingest_writer import crash

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).parents[2]
GRACE = 86400.0


def set_heartbeat(folder: Path, when: float, *, host: str | None = None) -> None:
    """Rewrite the writer's recorded heartbeat (owner and checkpoint) to ``when``."""
    owner = folder / "owner"
    if owner.exists():
        o = msgspec.json.decode(owner.read_bytes(), type=ingest_folder.Owner)
        o.beat = when
        if host is not None:
            o.host, o.pid = host, 4242
        owner.write_bytes(msgspec.json.encode(o))
        os.utime(owner, (when, when))  # a heartbeat sets the owner file's mtime
    state = folder / "state.json"
    if state.exists():
        s = msgspec.json.decode(state.read_bytes(), type=ingest_folder.IngestState)
        s.saved = when
        state.write_bytes(msgspec.json.encode(s))


def set_mtimes(folder: Path, when: float) -> None:
    """Every file time but the owner file's (its mtime is the writer's heartbeat, set
    by that writer only)."""
    for p in [*folder.iterdir(), folder]:
        if p.name != "owner":
            os.utime(p, (when, when))


WRITERS = ["live", "dead", "closed", "foreign"]
AGES = [5.0, GRACE - 600, GRACE + 600, 3 * GRACE, OWNER_TTL + 60, OWNER_TTL - 60]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(folders=st.lists(st.tuples(st.sampled_from(WRITERS), st.sampled_from(AGES),
                                  st.sampled_from(["ancient", "fresh"])),
                        min_size=1, max_size=4))
def test_gc_judges_ingests_by_their_writers_heartbeat(
        tmp_path_factory: pytest.TempPathFactory,
        folders: list[tuple[str, float, str]]) -> None:
    store = Store(tmp_path_factory.mktemp("s"))
    now = time.time()
    expect_gone: dict[Path, bool] = {}
    live: list[Ingest] = []
    for writer, age, mtime in folders:
        ing = Ingest.new(store.layout)
        ing.append(os.urandom(3000))
        if writer == "live":
            live.append(ing)
            ing.checkpoint()
        elif writer == "closed":
            ing.close()
        else:
            crash(ing)
        if writer != "live":
            set_heartbeat(ing.dir, now - age, host="elsewhere" if writer == "foreign" else None)
        # times of the files say nothing: ancient (a rename keeps the user's mtime) or
        # just touched
        set_mtimes(ing.dir, 1000.0 if mtime == "ancient" else now)
        alive = writer == "live" or (writer == "foreign" and age < OWNER_TTL)
        expect_gone[ing.dir] = not alive and age >= GRACE
    r = gc(store, GCOptions(ingest_grace=GRACE))
    for folder, gone in expect_gone.items():
        assert folder.exists() != gone, (folder.name, gone, r.skipped)
        assert (str(folder) in r.removed_ingests) == gone
    for ing in live:
        ing.drop()


def test_scan_reports_owner_lease_and_heartbeat(tmp_path: Path) -> None:
    from blobstore.lease import Lease

    store = Store(tmp_path / "s")
    with Lease(store.layout, "t") as lease:
        a = Ingest.new(store.layout, lease=lease)
        b = Ingest.new(store.layout)
        crash(b)
        set_heartbeat(b.dir, 12345.0)
        legacy = store.layout.ingest / "put-1-abc.tmp"  # an older blobctl's temp file
        legacy.write_bytes(b"x")
        by_name = {e.path.name: e for e in scan(store.layout, live_leases(store.layout))}
        assert by_name[a.key].owner_alive and by_name[a.key].leased and by_name[a.key].held
        assert not by_name[b.key].held and by_name[b.key].heartbeat == 12345.0
        assert by_name[legacy.name].legacy and not by_name[legacy.name].held
        a.drop()


def test_a_writer_in_another_process_is_held_until_it_dies(tmp_path: Path) -> None:
    """A real writer process (no lease at all): its folder is held while it runs, even
    with every file's mtime ancient and GC asked for no grace; once it is killed, the
    heartbeat it left decides."""
    store = Store(tmp_path / "s")
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from blobstore.ingest import Ingest
        from blobstore.layout import Layout
        ing = Ingest.new(Layout(Path({str(store.root)!r})))
        ing.append(b"x" * 100000)
        print(ing.key, flush=True)
        time.sleep(120)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert p.stdout is not None
        key = p.stdout.readline().strip()
        folder = store.layout.ingest / key
        set_mtimes(folder, 1000.0)
        r = gc(store, GCOptions(ingest_grace=0.0))
        assert folder.exists() and not r.removed_ingests
        assert any(s.reason == "its writer is running" for s in r.skipped)
    finally:
        p.kill()
        p.wait()
    r = gc(store, GCOptions(ingest_grace=60.0))  # dead, but its heartbeat is recent
    assert folder.exists()
    r = gc(store, GCOptions(ingest_grace=60.0), now=time.time() + 120)
    assert not folder.exists() and r.removed_ingests == [str(folder)]
