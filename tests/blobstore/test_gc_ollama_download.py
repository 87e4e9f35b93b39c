"""Ollama's own unfinished downloads in ``blobs/``: the data file ``<digest
name>-partial`` (kept open while it downloads) and one ``-partial-N`` file per part,
rewritten as the part completes. GC judges them as one download (spec/gc.md, spec/
store-layout.md: removed only when stale). Found from outside: GC removed the part
files of a running download one by one, and Ollama's final ``os.Remove`` of each part
file (server/download.go) then fails."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore.digest import Digest
from blobstore.gc import GCOptions, gc
from blobstore.store import Store
from tests.blobstore.gcutil import held

GRACE = 3600.0
NOW = time.time() + 2 * GRACE  # every file made now is past the ingest grace then


@pytest.mark.timeout(120)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.integers(0, 3),
       live=st.sampled_from(["none", "data open", "data young", "part open", "part young"]),
       other=st.booleans())
def test_the_files_of_one_download_stay_or_go_together(parts: int, live: str,
                                                       other: bool) -> None:
    root = Path(tempfile.mkdtemp(prefix="blobctl-odl-"))
    store = Store(root / "s")
    try:
        blobs = store.layout.blobs
        blobs.mkdir(parents=True, exist_ok=True)
        data = blobs / f"{Digest.of_bytes(b'big').filename}-partial"
        data.write_bytes(b"\0" * 4096)
        files = [data]
        for n in range(parts):
            part = blobs / f"{data.name}-{n}"
            part.write_text(f'{{"N":{n},"Offset":0,"Size":100,"Completed":0}}')
            files.append(part)
        # another download, stale, beside it: it goes whatever happens to this one
        stale = blobs / f"{Digest.of_bytes(b'other').filename}-partial"
        if other:
            stale.write_bytes(b"x")
            (blobs / f"{stale.name}-0").write_text("{}")
        target = data if live.startswith("data") or not parts else files[-1]
        if live.endswith("young"):
            os.utime(target, (NOW - 60, NOW - 60))  # written a minute before "now"
        with (held(target, "open") if live.endswith("open")
              else contextlib.nullcontext()):
            r = gc(store, GCOptions(ingest_grace=GRACE), now=NOW)
            removed = set(r.removed_ingests)
            if live == "none":
                assert all(not f.exists() for f in files)
                assert {str(f) for f in files} <= removed
            else:
                assert all(f.exists() for f in files), [f.name for f in files]
                assert removed.isdisjoint(str(f) for f in files)
                why = {s.what: s.reason for s in r.skipped if s.kind == "ingest"}
                for f in files:
                    if f != target:
                        assert why[str(f)].startswith(f"part of a running download ({data.name}")
            assert not (other and stale.exists())
    finally:
        store.close()
        shutil.rmtree(root, ignore_errors=True)
