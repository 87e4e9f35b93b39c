from __future__ import annotations

import os
from pathlib import Path

from blobstore.store import Store
from tests.blobstore.gcutil import add_model
from tests.cli.clirun import run
from tests.cli.test_store_cli import one_error_line

MB = 1 << 20


def old_store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "s")
    add_model(store, "old", [b"1" * MB], used=1000)
    add_model(store, "new", [b"2" * MB], used=2000)
    store.put_bytes(b"orphan")
    for _d, p, _ in store.iter_blob_files():
        os.utime(p, (1000, 1000))
    for e in store.list_models():
        os.utime(e.path, (1000, 1000))
    return store


def test_gc_json_report_and_dry_run(tmp_path: Path) -> None:
    store = old_store(tmp_path)
    s = str(store.root)
    r = run("gc", "--max-size", "1.5M", "--dry-run", "--json", "--store", s)
    assert r.code == 0, r.err
    plan = r.json()
    assert plan["dry_run"] and plan["removed_models"] == ["registry.ollama.ai/library/old:latest"]
    assert len(store.list_models()) == 2
    r = run("gc", "--max-size", "1.5M", "--json", "--store", s)
    doc = r.json()
    assert r.code == 0
    for key in ("removed_models", "removed_blobs", "freed_bytes", "total_bytes_after", "skipped"):
        assert key in doc
    assert doc["total_bytes_after"] <= int(1.5 * MB)
    assert [e.name.model for e in store.list_models()] == ["new"]


def test_gc_cap_not_met_exit_10(tmp_path: Path) -> None:
    store = old_store(tmp_path)
    s = str(store.root)
    assert run("pin", "old", "new", "--store", s).code == 0
    r = run("gc", "--max-size", "1K", "--store", s)
    assert r.code == 10
    line = one_error_line(r)
    assert "cannot reach the size cap" in line and "pinned" in line
    j = run("gc", "--max-size", "1K", "--json", "--store", s)
    assert j.code == 10 and j.json()["cap_met"] is False


def test_config_max_size(tmp_path: Path) -> None:
    store = old_store(tmp_path)
    s = str(store.root)
    assert run("config", "set", "max-size", "lots", "--store", s).code == 4
    assert run("config", "set", "max-size", "1.5M", "--store", s).code == 0
    assert run("config", "get", "max-size", "--store", s).out.strip() == "1.5M"
    r = run("config", "--json", "--store", s)
    assert r.json() == {"max-size": "1.5M"}
    r = run("gc", "--store", s)  # uses the setting
    assert r.code == 0, r.err
    assert [e.name.model for e in store.list_models()] == ["new"]
    assert run("config", "unset", "max-size", "--store", s).code == 0
    assert run("config", "get", "bogus", "--store", s).code == 4


def test_bad_sizes_and_durations(tmp_path: Path) -> None:
    s = str(tmp_path / "s")
    for args in (("--max-size", "50X"), ("--older-than", "soon"), ("--grace", "-1"),
                 # found from outside: a fullwidth 9 was 9 bytes; a long s, a KeyError
                 ("--max-size", "\uff19"), ("--older-than", "3\u017f"),
                 ("--grace", "\uff11h")):
        r = run("gc", *args, "--store", s)
        assert r.code == 4, (args, r.err)
        one_error_line(r)


def test_gc_waits_for_the_store_lock_then_says_busy(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    from tests.cli.clirun import ROOT
    store = old_store(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, filelock\n"
         f"l = filelock.FileLock({str(store.layout.store_lock)!r}); l.acquire()\n"
         "print('locked', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        r = run("gc", "--max-size", "1K", "--lock-timeout", "0.5", "--store", str(store.root))
        assert r.code == 9 and time.monotonic() - t0 < 10
        assert "busy" in one_error_line(r)
        assert len(store.list_models()) == 2  # nothing was removed
    finally:
        holder.kill()
        holder.wait()
