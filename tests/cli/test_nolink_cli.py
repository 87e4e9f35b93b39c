"""A store on a file system without hard links (vfat, exFAT: link(2) answers EPERM).
Found from outside: every pull failed with exit 11 "cannot write to store at
…/ingest: Operation not permitted", since an ingest folder's owner file was made only
with link(2).

No such file system can be mounted here (no FUSE, no loop devices in the test run), so
blobctl runs as a real process whose ``os.link`` raises EPERM, as link(2) does on vfat:
a ``sitecustomize`` on its PYTHONPATH replaces it before blobctl starts. Everything else
(files, renames, O_EXCL creates, the HTTP server) is real."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from blobstore.digest import Digest
from blobstore.ingest import boot_id
from blobstore.ingest.folder import Owner, owner_status
from blobstore.store import Store
from tests.cli.clirun import run_proc
from tests.helpers import make_gguf
from tests.servers import FaultServer

MODEL = "application/vnd.ollama.image.model"
MiB = 1 << 20

_NOLINK = """\
import errno
import os


def _no_link(src, dst, *args, **kwargs):
    raise OSError(errno.EPERM, "Operation not permitted", str(src), None, str(dst))


os.link = _no_link
"""


@pytest.fixture
def nolink(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "nolink-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_NOLINK)
    return {"PYTHONPATH": str(site)}


@pytest.fixture
def srv() -> Iterator[FaultServer]:
    with FaultServer() as s:
        s.add_model("library/m", "1", b'{"model_format":"gguf"}',
                    [(MODEL, os.urandom(2 * MiB)), ("application/vnd.ollama.image.params",
                                                    b'{"temperature":0.1}')])
        yield s


def _big_layer(srv: FaultServer) -> Digest:
    return Digest.parse(next(d for d, b in srv.blobs.items() if len(b) == 2 * MiB))


@pytest.mark.timeout(60)
def test_pull_works_without_hard_links(srv: FaultServer, tmp_path: Path,
                                       nolink: dict[str, str]) -> None:
    s = tmp_path / "s"
    r = run_proc("pull", f"{srv.netloc}/library/m:1", "--insecure", "--quiet",
                 "--store", str(s), env=nolink)
    assert r.code == 0, r.err
    assert run_proc("verify", "--store", str(s), env=nolink).code == 0
    assert not any((s / ".blobctl" / "ingest").iterdir())  # nothing left behind


@pytest.mark.timeout(60)
def test_a_dead_writers_folder_is_taken_over_without_hard_links(
        srv: FaultServer, tmp_path: Path, nolink: dict[str, str]) -> None:
    """A kill -9 left the big layer's folder with its owner file: the next pull renames
    it away and claims the folder with O_EXCL (the put-back paths need no link either)."""
    s = tmp_path / "s"
    store = Store(s)
    folder = store.layout.ingest / _big_layer(srv).filename
    folder.mkdir(parents=True)
    dead = msgspec.json.encode(Owner(socket.gethostname(), boot_id(), 2**22 + 4321, 1.0))
    (folder / "owner").write_bytes(dead)
    r = run_proc("pull", f"{srv.netloc}/library/m:1", "--insecure", "--quiet",
                 "--store", str(s), env=nolink)
    assert r.code == 0, r.err
    assert not folder.exists()
    assert store.blob_path(_big_layer(srv)).read_bytes() == srv.blobs[str(_big_layer(srv))]


@pytest.mark.timeout(60)
def test_import_hardlink_copies_without_hard_links(tmp_path: Path,
                                                   nolink: dict[str, str]) -> None:
    gguf = make_gguf(tmp_path / "m.gguf")
    r = run_proc("import", str(gguf), "--name", "m", "--hardlink", "--json",
                 "--store", str(tmp_path / "s"), env=nolink)
    assert r.code == 0, r.err
    assert json.loads(r.out)["mode"] == "copy"  # said, not silent


def test_an_empty_owner_file_is_a_writer_being_born(tmp_path: Path) -> None:
    """Made with O_EXCL, an owner file is empty for an instant before its record is
    written: a claimer or GC seeing it then must not take the folder from its writer.
    It counts as alive while younger than the TTL, like an owner on another host."""
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "owner").write_bytes(b"")
    now = time.time()
    alive = owner_status(folder, now, ttl=300)
    assert alive is not None and alive[0]
    os.utime(folder / "owner", (now - 301, now - 301))
    dead = owner_status(folder, now, ttl=300)
    assert dead is not None and not dead[0]
