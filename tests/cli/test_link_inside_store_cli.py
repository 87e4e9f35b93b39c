"""``link --to`` a folder inside the store is refused (found from outside: ``--to
STORE/manifests/registry.ollama.ai`` wrote ``library/m/m-latest.gguf`` there, which the
store read as model ``m:m-latest.gguf``: list warned, verify exited 5).

Hypothesis chooses the store folder, how deep below it, and how ``--to`` reaches it (its
own spelling, ``..``, a symlink, a chain of them, a bind mount); the store must be left
exactly as it was and a folder outside it must still work."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.blobstore.archutil import add_model
from tests.cli.clirun import run

pytestmark = pytest.mark.timeout(240)

FOLDERS = ["", "blobs", "manifests", "manifests/registry.ollama.ai",
           "manifests/registry.ollama.ai/library", ".blobctl", ".blobctl/ingest"]


def _files(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under the store but the state folder's moving parts (locks, state)."""
    out = {}
    for p in root.rglob("*"):
        rel = p.relative_to(root).as_posix()
        if rel.startswith(".blobctl/") and not rel.startswith(".blobctl/ingest"):
            continue
        st = os.lstat(p)
        out[rel] = (st.st_mode, st.st_size)
    return out


def _bind(src: Path, dst: Path) -> bool:
    dst.mkdir(parents=True)
    return subprocess.run(["mount", "--bind", str(src), str(dst)],
                          capture_output=True).returncode == 0


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(folder=st.sampled_from(FOLDERS),
       below=st.lists(st.sampled_from(["x", "library", "m"]), max_size=2),
       via=st.sampled_from(["direct", "dotdot", "symlink", "chain", "bind", "inner"]),
       layout=st.sampled_from(["lmstudio", "flat"]), hardlink=st.booleans())
def test_link_into_the_store_is_refused_and_changes_nothing(
        tmp_path: Path, folder: str, below: list[str], via: str, layout: str,
        hardlink: bool) -> None:
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    store = work / "s"
    add_model_store(store)
    inside = store / folder if folder else store
    mounted: Path | None = None
    try:
        if via == "direct":
            to = inside
        elif via == "dotdot":
            to = store / "blobs" / ".." / (folder or ".")
        elif via == "symlink":
            (work / "ln").symlink_to(inside)
            to = work / "ln"
        elif via == "inner":  # a symlinked folder in the store, leading out of it: the
            (work / "ext").mkdir()  # store reads what is below it (found by review)
            (inside / "ext").symlink_to(work / "ext")
            to = inside / "ext"
        elif via == "chain":
            (work / "ln1").symlink_to(inside)
            (work / "ln2").symlink_to(os.path.relpath(work / "ln1", work))
            to = work / "ln2"
        else:
            if not _bind(inside, work / "mnt"):
                pytest.skip("no bind mounts here")
            mounted = to = work / "mnt"
        to = to.joinpath(*below)
        before = _files(store)

        r = run("--store", str(store), "link", "m", "--to", str(to), "--layout", layout,
                *(["--hardlink"] if hardlink else []))

        assert r.code == 4, r
        errors = [x for x in r.err.splitlines() if x.startswith("error: ")]
        assert len(errors) == 1 and "is inside the store" in errors[0], r.err
        assert _files(store) == before, "nothing may be written into the store"
        assert run("--store", str(store), "verify").code == 0
        listed = run("--store", str(store), "list")
        assert listed.code == 0 and listed.err == "", listed
        # a folder outside the store works as before
        ok = run("--store", str(store), "link", "m", "--to", str(work / "out"), "--layout",
                 layout, *(["--hardlink"] if hardlink else []))
        assert ok.code == 0, ok
    finally:
        if mounted is not None:
            subprocess.run(["umount", str(mounted)], check=False)
        shutil.rmtree(work, ignore_errors=True)


def add_model_store(root: Path) -> None:
    from blobstore.store import Store

    with Store(root) as s:
        add_model(s, "m", [b"GGUF" + b"\0" * 60])
