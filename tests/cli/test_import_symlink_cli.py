"""``import`` of a path that is a symlink (found from outside: ``--hardlink``/``--move``
put the symlink itself into ``blobs/``; a relative one dangled there and the import
failed with "cannot write to store"; deleting the real file then broke the model).

Hypothesis chooses the chain of symlinks (length, relative or absolute, in which folder
each link sits) and the mode; the store must hold a regular file with the file's bytes,
the user's real file must be intact, and ``--move`` of a symlink is refused (exit 4,
nothing written, nothing removed)."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cli.clirun import run
from tests.helpers import make_gguf, sha256_hex

GGUF = make_gguf(Path(tempfile.mkdtemp(prefix="symlink-gguf-")) / "m.gguf", seed=3)
DATA = GGUF.read_bytes()
HEX = sha256_hex(DATA)

# one link of the chain: (relative?, folder it sits in: "same" as the file, "sub", "up")
LINK = st.tuples(st.booleans(), st.sampled_from(["same", "sub", "up"]))


def _chain(work: Path, real: Path, links: list[tuple[bool, str]]) -> Path:
    """Make the symlinks, each naming the one before (the first names ``real``)."""
    target = real
    for i, (relative, where) in enumerate(links):
        folder = {"same": real.parent, "sub": real.parent / "sub",
                  "up": work}[where]
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / f"link{i}.gguf"
        link.symlink_to(os.path.relpath(target, folder) if relative else target)
        target = link
    return target


@pytest.mark.timeout(120)
@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(links=st.lists(LINK, min_size=1, max_size=4),
       mode=st.sampled_from(["--copy", "--hardlink", "--move"]))
def test_import_of_a_symlink_stores_the_file_it_names(tmp_path: Path,
                                                      links: list[tuple[bool, str]],
                                                      mode: str) -> None:
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    try:
        real = work / "models" / "real.gguf"
        real.parent.mkdir()
        shutil.copyfile(GGUF, real)
        path = _chain(work, real, links)
        store = work / "store"

        r = run("--store", str(store), "import", str(path), "--name", "a", mode)

        assert real.read_bytes() == DATA, "the user's real file must stay whole"
        assert os.path.islink(path) and os.path.realpath(path) == str(real)
        blob = store / "blobs" / f"sha256-{HEX}"
        if mode == "--move":
            assert r.code == 4, r
            assert r.err.startswith(f"error: {path} is a symlink (to {real})"), r.err
            assert f"--move the file itself: {real}" in r.err
            assert not os.path.lexists(blob)
            assert not (store / "manifests").exists() or not any(
                p.is_file() for p in (store / "manifests").rglob("*"))
            return
        assert r.code == 0, r
        assert "warning" not in r.err, r.err
        st_blob = os.lstat(blob)
        assert stat.S_ISREG(st_blob.st_mode), "the blob must be a file, never a symlink"
        assert blob.read_bytes() == DATA
        if mode == "--hardlink":
            assert "hardlink)" in r.out
            assert (st_blob.st_dev, st_blob.st_ino) == (real.stat().st_dev,
                                                        real.stat().st_ino)
        # the user deletes the original and every link: the model stays whole
        shutil.rmtree(work / "models")
        for p in work.glob("link*.gguf"):
            p.unlink()
        v = run("--store", str(store), "verify")
        assert v.code == 0, v
        assert run("--store", str(store), "path", "a").out.strip() == str(blob)
    finally:
        shutil.rmtree(work, ignore_errors=True)
