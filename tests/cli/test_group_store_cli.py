"""A store shared by a group (a setgid folder of mode 2775): two users pull into it.

Found from outside: Bob's pull was interrupted; Alice's pull of the same model then
failed with exit 11 "cannot write to store at .blobctl/ingest: Permission denied", for
the 24 h GC keeps an interrupted download: its data file was made 0644 whatever the
umask, and a folder that could not be written was taken as fatal. Files blobctl makes
now follow the umask (0666 less it, as every ordinary tool's), so with the group's umask
002 Alice resumes Bob's download; with a umask that keeps others out (022) she
downloads into a folder of her own.

The two users are uids without accounts (setpriv); they keep CAP_DAC_READ_SEARCH only so
they can run this Python (under /root, mode 0700): reading is not what is tested, and
writes get no override."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.clirun import ROOT
from tests.servers import Fault, FaultServer

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to run as two other users")

BOB, ALICE, GROUP = 4001, 4002, 4242
MODEL = "application/vnd.ollama.image.model"
MiB = 1 << 20
SIZE = 3 * MiB


def _as(uid: int, umask: int, store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    wrap = ["setpriv", f"--reuid={uid}", f"--regid={GROUP}", "--clear-groups",
            "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
    code = f"import os, runpy, sys; os.umask({umask:#o}); sys.argv[0] = 'blobctl'; " \
           "runpy.run_module('cli', run_name='__main__')"
    return subprocess.run([*wrap, sys.executable, "-c", code, "--store", str(store), *args],
                          capture_output=True, text=True, timeout=60, cwd="/",
                          env={**os.environ, "PYTHONPATH": str(ROOT), "HOME": "/tmp"})


@pytest.fixture
def shared() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="blobctl-group-"))  # not under pytest's 0700 tree
    base.chmod(0o755)
    store = base / "models"
    store.mkdir()
    os.chown(store, 0, GROUP)
    store.chmod(0o2775)
    try:
        yield store
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("bob_umask", "legacy"), [(0o002, False), (0o022, False),
                                                   (0o002, True)])
def test_another_users_interrupted_pull_does_not_block_the_same_pull(
        shared: Path, bob_umask: int, legacy: bool) -> None:
    """``legacy``: Bob's files are 0644 in his group-writable folder, as an older
    blobctl made them (the report's case): Alice owns the folder but cannot write its
    files, and downloads into a folder of her own."""
    with FaultServer() as srv:
        blob = os.urandom(SIZE)
        srv.add_model("library/m", "1", b'{"model_format":"gguf"}', [(MODEL, blob)])
        ref = f"{srv.netloc}/library/m:1"
        # Alice makes the store (with the group's umask); Bob pulls into it with his own
        r = _as(ALICE, 0o002, shared, "config", "set", "max-size", "1TB")
        assert r.returncode == 0, r.stderr
        srv.faults.append(Fault("reset", after=MiB + 4096, times=10**6))
        r = _as(BOB, bob_umask, shared, "pull", ref, "--insecure", "--retries", "0",
                "--quiet")
        assert r.returncode == 6, r.stderr  # cut off: his download is left to resume
        left = [p for p in (shared / ".blobctl" / "ingest").iterdir()
                if p.name.startswith("sha256-")]
        assert left, "Bob's interrupted download left nothing to resume"
        if legacy:
            for p in left[0].iterdir():
                p.chmod(0o644)
        srv.faults.clear()
        before = srv.blob_bytes_sent()
        r = _as(ALICE, 0o002, shared, "pull", ref, "--insecure", "--quiet")
        assert r.returncode == 0, r.stderr
        assert ("downloading it separately" in r.stderr) == (legacy or bob_umask != 0o002)
        fetched = srv.blob_bytes_sent() - before
    r = _as(ALICE, 0o002, shared, "verify")
    assert r.returncode == 0, r.stderr
    if bob_umask == 0o002 and not legacy:
        # every file Bob made is the group's to write: Alice took his download over
        assert fetched < SIZE, fetched
        for p in (shared / ".blobctl").rglob("*"):
            if p.is_file() and p.stat().st_uid == BOB:
                assert p.stat().st_mode & stat.S_IWGRP, p


@pytest.mark.timeout(120)
def test_a_reader_who_cannot_write_state_leaves_nothing_that_locks_its_owner_out(
        shared: Path) -> None:
    """Found from outside (repro_wal_lockout.sh): Alice's state.db was 0644 (sqlite made
    it so); Bob's `list` read it read-only, which made -wal and -shm of his own, 0644, and
    Alice's `unpin` and `config set` then failed for good ("state.db-wal: permission
    denied"). A reader who cannot write the database makes no file beside it."""
    from tests.helpers import make_gguf

    gguf = shared.parent / "m.gguf"
    make_gguf(gguf)
    gguf.chmod(0o644)
    assert _as(ALICE, 0o002, shared, "import", str(gguf), "--name", "m").returncode == 0
    assert _as(ALICE, 0o002, shared, "pin", "m").returncode == 0
    db = shared / ".blobctl" / "state.db"
    db.chmod(0o644)  # as sqlite made it (and an older blobctl let it)
    r = _as(BOB, 0o002, shared, "list", "--json")
    assert r.returncode == 0, r.stderr
    assert [m["pinned"] for m in json.loads(r.stdout)] == [True]  # read, pins and all
    left = [p for p in db.parent.iterdir() if p.name.startswith("state.db")
            and p.stat().st_uid == BOB]
    assert not left, left
    for args in (("unpin", "m"), ("config", "set", "max-size", "10GB")):
        r = _as(ALICE, 0o002, shared, *args)
        assert r.returncode == 0, (args, r.stderr)


@pytest.mark.timeout(120)
def test_fetch_goes_on_without_another_users_download_lock(shared: Path) -> None:
    """Found by review: pull went on without a download lock another user made 0644
    (an older blobctl, or a umask that keeps the group out), fetch stopped with
    'Permission denied'."""
    from blobstore.digest import Digest
    from blobstore.layout import Layout
    from tests.helpers import make_gguf

    data = make_gguf(shared.parent / "m.gguf").read_bytes()
    with FaultServer() as srv:
        d = srv.add_blob(data)
        lock = Layout(shared).blob_lock(Digest.parse(d))
        lock.parent.mkdir(parents=True)
        for p in (shared / ".blobctl", lock.parent):
            os.chown(p, 0, GROUP)
            p.chmod(0o2775)
        lock.write_bytes(b"")
        os.chown(lock, BOB, GROUP)
        lock.chmod(0o644)
        r = _as(ALICE, 0o002, shared, "fetch", f"{srv.url}/v2/x/y/blobs/{d}", "--sha256",
                d.split(":")[1], "--name", "got:1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["status"] == "success"
