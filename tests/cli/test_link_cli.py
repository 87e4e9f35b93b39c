"""`blobctl link`: two models that map to one link path (found from outside)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from blobstore.name import ModelName
from blobstore.store import Store
from tests.blobstore.archutil import add_model
from tests.cli.clirun import run


@pytest.fixture
def store(tmp_path: Path) -> Path:
    with Store(tmp_path / "s") as s:
        for name, data in (("a", b"A" * 64), ("user/a", b"U" * 64),
                           ("otherhost.io/library/a", b"O" * 64)):
            add_model(s, name, [data])
    return tmp_path / "s"


def _blob_of(store: Path, name: str) -> Path:
    with Store(store) as s:
        path = s.resolve(ModelName.parse(name), record=False).model_path
    assert path is not None
    return path


@pytest.mark.parametrize(("layout", "refs", "hint"), [
    ("lmstudio", ["a", "otherhost.io/library/a"], "hint: link them into different folders "
                                                 "(--to)"),
    ("flat", ["a", "user/a"], "hint: use --layout lmstudio, or link them into different "
                              "folders (--to)")])
def test_a_collision_hint_is_true_for_the_layout_in_use(
        store: Path, tmp_path: Path, layout: str, refs: list[str], hint: str) -> None:
    # found from outside: in lmstudio layout, the default, the hint said --layout lmstudio
    r = run("--store", str(store), "link", *refs, "--to", str(tmp_path / "G"),
            "--layout", layout)
    assert r.code == 4, r.err
    assert r.err.splitlines()[1] == hint
    assert not (tmp_path / "G").exists()


def test_a_link_made_for_another_model_is_not_silently_repointed(
        store: Path, tmp_path: Path) -> None:
    # found from outside: linking separately in flat layout repointed F/a-latest.gguf
    # from a's blob to user/a's
    farm = tmp_path / "F"
    link = farm / "a-latest.gguf"
    assert run("--store", str(store), "link", "a", "--to", str(farm), "--layout",
               "flat").code == 0
    r = run("--store", str(store), "link", "user/a", "--to", str(farm), "--layout", "flat")
    assert r.code == 4, r.err
    assert r.err.splitlines() == [
        f"error: {link} is the link blobctl made for a:latest, not for user/a:latest",
        "hint: use --layout lmstudio, or link them into different folders (--to); or "
        "--replace to point it at user/a:latest"]
    assert os.readlink(link) == str(_blob_of(store, "a"))
    # the same model again is fine, and --replace is asking for it
    assert run("--store", str(store), "link", "a", "--to", str(farm), "--layout",
               "flat").code == 0
    r = run("--store", str(store), "link", "user/a", "--to", str(farm), "--layout", "flat",
            "--replace")
    assert r.code == 0, r.err
    assert os.readlink(link) == str(_blob_of(store, "user/a"))
    # a user's own file stays refused, --replace or not
    link.unlink()
    link.write_bytes(b"mine")
    r = run("--store", str(store), "link", "a", "--to", str(farm), "--layout", "flat",
            "--replace")
    assert r.code == 4 and link.read_bytes() == b"mine"


def test_hardlinks_across_filesystems_leave_nothing_behind(store: Path) -> None:
    # found from outside: exit 4, right, but empty folders and an empty record were left
    other = Path("/dev/shm")
    if not other.is_dir() or os.stat(other).st_dev == os.stat(store).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the store")
    farm = Path(tempfile.mkdtemp(dir=other)) / "farm"
    try:
        r = run("--store", str(store), "link", "a", "user/a", "--to", str(farm),
                "--hardlink")
        assert r.code == 4, r.err
        assert "hardlinks need the same filesystem" in r.err
        assert not farm.exists()
    finally:
        shutil.rmtree(farm.parent)


def _tree(root: Path) -> dict[str, tuple[int, bytes | str]]:
    """Every path under ``root`` with its type and content (a symlink's target)."""
    out: dict[str, tuple[int, bytes | str]] = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(dirpath) / n
            st = p.lstat()
            body: bytes | str = (os.readlink(p) if p.is_symlink() else
                                 p.read_bytes() if p.is_file() else "")
            out[str(p.relative_to(root))] = (st.st_mode, body)
    return out


@pytest.mark.parametrize("contents", [
    {}, {"user-file": "mine"}, {"a.gguf": "mine", "sub/x.gguf": "mine", "dead": None}])
def test_prune_of_a_folder_never_linked_into_leaves_it_as_it_was(
        store: Path, tmp_path: Path, contents: dict[str, str | None]) -> None:
    """Found from outside: ``link --prune --to DIR`` on a folder blobctl never linked into
    wrote ``DIR/.blobctl-links.json`` (``{"links":{}}``) there (spec/cli.md: nothing is
    left behind). No record and nothing to prune: nothing is written."""
    farm = tmp_path / "farm"
    farm.mkdir()
    for rel, text in contents.items():
        (farm / rel).parent.mkdir(parents=True, exist_ok=True)
        if text is None:
            (farm / rel).symlink_to(tmp_path / "gone")  # a dangling link, not ours
        else:
            (farm / rel).write_text(text)
    before = _tree(farm)
    r = run("--store", str(store), "link", "--prune", "--to", str(farm), "--json")
    assert r.code == 0, r.err
    assert r.json() == {"removed": [], "relinked": [], "skipped": []}
    assert _tree(farm) == before
    # a farm blobctl made still keeps its record through a prune
    assert run("--store", str(store), "link", "a", "--to", str(farm)).code == 0
    r = run("--store", str(store), "link", "--prune", "--to", str(farm))
    assert r.code == 0, r.err
    assert (farm / ".blobctl-links.json").is_file()
