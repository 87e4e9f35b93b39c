"""A store whose ``blobs/`` (or ``manifests/``, or ``.blobctl/``) is a symlink to another
file system, a common Ollama setup (blobs on a big disk). Found from outside: pull and
import failed with exit 11 "cannot write to store at .../.blobctl/ingest: Invalid
cross-device link", since blobs were written in ``.blobctl/ingest`` and renamed into
``blobs/``, and each retry downloaded again. Blobs are now written on the blobs' own
file system (``blobs/.blobctl-ingest``, spec/store-layout.md "Ingest"), and a manifest
whose temp file would land on another file system is written beside itself."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from blobstore.digest import Digest
from blobstore.store import Store
from tests.cli.clirun import run_proc
from tests.cli.test_pull_cli import MODEL, MiB, pull, tmpfs
from tests.helpers import make_gguf
from tests.servers import FaultServer, sha

_OLLAMA_BLOB = re.compile(r"^sha256[:-][0-9a-fA-F]{64}$")


def _old_ollama_prune(blobs: Path) -> None:
    """The first loop of Ollama's PruneLayers as older versions run it at every start
    (no grace period, no skipping of folders): ``os.Remove`` of every entry whose name is
    not a sha256 blob name (Go's ``os.Remove`` of a folder is an ``rmdir``)."""
    for e in os.scandir(blobs):
        if _OLLAMA_BLOB.match(e.name.replace("-", ":", 1)):
            continue
        try:
            if e.is_dir(follow_symlinks=False):
                os.rmdir(e.path)
            else:
                os.unlink(e.path)
        except OSError:
            pass  # (Ollama logs it and goes on)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("moved", [("blobs",), ("manifests",), ("blobs", "manifests"),
                                   (".blobctl",)])
def test_pull_and_import_into_a_store_with_folders_on_another_disk(
        tmp_path: Path, moved: tuple[str, ...]) -> None:
    big = os.urandom(6 * MiB)
    with FaultServer() as s, tmpfs(tmp_path / "other", "160m") as other:
        s.add_model("library/two", "1", b'{"model_format":"gguf"}',
                    [(MODEL, big), ("application/vnd.ollama.image.params", b"{}")])
        root = tmp_path / "s"
        root.mkdir()
        for name in moved:
            (other / name).mkdir()
            (root / name).symlink_to(other / name)
        (root / "blobs").mkdir(exist_ok=True)
        # an earlier pull was interrupted half way: its ingest is where the store writes
        d = Digest.parse(sha(big))
        state = root / ".blobctl"
        state.mkdir(exist_ok=True)
        apart = (root / "blobs").stat().st_dev != state.stat().st_dev
        assert apart == (moved != ("manifests",))
        area = root / "blobs" / ".blobctl-ingest" if apart else state / "ingest"
        ingest = area / d.filename
        ingest.mkdir(parents=True)
        with open(ingest / "data", "wb") as f:
            f.write(big[:3 * MiB])
            f.truncate(len(big))
        (ingest / "state.json").write_text(json.dumps(
            {"digest": str(d), "size": len(big), "chunk_size": 3 * MiB,
             "done": [[0, 3 * MiB]]}))
        # an Ollama server starts meanwhile: its prune leaves the download alone
        _old_ollama_prune(root / "blobs")
        assert (ingest / "data").exists()

        r = pull(s, root, "--json", ref="library/two:1")
        assert r.code == 0, r.err  # type: ignore[attr-defined]
        summary = json.loads(r.out.splitlines()[-1])  # type: ignore[attr-defined]
        assert summary["bytes_resumed"] >= 3 * MiB  # resumed, not fetched again
        store = Store(root)
        assert store.blob_path(d).read_bytes() == big
        assert store.blob_path(d).stat().st_dev == (root / "blobs").stat().st_dev

        # imports: a copy, and a hardlink of a file on the root disk (copied when the
        # blobs are elsewhere), and an archive export/import round trip
        gguf = make_gguf(tmp_path / "m.gguf", seed=3)
        for args in (("--name", "mine:copy"), ("--hardlink", "--name", "mine:link")):
            r = run_proc("import", str(gguf), *args, "--store", str(root))
            assert r.code == 0, r.err
        tar = tmp_path / "x.tar"
        r = run_proc("export", "mine:copy", "-o", str(tar), "--store", str(root))
        assert r.code == 0, r.err
        r = run_proc("rm", "mine:copy", "mine:link", "--store", str(root))
        assert r.code == 0, r.err
        r = run_proc("import", str(tar), "--store", str(root))
        assert r.code == 0, r.err

        r = run_proc("verify", "--store", str(root))
        assert r.code == 0, r.out + r.err
        names = {m["display_name"] for m in
                 run_proc("list", "--json", "--store", str(root)).json()}
        assert {"mine:copy"} <= names and any("library/two:1" in n for n in names)
        # nothing left in either ingest area, and no temp file beside a manifest
        for folder in {area, root / ".blobctl" / "ingest"}:
            assert not folder.exists() or not os.listdir(folder), os.listdir(folder)
        strays = [p for p in (root / "manifests").rglob("*") if p.name.startswith(".")]
        assert not strays

        # GC recognises a stale ingest in the blobs' own area
        stale = area / ("sha256-" + "ab" * 32)
        stale.mkdir()
        (stale / "data").write_bytes(b"x" * 100)
        r = run_proc("gc", "--ingest-grace", "0", "--json", "--store", str(root))
        assert r.code == 0, r.err
        assert str(stale) in r.json()["removed_ingests"]
        assert not stale.exists()
        r = run_proc("verify", "--store", str(root))
        assert r.code == 0, r.out + r.err
