"""A refused write or read names the file or folder that refused it, not the store root
(found from outside: `rm` refused by a root-owned folder of ``manifests/`` said "cannot
write to store at <root>: Permission denied" of a root the user could write; `show` of
a model whose manifest the user cannot read said "cannot read <root>"). Run as the user
would be: as root, without the capabilities that bypass file permissions."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore.name import ModelName
from blobstore.store import Store
from tests.blobstore.gcutil import add_model
from tests.blobstore.test_gc_unreadable import _no_dac
from tests.cli.clirun import ROOT

pytestmark = pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None,
                                reason="needs setpriv to drop root's permission override")

NAME = ModelName.parse("ns/model:tag")


def _cli(store: Path, *args: str) -> tuple[int, str]:
    prefix = _no_dac() if os.geteuid() == 0 else []
    p = subprocess.run([*prefix, sys.executable, "-m", "cli", "--store", str(store), *args],
                       capture_output=True, text=True, cwd=ROOT, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    errors = [x for x in p.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) <= 1 and "Traceback" not in p.stderr, p.stderr
    return p.returncode, errors[0] if errors else ""


def _store(root: Path) -> Store:
    store = Store(root)
    add_model(store, str(NAME), [b"weights" * 1000])
    add_model(store, "other:1", [b"other" * 1000])
    store.close()
    return store


# the folder between manifests/ and the tag a write must change (host 1, namespace 2,
# model 3), and what writes there: rm of the model (its model folder), or an import of a
# new name whose first new part goes into that folder
WRITES = st.sampled_from([(3, "rm", ""), (1, "import", "fresh/x:1"),
                          (2, "import", "ns/fresh:1"), (3, "import", "ns/model:new")])


@pytest.mark.timeout(120)
@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(write=WRITES)
def test_a_write_refused_by_a_folder_names_that_folder(
        tmp_path_factory: pytest.TempPathFactory, write: tuple[int, str, str]) -> None:
    level, command, new = write
    root = tmp_path_factory.mktemp("s")
    store = _store(root)
    manifest = store.find_manifest_path(NAME)
    assert manifest is not None
    folder = manifest.parents[3 - level]  # host, namespace or model folder
    gguf = root.parent / "m.gguf"
    if command == "import":
        from tests.helpers import make_gguf

        make_gguf(gguf)
    os.chmod(folder, 0o555)
    try:
        args = ["rm", str(NAME)] if command == "rm" else [
            "import", str(gguf), "--name", new]
        code, line = _cli(root, *args)
    finally:
        os.chmod(folder, 0o755)
    assert code == 11, line
    assert line.startswith(f"error: cannot write to store at {folder}:"), line
    assert store.find_manifest_path(NAME) == manifest  # nothing was removed


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["show", "path"])
def test_a_manifest_that_cannot_be_read_is_named(tmp_path: Path, command: str) -> None:
    store = _store(tmp_path / "s")
    manifest = store.find_manifest_path(NAME)
    assert manifest is not None
    manifest.chmod(0o000)
    try:
        code, line = _cli(store.root, command, str(NAME))
    finally:
        manifest.chmod(0o644)
    assert code == 11, line
    assert line.startswith(f"error: cannot read {manifest}:"), line
