"""A store on a full disk or a read-only medium (found from outside): blobctl reads its
state read-only there, so `list`, `du`, `verify` and `gc --dry-run` work, pins stay
known, and `gc` and `rm`, which are how a user frees space, still do; a state that
cannot be read at all is an error (exit 11), never "no pins" or "no cap"."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from blobstore.name import ModelName
from blobstore.store import Store
from tests.blobstore.gcutil import add_model
from tests.cli.clirun import ROOT, run, run_proc
from tests.cli.test_pull_cli import tmpfs

MB = 1_000_000


def _fill(mnt: Path) -> None:
    with open(mnt / "filler", "wb") as f, contextlib.suppress(OSError):  # every free block
        while True:
            f.write(b"\0" * (1 << 20))
            f.flush()


def _two_models(root: Path) -> Store:
    store = Store(root)
    add_model(store, "big:1", [b"b" * (20 * MB)], used=5)
    add_model(store, "keep:1", [b"k" * 300_000], used=1)
    store.set_pinned(ModelName.parse("keep:1"), True)
    store.set_config("max-size", "50G")
    store.close()
    return store


@pytest.mark.timeout(120)
def test_a_full_disk_can_still_be_listed_and_freed(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "100m") as mnt:
        store = _two_models(mnt / "s")
        _fill(mnt)
        s = str(store.root)
        r = run("--store", s, "list", "--json")
        assert r.code == 0, r.err
        rows = {m["display_name"]: m for m in r.json()}
        assert rows["keep:1"]["pinned"] and not rows["big:1"]["pinned"]
        r = run("--store", s, "config", "get", "max-size")
        assert (r.code, r.out.strip()) == (0, "50G"), r.err
        r = run("--store", s, "gc", "--max-size", "1M", "--grace", "0", "--json")
        assert r.code == 0, r.err
        report = r.json()
        assert report["removed_models"] == ["registry.ollama.ai/library/big:1"]
        assert any(k["reason"] == "pinned" for k in report["skipped"])
        assert Store(mnt / "s").has_model(ModelName.parse("keep:1"))
        # rm frees space on a full disk too
        (mnt / "filler").unlink()
        add_model(Store(mnt / "s"), "big:2", [b"c" * (20 * MB)])
        _fill(mnt)
        r = run("--store", s, "rm", "big:2")
        assert r.code == 0, r.err
        r = run("--store", s, "rm", "keep:1")
        assert r.code == 4 and "pinned" in r.err  # the pin is still known


@pytest.mark.timeout(120)
@pytest.mark.parametrize("left", ["none", "empty", "empty with empty wal"])
def test_a_store_blobctl_never_touched_can_be_freed_on_a_full_disk(tmp_path: Path,
                                                                   left: str) -> None:
    """Found from outside: an Ollama store blobctl had never used, on a full disk: the
    first open of the state failed and left a 0-byte state.db (as blobctl's own creation
    of the file before sqlite does), which was then taken for a database that cannot be
    read: list, gc, rm and verify all failed (exit 11), so space could not be freed. An
    empty state.db holds no state: no pins, no settings."""
    with tmpfs(tmp_path / "small", "100m") as mnt:
        store = Store(mnt / "s")
        add_model(store, "big:1", [b"b" * (20 * MB)])
        add_model(store, "other:1", [b"o" * 300_000])
        orphan = store.put_bytes(b"x" * (5 * MB))  # referenced by nothing
        store.close()
        for p in store.layout.state_db.parent.glob("state.db*"):
            p.unlink()  # as Ollama leaves its folder: no blobctl state at all
        if left != "none":
            store.layout.state_db.touch()
        if left == "empty with empty wal":
            Path(f"{store.layout.state_db}-wal").touch()
        _fill(mnt)
        s = str(store.root)
        r = run("--store", s, "list", "--json")
        assert r.code == 0, r.err
        assert {m["display_name"]: m["pinned"] for m in r.json()} == {
            "big:1": False, "other:1": False}
        r = run("--store", s, "verify")
        assert r.code == 0, r.err
        r = run("--store", s, "config", "get", "max-size")
        assert r.code == 0, r.err
        r = run("--store", s, "gc", "--grace", "0", "--json")
        assert r.code == 0, r.err
        assert r.json()["removed_blobs"] == [str(orphan)]
        r = run("--store", s, "rm", "big:1")
        assert r.code == 0, r.err
        assert not Store(mnt / "s").has_model(ModelName.parse("big:1"))
        _fill(mnt)  # full again (what rm freed)
        r = run("--store", s, "pin", "other:1")  # a write of state: out of space
        assert r.code == 8, (r.code, r.err)
        (mnt / "filler").unlink()
        r = run("--store", s, "pin", "other:1")  # space again: the state works
        assert r.code == 0, r.err
        assert Store(mnt / "s").is_pinned(ModelName.parse("other:1"))


def test_an_empty_state_file_is_no_state_while_it_cannot_be_opened(tmp_path: Path) -> None:
    """The API view of the same, on a read-only medium: a 0-byte state.db reads as "no
    pins, no settings", and GC and rm work; one with bytes that cannot be read is still
    StateUnreadable."""
    from blobstore.errors import StateUnreadable
    from blobstore.gc import GCOptions, gc

    store = Store(tmp_path / "src" / "s")
    add_model(store, "a:1", [b"a"])
    store.close()
    for p in store.layout.state_db.parent.glob("state.db*"):
        p.unlink()
    store.layout.state_db.touch()
    with _read_only_view(tmp_path / "src", tmp_path / "ro") as ro:
        view = Store(ro / "s", create=False)
        assert view.model_states() == {}
        assert view.get_config("max-size") is None
        assert not view.is_pinned(ModelName.parse("a:1"))
        assert gc(view, GCOptions(dry_run=True, grace=0)).removed_models == []
    store.layout.state_db.write_bytes(b"not a database" * 100)
    with (_read_only_view(tmp_path / "src", tmp_path / "ro2") as ro,
          pytest.raises(StateUnreadable)):
        Store(ro / "s", create=False).model_states()


@contextlib.contextmanager
def _read_only_view(src: Path, dst: Path) -> Iterator[Path]:
    dst.mkdir()
    if subprocess.run(["mount", "--bind", str(src), str(dst)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot bind-mount here (needs root)")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(dst)], check=True)
        yield dst
    finally:
        subprocess.run(["umount", "-l", str(dst)], check=False)


def test_a_read_only_store_is_listed_with_its_pins(tmp_path: Path) -> None:
    _two_models(tmp_path / "src" / "s")
    with _read_only_view(tmp_path / "src", tmp_path / "ro") as ro:
        s = str(ro / "s")
        for args in (["list"], ["du"], ["verify"], ["gc", "--dry-run"]):
            r = run("--store", s, *args, "--json")
            assert r.code == 0, (args, r.err)
        assert {m["display_name"]: m["pinned"] for m in run("--store", s, "list", "--json").json()
                } == {"big:1": False, "keep:1": True}
        r = run("--store", s, "config", "get", "max-size")
        assert (r.code, r.out.strip()) == (0, "50G"), r.err


@pytest.mark.timeout(120)
def test_a_read_only_store_left_by_a_crash_says_so_up_front(tmp_path: Path) -> None:
    """A store whose last writer died (its state's WAL and shared memory left behind),
    then seen on a read-only medium: sqlite opens that database "for writing" without
    a word and only fails at the first write. blobctl must read it read-only, with the
    pin that is only in the WAL, say so once, and refuse a pin as read-only."""
    store = _two_models(tmp_path / "src" / "s")
    crash = ("import os, sys; from pathlib import Path; from blobstore.store import Store;"
             " from blobstore.name import ModelName;"
             " s = Store(Path(sys.argv[1])); s.set_pinned(ModelName.parse('big:1'), True);"
             " os._exit(0)")
    subprocess.run([sys.executable, "-c", crash, str(store.root)], check=True, timeout=60)
    db = store.layout.state_db
    assert Path(f"{db}-wal").stat().st_size > 0 and Path(f"{db}-shm").exists()
    with _read_only_view(tmp_path / "src", tmp_path / "ro") as ro:
        s = str(ro / "s")
        r = run_proc("--store", s, "list", "--json")  # (a real process: its stderr)
        assert r.code == 0, r.err
        assert {m["display_name"]: m["pinned"] for m in r.json()} == {
            "big:1": True, "keep:1": True}
        assert "state is read-only" in r.err and "read-only file system" in r.err, r.err
        r = run_proc("--store", s, "show", "keep:1")  # records a use: warned, not failed
        assert r.code == 0, r.err
        assert "could not record" not in r.err, r.err
        r = run("--store", s, "unpin", "keep:1")
        assert r.code == 11, (r.code, r.err)
        assert [x for x in r.err.splitlines() if x.startswith("error:")], r.err


def test_a_state_that_cannot_be_read_is_an_error_for_settings_too(tmp_path: Path) -> None:
    store = _two_models(tmp_path / "s")
    for extra in ("-wal", "-shm"):
        Path(f"{store.layout.state_db}{extra}").unlink(missing_ok=True)
    store.layout.state_db.write_bytes(b"this is not a sqlite database" * 100)
    r = run("--store", str(store.root), "config", "get", "max-size")
    assert r.code == 11, (r.code, r.out, r.err)
    assert [x for x in r.err.splitlines() if x.startswith("error:")], r.err


@pytest.mark.timeout(120)
def test_a_store_on_a_full_disk_sees_a_pin_made_after_it_opened(tmp_path: Path) -> None:
    """A long-lived Store (a server) that had to read its state read-only on a full disk
    must not keep that view: an immutable read sees no later commit, so a pin made by
    another process once space was freed would read as "not pinned" and GC could evict
    the model (found by review). Each use opens afresh and tries writing again."""
    from blobstore.errors import CapNotMet
    from blobstore.gc import GCOptions, gc

    with tmpfs(tmp_path / "small", "100m") as mnt:
        _two_models(mnt / "s")
        _fill(mnt)
        server = Store(mnt / "s")
        big = ModelName.parse("big:1")
        st = server.state
        assert st is not None and st.readonly
        assert not server.model_states()[big.key].pinned
        (mnt / "filler").unlink()
        other = Store(mnt / "s")
        other.set_pinned(big, True)
        other.close()
        assert server.model_states()[big.key].pinned
        with pytest.raises(CapNotMet):
            gc(server, GCOptions(max_size=0, grace=0))
        assert server.has_model(big)


@pytest.mark.timeout(120)
def test_a_state_whose_wal_another_user_owns_is_read_only_up_front(tmp_path: Path) -> None:
    """Found by review: only state.db was checked, so a WAL or shared-memory file left
    by `sudo blobctl` (root's) let the state open "for writing" and fail at each write.
    Run without root's permission override, as the user would be."""
    import shutil

    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to drop root's permission override")
    store = _two_models(tmp_path / "s")
    crash = ("import os, sys; from pathlib import Path; from blobstore.store import Store;"
             " from blobstore.name import ModelName;"
             " s = Store(Path(sys.argv[1])); s.set_pinned(ModelName.parse('big:1'), True);"
             " os._exit(0)")
    subprocess.run([sys.executable, "-c", crash, str(store.root)], check=True, timeout=60)
    Path(f"{store.layout.state_db}-wal").chmod(0o444)
    wrap = (["setpriv", "--bounding-set=-dac_override,-dac_read_search",
             "--inh-caps=-dac_override,-dac_read_search"] if os.geteuid() == 0 else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*wrap, sys.executable, "-m", "cli", "--store",
                               str(store.root), *args], capture_output=True, text=True,
                              env=env, timeout=60, cwd=ROOT)

    r = cli("list", "--json")
    assert r.returncode == 0, r.stderr
    assert "state is read-only" in r.stderr and "permission denied" in r.stderr, r.stderr
    assert {m["display_name"]: m["pinned"] for m in json.loads(r.stdout)} == {
        "big:1": True, "keep:1": True}
    r = cli("unpin", "keep:1")
    assert r.returncode == 11, r.stderr
    assert [x for x in r.stderr.splitlines() if x.startswith("error:")], r.stderr


@pytest.mark.timeout(120)
def test_export_to_a_full_disk_names_the_path_and_the_sizes(tmp_path: Path) -> None:
    """Found from outside: ``export tiny:v1 -o small/x.tar`` on a full disk printed only
    "error: No space left on device" (exit 8). A plain tar that cannot fit is refused
    before writing; a tar.zst that fills the disk says so; both name the output, the
    archive's size and the space free there, and leave nothing behind."""
    store = Store(tmp_path / "s")
    add_model(store, "tiny:v1", [os.urandom(12 * MB)])  # random: zstd cannot shrink it
    store.close()
    with tmpfs(tmp_path / "small", "8m") as mnt:
        for name, says in (("x.tar", "the archive is about 12 MB"),
                           ("x.tar.zst", "the disk filled up after")):
            out = mnt / name
            r = run("--store", str(tmp_path / "s"), "export", "tiny:v1", "-o", str(out))
            assert r.code == 8, r.err
            [line] = [x for x in r.err.splitlines() if x.startswith("error: ")]
            assert f"not enough disk space for {out}" in line and says in line, r.err
            assert "was free there" in line and "hint: " in r.err, r.err
            assert list(mnt.iterdir()) == [], list(mnt.iterdir())


@pytest.mark.timeout(120)
def test_push_to_a_registry_with_a_full_disk_quotes_its_error(tmp_path: Path) -> None:
    """Found from outside: a push to a docker-registry whose disk is full ended with
    "hint: the registry is busy or rate-limiting"; its 500 says what failed (UNKNOWN,
    "write …: no space left on device"): the error and the hint quote it."""
    from tests.servers import running_registry

    store = Store(tmp_path / "s")
    add_model(store, "big:1", [os.urandom(30 << 20)])
    store.close()
    with tmpfs(tmp_path / "reg", "20m") as mnt:
        for reg in running_registry(mnt):
            r = run("--store", str(tmp_path / "s"), "push", "big:1",
                    f"{reg.netloc}/full/big:1", "--insecure", "--retries", "1",
                    "--chunk-size", "4M", "--no-index")
            assert r.code == 6, r.err
            [line] = [x for x in r.err.splitlines() if x.startswith("error: ")]
            assert "answered 500" in line and "no space left on device" in line, r.err
            assert "hint: the registry reported an error (" in r.err, r.err
            assert "rate-limiting" not in r.err, r.err


def _fill_leaving(mnt: Path, pages: int) -> None:
    """Fill the disk but ``pages`` blocks."""
    st = os.statvfs(mnt)
    with open(mnt / "filler", "wb") as f, contextlib.suppress(OSError):
        f.write(b"\0" * max(0, st.f_bavail - pages) * st.f_frsize)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("pages", [0, 1, 8])
def test_writes_on_a_full_disk_say_so_with_exit_8(tmp_path: Path, pages: int) -> None:
    """Found from outside (``K=1 repro_full2.sh``): a pull whose blobs were all there
    failed writing its manifest with exit 11 "check permissions", and pin, unpin and
    ``config set`` with exit 11 "store is opened read-only" (the state was read
    read-only since not even its shared memory could be made) or "database or disk is
    full": the disk is full, exit 8 (spec/cli.md). With a few blocks left a command may
    still succeed; none may blame permissions."""
    from tests.servers import FaultServer

    with tmpfs(tmp_path / "small", "100m") as mnt, FaultServer() as srv:
        layers = [("application/vnd.ollama.image.model", os.urandom(300_000))]
        srv.add_model("library/m", "1", b'{"model_format":"gguf"}', layers)
        srv.add_model("library/m", "2", b'{"model_format":"gguf","x":2}', layers)
        s = str(mnt / "s")
        ref, again = f"{srv.netloc}/library/m:1", f"{srv.netloc}/library/m:2"
        for r in (ref, again):
            assert run_proc("pull", r, "--insecure", "--quiet", "--store", s).code == 0
        assert run("--store", s, "pin", ref).code == 0
        # m:2's manifest goes: a pull of it again finds every blob and writes only it
        manifest = Store(mnt / "s").find_manifest_path(ModelName.parse(again))
        assert manifest is not None
        manifest.unlink()
        _fill_leaving(mnt, pages)
        for args in (("pull", again, "--insecure", "--quiet"), ("unpin", ref),
                     ("pin", ref), ("config", "set", "max-size", "1GB")):
            r = run_proc(*args, "--store", s)
            errors = [x for x in r.err.splitlines() if x.startswith("error: ")]
            assert r.code in (0, 8), (args, r.code, r.err)
            assert "permissions" not in r.err and "read-only" not in "".join(errors), r.err
            if r.code == 8:
                assert len(errors) == 1 and "not enough disk space" in errors[0], r.err
            elif pages == 0:
                pytest.fail(f"{args} succeeded on a disk with no block free: {r.err}")
