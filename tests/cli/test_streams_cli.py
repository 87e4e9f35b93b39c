"""stdout that cannot be written, stderr that cannot be written (spec/cli.md, "Output and
diagnostics"); found from outside: ``blobctl --version >&-`` ended in a traceback and
exit 1, and ``list 2>/dev/full`` printed nothing and exited 1, ``pull 2>/dev/full``
stopped at its first progress line."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore.importer import import_gguf
from blobstore.name import ModelName
from blobstore.store import Store
from tests.cli.clirun import ROOT
from tests.helpers import make_gguf
from tests.servers import FaultServer

MiB = 1 << 20


def blobctl(args: list[str], *, stdout: str = "pipe", stderr: str = "pipe",
            cwd: Path = ROOT) -> tuple[int, bytes, bytes]:
    """(exit code, stdout, stderr) of a real process whose fd 1 / fd 2 is a pipe,
    ``closed`` (``>&-``) or ``full`` (``>/dev/full``)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    redirect = {"pipe": "", "closed": "&-", "full": "/dev/full"}
    script = f'exec "$@" 1>{redirect[stdout] or "&1"} 2>{redirect[stderr] or "&2"}'
    p = subprocess.run(["sh", "-c", script, "sh", sys.executable, "-m", "cli", *args],
                       capture_output=True, env=env, cwd=cwd, timeout=60)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("streams")
    with Store(tmp / "s") as st_:
        import_gguf(st_, make_gguf(tmp / "m.gguf"), ModelName.parse("m:1"))
    broken = tmp / "s" / "manifests" / "registry.ollama.ai" / "library" / "broken"
    broken.mkdir(parents=True)
    (broken / "latest").write_bytes(b"{bad")  # list, du: a warning on stderr
    return tmp / "s"


OUTPUT = [["--version"], ["--help"], ["list"], ["list", "--json"], ["show", "m:1"],
          ["show", "m:1", "--json"], ["path", "m:1"], ["du"], ["pin", "m:1"],
          ["config"], ["catalog"], ["verify", "--json"]]


@pytest.mark.timeout(300)
@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=st.sampled_from(OUTPUT), how=st.sampled_from(["closed", "full"]))
def test_output_that_cannot_be_written_is_one_error_line_and_exit_11_or_8(
        store: Path, args: list[str], how: str) -> None:
    code, _, err = blobctl([*args, "--store", str(store)] if args[0][0] != "-" else args,
                           stdout=how)
    text = err.decode()
    assert "Traceback" not in text, text
    errors = [x for x in text.splitlines() if x.startswith("error:")]
    reason = "No space left on device" if how == "full" else "Bad file descriptor"
    assert errors == [f"error: cannot write to stdout: {reason}"], text
    assert code == (8 if how == "full" else 11)


@pytest.mark.timeout(60)
def test_an_import_with_stdout_closed_is_committed_and_says_its_output_is_lost(
        tmp_path: Path) -> None:
    src = make_gguf(tmp_path / "a.gguf")
    code, _, err = blobctl(["import", str(src), "--name", "a:1", "--store", str(tmp_path / "s")],
                           stdout="closed")
    assert (code, err) == (11, b"error: cannot write to stdout: Bad file descriptor\n")
    assert blobctl(["list", "--store", str(tmp_path / "s")])[1].count(b"a:1") == 1


@pytest.mark.timeout(60)
def test_export_to_a_closed_stdout_is_exit_11_with_one_error_line(store: Path) -> None:
    code, _, err = blobctl(["export", "m:1", "-o", "-", "--format", "tar",
                            "--store", str(store)], stdout="closed")
    lines = err.decode().splitlines()
    assert code == 11 and "Traceback" not in err.decode()
    assert [x for x in lines if x.startswith("error:")] == [
        "error: the export to stdout stopped: Bad file descriptor"]


# ------------------------------------------------------------------ stderr best-effort
CASES = [(["list"], 0, b"m:1"), (["list", "--json"], 0, b'"m:1"'), (["du"], 0, b"m:1"),
         (["show", "nosuch"], 3, b""), (["rm", "nosuch"], 3, b""), (["show", "BAD NAME"], 4, b""),
         (["path", "m:1"], 0, b"/blobs/"), (["gc", "--lock-timeout", "x"], 2, b"")]


@pytest.mark.timeout(300)
@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(CASES), how=st.sampled_from(["closed", "full"]))
def test_diagnostics_that_cannot_be_written_are_dropped_and_the_command_goes_on(
        store: Path, case: tuple[list[str], int, bytes], how: str) -> None:
    args, want, out_has = case
    code, out, _ = blobctl([*args, "--store", str(store)], stderr=how)
    assert code == want
    assert out_has in out


@pytest.fixture
def srv() -> Iterator[FaultServer]:
    with FaultServer() as s:
        s.add_model("library/m", "1", b'{"model_format":"gguf"}',
                    [("application/vnd.ollama.image.model", os.urandom(3 * MiB))])
        yield s


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["closed", "full"])
def test_a_pull_whose_progress_cannot_be_written_still_pulls(
        srv: FaultServer, tmp_path: Path, how: str) -> None:
    code, _, _ = blobctl(["pull", f"{srv.netloc}/library/m:1", "--insecure",
                          "--store", str(tmp_path / "s")], stderr=how)
    assert code == 0
    assert b"library/m:1" in blobctl(["list", "--store", str(tmp_path / "s")])[1]
