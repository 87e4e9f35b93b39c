"""The CLI's error boundary: exit codes by class, pins, unreachable registries."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from blobstore import errors
from cli.output import exit_code_for
from registry_client import errors as rerrors
from tests.blobstore.gcutil import add_model
from tests.cli.clirun import run, run_proc


def test_exit_codes_go_by_class_not_by_name() -> None:
    class NotFound(errors.InvalidInput):  # the name of another family: the class decides
        pass

    class Mine(errors.StoreBusy):
        pass

    assert exit_code_for(NotFound("x")) == 4
    assert exit_code_for(Mine("the store", 1.0)) == 9
    assert exit_code_for(rerrors.RemoteNotFound("m")) == 3
    assert exit_code_for(errors.ModelPinned("m")) == 4
    assert exit_code_for(errors.StateUnreadable("db", "x")) == 11
    assert exit_code_for(OSError(28, "No space left on device")) == 8
    assert exit_code_for(RuntimeError("bug")) == 1


def test_rm_of_a_pinned_model_names_the_way_out(tmp_path: Path) -> None:
    from blobstore.name import ModelName
    from blobstore.store import Store

    store = Store(tmp_path / "s")
    add_model(store, "p", [b"p" * 10])
    add_model(store, "q", [b"q" * 10])
    store.set_pinned(ModelName.parse("p"), True)
    r = run("--store", str(store.root), "rm", "q", "p")
    assert r.code == 4
    assert r.err.splitlines() == ["error: model 'p:latest' is pinned",
                                  "hint: unpin it first ('blobctl unpin') or use 'rm --force'"]
    assert store.has_model(ModelName.parse("q"))  # checked first: nothing removed
    r = run("--store", str(store.root), "rm", "--force", "q", "p")
    assert r.code == 0, r.err
    assert not store.has_model(ModelName.parse("p"))


@pytest.mark.timeout(60)
def test_pull_of_a_name_that_does_not_resolve_fails_in_seconds(tmp_path: Path) -> None:
    t0 = time.monotonic()
    r = run_proc("--store", str(tmp_path / "s"), "pull", "nosuchhost.invalid/x/y:z",
                 timeout=30)
    assert time.monotonic() - t0 < 5
    assert r.code == 6
    lines = [ln for ln in r.err.splitlines() if ln.startswith(("error:", "hint:"))]
    assert len(lines) == 2 and lines[0].startswith("error: cannot reach nosuchhost.invalid")
    assert "--retries" in lines[1]


def test_rm_of_one_model_named_twice_removes_it_once(tmp_path: Path) -> None:
    """Names that resolve to one manifest (a:1, A:1, its full name) remove it once and
    report it, instead of "not found" after the removal (found from outside)."""
    from blobstore.name import ModelName
    from blobstore.store import Store

    store = Store(tmp_path / "s")
    add_model(store, "a:1", [b"a" * 10])
    r = run("--store", str(store.root), "rm", "a:1", "A:1",
            "registry.ollama.ai/library/a:1", "--json")
    assert r.code == 0, r.err
    assert [x["name"] for x in r.json()["removed"]] == ["registry.ollama.ai/library/a:1"]
    assert not store.has_model(ModelName.parse("a:1"))


def test_rm_says_which_blobs_it_kept_because_they_are_in_use(tmp_path: Path) -> None:
    from blobstore.name import ModelName
    from blobstore.store import Store

    store = Store(tmp_path / "s")
    add_model(store, "y:1", [b"y" * 1000])
    resolved = store.resolve(ModelName.parse("y:1"))
    assert resolved.model_path is not None
    with open(resolved.model_path, "rb"):  # (this process counts: spec/gc.md)
        r = run("--store", str(store.root), "rm", "y:1", "--json")
        assert r.code == 0, r.err
        assert r.json()["removed"][0]["kept_in_use"] == [f"sha256:{resolved.model_path.name[7:]}"]
        add_model(store, "y:1", [b"y" * 1000])
        r = run("--store", str(store.root), "rm", "y:1")
        assert r.code == 0 and "kept 1 in use by a running process" in r.out, r.out


@pytest.mark.timeout(30)
def test_import_of_a_fifo_or_device_is_refused_at_once(tmp_path: Path) -> None:
    """Found from outside: a FIFO hung import forever (it was opened to look for an
    archive), and /dev/zero was "no such file"."""
    import os

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for path in (str(fifo), "/dev/zero"):
        r = run("--store", str(tmp_path / "s"), "import", path, "--name", "x:1")
        assert r.code == 4, r.err
        assert r.err.splitlines() == [f"error: {path}: not a regular file (a FIFO, device "
                                      "or socket)"]


def test_gc_of_a_missing_store_makes_none_and_an_empty_cap_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "typo"
    r = run("--store", str(missing), "gc", "--max-size", "1G", "--json")
    assert r.code == 3 and r.err.startswith(f"error: no store at {missing}"), r.err
    assert not missing.exists()  # found from outside: gc made a store at a mistyped path
    store = tmp_path / "s"
    assert run("--store", str(store), "config", "set", "max-size", "50G").code == 0
    r = run("--store", str(store), "gc", "--max-size", "", "--json")
    assert r.code == 4 and r.err.startswith("error: invalid size ''"), r.err


def test_the_space_kept_free_is_named_and_workers_must_be_positive(tmp_path: Path) -> None:
    """Found from outside: an 80 KB import into a store with 600 KB free was refused with
    "need 66654688 more bytes" and no word of the 64 MiB blobctl keeps free; `verify
    --workers 0` ran without complaint."""
    from tests.cli.test_pull_cli import tmpfs
    from tests.helpers import make_gguf

    model = make_gguf(tmp_path / "m.gguf")
    with tmpfs(tmp_path / "small", "2m") as mnt:
        r = run("--store", str(mnt / "s"), "import", str(model), "--name", "m:1")
        assert r.code == 8, r.err
        line = r.err.splitlines()[0]
        assert f"({model.stat().st_size} to write plus 64 MiB kept free)" in line, line
    for bad in ("0", "-1"):
        r = run("--store", str(tmp_path / "s"), "verify", "--workers", bad)
        assert r.code == 2 and r.err.startswith("error: "), r.err


_READING = [("list",), ("du",), ("verify",), ("show", "t/a:1"), ("path", "t/a:1"),
            ("compare",), ("compare", "t/a:1"), ("bench", "--history", "t/a:1"), ("gc",),
            ("pin", "t/a:1"), ("import", "{gguf}", "--name", "t/b:1")]


@pytest.mark.timeout(120)
def test_a_store_path_that_is_a_file_is_no_store_for_every_command(tmp_path: Path) -> None:
    """Found from outside: `list --store FILE` said no models (exit 0), `du` exit 11 "Not a
    directory", `compare` "no benchmark results yet": every command now says there is no
    store there (exit 3), in one line."""
    from tests.helpers import make_gguf

    f = tmp_path / "afile"
    f.write_bytes(b"not a store")
    gguf = str(make_gguf(tmp_path / "m.gguf"))
    for cmd in _READING:
        r = run(*(a.replace("{gguf}", gguf) for a in cmd), "--store", str(f))
        assert r.code == 3, (cmd, r.code, r.err)
        lines = r.err.splitlines()
        assert lines[0] == f"error: no store at {f}: it is a file, not a folder", (cmd, r.err)
        assert len([x for x in lines if x.startswith("error: ")]) == 1
    assert f.read_bytes() == b"not a store"


@pytest.mark.timeout(300)
def test_a_store_this_process_cannot_read_says_so(tmp_path: Path) -> None:
    """Found from outside: with a store of mode 000 (another user's), read-only commands
    said "cannot write to store", and `compare` "no benchmark results yet" (exit 0). As
    root, run without the capabilities that bypass permissions."""
    import os
    import shutil
    import subprocess
    import sys

    from blobstore.store import Store
    from tests.blobstore.test_gc_unreadable import _no_dac
    from tests.cli.clirun import ROOT
    from tests.helpers import make_gguf

    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to drop root's permission override")
    store = tmp_path / "s"
    gguf = str(make_gguf(tmp_path / "m.gguf"))
    assert run("import", gguf, "--name", "t/a:1", "--store", str(store)).code == 0
    (store / ".blobctl" / "bench").mkdir(parents=True, exist_ok=True)
    Store(store).close()
    os.chmod(store, 0)
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        prefix = _no_dac() if os.geteuid() == 0 else []
        for cmd in _READING[:-1]:
            p = subprocess.run([*prefix, sys.executable, "-m", "cli", *cmd, "--store",
                                str(store)], capture_output=True, text=True, env=env,
                               cwd=ROOT, timeout=60)
            assert p.returncode == 11, (cmd, p.returncode, p.stderr)
            errors_ = [x for x in p.stderr.splitlines() if x.startswith("error: ")]
            assert len(errors_) == 1 and "cannot read" in errors_[0], (cmd, p.stderr)
            assert "cannot write" not in p.stderr
    finally:
        os.chmod(store, 0o755)
