"""A reader that goes away (`blobctl list | head -1`, `| true`): the command ends quietly
with exit 141, as a shell reports a process killed by SIGPIPE (spec/cli.md, "Exit
codes"); found from outside: it was exit 1, "unexpected error (a bug)"."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore.importer import import_gguf
from blobstore.name import ModelName
from blobstore.store import Store
from tests.cli.clirun import ROOT
from tests.helpers import make_gguf

COMMANDS = [["list"], ["list", "--json"], ["du"], ["du", "--json"], ["show", "m"],
            ["show", "m", "--json"], ["path", "m"], ["catalog"], ["catalog", "--json"],
            ["pin", "m"], ["bench", "--history", "m", "--json"]]
PIPE_CAPACITY = 1 << 16  # Linux's default: more than this unread means the writer blocks


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("pipes")
    with Store(tmp / "s") as st_:
        import_gguf(st_, make_gguf(tmp / "m.gguf"), ModelName.parse("m"))
    return tmp / "s"


def _env(store: Path) -> dict[str, str]:
    return {**os.environ, "BLOBCTL_STORE": str(store),
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _normal_run(store: Path, args: list[str]) -> tuple[int, bytes]:
    """(bytes on stdout, what stderr says) with a reader that reads it all."""
    p = subprocess.run([sys.executable, "-m", "cli", *args], env=_env(store), cwd=ROOT,
                       capture_output=True, timeout=60, check=True)
    return len(p.stdout), p.stderr


@pytest.mark.timeout(600)
@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=st.sampled_from(COMMANDS), read=st.one_of(st.just(0), st.integers(1, 4096)))
def test_a_reader_that_goes_away_ends_the_command_quietly_with_141(
        store: Path, args: list[str], read: int) -> None:
    size, normal_err = _normal_run(store, args)
    r, w = os.pipe()
    p = subprocess.Popen([sys.executable, "-m", "cli", *args], env=_env(store), cwd=ROOT,
                         stdout=w, stderr=subprocess.PIPE)
    os.close(w)
    got = b""
    with os.fdopen(r, "rb", buffering=0) as reader:
        while read and len(got) < read:  # read 0: closed before the command starts
            chunk = reader.read(read - len(got))
            if not chunk:
                break
            got += chunk
    _, err = p.communicate(timeout=60)
    assert normal_err.startswith(err), err  # quiet: no error line, no traceback
    if read == 0 or size > read + PIPE_CAPACITY:
        assert p.returncode == 141, (args, read, size)
    else:  # the command may have finished writing before the reader left
        assert p.returncode in (0, 141), (args, read, size)
