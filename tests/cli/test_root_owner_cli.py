"""``sudo blobctl`` on a store that belongs to another user (Ollama's service keeps its
models in /usr/share/ollama/.ollama/models, owned by the ``ollama`` user): everything
blobctl makes there is that user's, not root's (spec/store-layout.md, "Owners").

Found from outside: a plain ``sudo blobctl list`` left ``.blobctl/state.db`` root's, and
the service user's blobctl then failed every pull (exit 11); ``sudo blobctl import`` left
``manifests/registry.ollama.ai/library`` root's, where Ollama could then make no model
folder; the lock file of a ``sudo blobctl pull`` stayed root's and failed the service
user's next pull of that blob. Hypothesis picks which commands run as root, in which
order, and whether a pull is killed midway (an unfinished download is adopted later by
whoever pulls next, so its folder and files must be the owner's too)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from blobstore.owner import make_dirs
from tests.cli.clirun import ROOT, run_proc
from tests.helpers import make_gguf
from tests.servers import Fault, FaultServer, sha

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to run as root)")

UID, GID = 54321, 54322  # a user and group without a passwd entry: chown needs none
MODEL = "application/vnd.ollama.image.model"
MiB = 1 << 20

OPS = ["list", "import", "pin", "config", "pull", "killed-pull", "rm", "gc", "index"]


def _root_owned(store: Path) -> list[str]:
    bad = []
    for folder, dirs, files in os.walk(store):
        for name in [*dirs, *files]:
            st = os.lstat(os.path.join(folder, name))
            if (st.st_uid, st.st_gid) != (UID, GID):
                bad.append(f"{os.path.join(folder, name)} {st.st_uid}:{st.st_gid}")
    return bad


def _killed_pull(srv: FaultServer, store: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "cli", "--store", str(store), "pull",
                          f"{srv.netloc}/library/slow:1", "--insecure"], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    try:
        # killed once its download has begun: the ingest folder holds a data file
        while not any((store / ".blobctl" / "ingest").glob("sha256-*/data")):
            assert p.poll() is None and time.monotonic() < deadline, "the pull never began"
            time.sleep(0.02)
        time.sleep(0.1)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)


@pytest.mark.timeout(240)
def test_what_root_makes_in_another_users_store_is_that_users(tmp_path: Path) -> None:
    gguf = make_gguf(tmp_path / "m.gguf")
    with FaultServer() as srv:
        srv.add_model("library/m", "1", b'{"model_format":"gguf"}',
                      [(MODEL, os.urandom(2 * MiB))])
        slow = os.urandom(4 * MiB)
        srv.add_model("library/slow", "1", b'{"model_format":"gguf"}', [(MODEL, slow)])
        srv.faults.append(Fault("slow", match=sha(slow), times=10_000, rate=256 * 1024))
        stores = iter(range(10_000))

        @settings(max_examples=6, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(ops=st.lists(st.sampled_from(OPS), min_size=1, max_size=4))
        @example(ops=["killed-pull", "config", "gc"])  # every command at least once
        @example(ops=["import", "pin", "index", "pull", "rm", "list"])
        def one(ops: list[str]) -> None:
            store = tmp_path / f"s{next(stores)}"
            store.mkdir()
            os.chown(store, UID, GID)
            s = ("--store", str(store))
            for op in ops:
                if op == "list":
                    r = run_proc("list", *s)
                elif op == "import":
                    r = run_proc("import", str(gguf), "--name", "mine:q4", *s)
                elif op == "pin":
                    r = run_proc("pin", "mine:q4", *s)
                    assert r.code in (0, 3), r.err  # 3: not imported yet
                    continue
                elif op == "config":
                    r = run_proc("config", "set", "max-size", "1T", *s)
                elif op == "pull":
                    r = run_proc("pull", f"{srv.netloc}/library/m:1", "--insecure", *s)
                elif op == "killed-pull":
                    _killed_pull(srv, store)
                    continue
                elif op == "rm":
                    r = run_proc("rm", "--force", "mine:q4", *s)
                    assert r.code in (0, 3), r.err
                    continue
                elif op == "gc":
                    r = run_proc("gc", "--grace", "0s", "--ingest-grace", "0s", *s)
                else:
                    r = run_proc("index", "--all-layers", "mine:q4", *s)
                    assert r.code in (0, 3, 4), r.err
                    continue
                assert r.code == 0, (op, r.err)
            assert _root_owned(store) == []

        one()


def test_a_store_that_is_roots_and_other_users_files_stay_as_they_are(tmp_path: Path) -> None:
    mine = tmp_path / "roots"
    mine.mkdir()
    r = run_proc("import", str(make_gguf(tmp_path / "m.gguf")), "--name", "x:1",
                 "--store", str(mine))
    assert r.code == 0, r.err
    assert {os.lstat(p).st_uid for p in mine.rglob("*")} == {0}
    theirs = tmp_path / "theirs"
    (theirs / ".blobctl" / "locks").mkdir(parents=True)
    os.chown(theirs, UID, GID)
    lock = theirs / ".blobctl" / "locks" / "other.lock"
    lock.write_bytes(b"")
    os.chown(lock, 777, 778)  # another user's file in that store: never taken from them
    r = run_proc("import", str(tmp_path / "m.gguf"), "--name", "x:1", "--store", str(theirs))
    assert r.code == 0, r.err
    assert (os.lstat(lock).st_uid, os.lstat(lock).st_gid) == (777, 778)
    made = theirs / "manifests" / "registry.ollama.ai" / "library" / "x" / "1"
    assert (os.lstat(made).st_uid, os.lstat(made.parent.parent).st_uid) == (UID, UID)


def test_make_dirs_is_mkdir_parents_exist_ok(tmp_path: Path) -> None:
    make_dirs(tmp_path / "a" / "b" / "c")
    make_dirs(tmp_path / "a" / "b" / "c")
    assert (tmp_path / "a" / "b" / "c").is_dir()
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(FileExistsError):
        make_dirs(tmp_path / "f")
    with pytest.raises(NotADirectoryError):
        make_dirs(tmp_path / "f" / "g")


@pytest.mark.timeout(120)
@settings(max_examples=6, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(planted=st.sampled_from(["data", "journal.tmp", "journal", "state.json", "owner"]),
       relative=st.booleans())
def test_a_symlink_the_stores_owner_planted_is_never_followed_by_root(
        tmp_path_factory: pytest.TempPathFactory, planted: str, relative: bool) -> None:
    """Found by review: the owner of the store (the ``ollama`` user) could put a symlink
    at ``data`` in a download's folder pointing at any root file (``/etc/shadow``); the
    next ``sudo blobctl pull`` of that blob opened it, truncated it, and handed it to
    them. Now no file of a download's folder is opened through a symlink: the pull
    downloads into a folder of its own, and the file stays as it was, root's."""
    tmp = tmp_path_factory.mktemp("plant")
    victim = tmp / "victim"
    victim.write_bytes(b"root's secret\n")
    os.chmod(victim, 0o600)
    store = tmp / "s"
    layer = os.urandom(3 * MiB)
    folder = store / ".blobctl" / "ingest" / ("sha256-" + sha(layer).split(":")[1])
    folder.mkdir(parents=True)
    for p in [store, *folder.relative_to(store).parents, folder.relative_to(store)]:
        os.chown(store / p, UID, GID)
    link = folder / planted
    link.symlink_to(os.path.relpath(victim, folder) if relative else victim)
    os.lchown(link, UID, GID)
    with FaultServer() as srv:
        srv.add_model("library/m", "1", b'{"model_format":"gguf"}', [(MODEL, layer)])
        r = run_proc("pull", f"{srv.netloc}/library/m:1", "--insecure", "--store", str(store))
    assert r.code == 0, r.err
    st = os.stat(victim)
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)
    assert victim.read_bytes() == b"root's secret\n"
    assert _root_owned(store) == []
