"""Paths whose bytes are not UTF-8 (spec/cli.md, "Paths that are not UTF-8"); found from
outside: a store at ``$'st\\xff'`` imported, then list/verify/du/rm exited 4 ("'utf-8'
codec can't encode … surrogates not allowed"), gc and ``show --json`` 1, ``export -o
$'x\\xff.tar'`` and ``link --to $'l\\xff' --json`` 1, ``fetch $'http://h/\\xff'`` 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.cli.clirun import ROOT
from tests.helpers import make_gguf


def blobctl(*args: str, cwd: Path) -> tuple[int, bytes, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, env=env,
                       cwd=cwd, timeout=60)
    return p.returncode, p.stdout, p.stderr.decode("utf-8", "replace")


def odd(name: str, byte: int) -> str:
    """``name`` with a byte that is not UTF-8 in it, as Python holds such a path."""
    return os.fsdecode(name.encode() + bytes([byte]))


@pytest.mark.timeout(300)
@settings(max_examples=2, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(byte=st.integers(0x80, 0xFF))
def test_a_store_and_files_at_paths_that_are_not_utf8_work(
        tmp_path_factory: pytest.TempPathFactory, byte: int) -> None:
    tmp = tmp_path_factory.mktemp("nonutf8")
    store = tmp / odd("store", byte)
    src = make_gguf(tmp / (odd("model", byte) + ".gguf"))

    def ok(*args: str) -> bytes:
        code, out, err = blobctl("--store", str(store), *args, cwd=tmp)
        assert code == 0, (args, err)
        assert "Traceback" not in err and "codec" not in err, (args, err)
        return out

    ok("import", str(src), "--name", "m:1")
    ok("import", str(src), "--name", "m:2", "--hardlink")
    for args in (["list"], ["du"], ["verify"], ["show", "m:1"], ["pin", "m:1"],
                 ["unpin", "m:1"], ["config", "set", "max-size", "10G"], ["config"]):
        ok(*args)
    for args in (["list"], ["du"], ["verify"], ["show", "m:1"], ["path", "m:1"]):
        json.loads(ok(*args, "--json"))
    path = ok("path", "m:1").rstrip(b"\n")
    assert path.startswith(os.fsencode(store)) and os.path.isfile(path)  # the real bytes
    shown = json.loads(ok("path", "m:1", "--json"))["model_path"]
    assert os.fsencode(shown) == path  # \udcXX escapes give the bytes back
    tar = tmp / (odd("x", byte) + ".tar")
    assert json.loads(ok("export", "m:1", "-o", str(tar), "--json"))["path"] == str(tar)
    ok("export", "m:1", "-o", str(tmp / odd("dir", byte)) + "/")
    links = tmp / odd("links", byte)
    made = json.loads(ok("link", "m:1", "--to", str(links), "--json"))["links"]
    assert os.path.samefile(made[0]["path"], path)
    ok("link", "m:1", "--to", str(links), "--hardlink", "--replace")
    json.loads(ok("link", "--prune", "--to", str(links), "--json"))
    ok("rm", "m:2")
    ok("gc", "--max-size", "1", "--grace", "0", "--json")  # evicts m:1 (through GC's intent record)
    assert b"m:1" not in ok("list")
    other = tmp / odd("other", byte)
    code, _, err = blobctl("--store", str(other), "import", str(tar), cwd=tmp)
    assert code == 0, err
    code, _, err = blobctl("--store", str(other), "import", str(tmp / odd("dir", byte)),
                           cwd=tmp)
    assert code == 0, err


@pytest.mark.timeout(60)
def test_a_url_that_is_not_utf8_is_invalid_input(tmp_path: Path) -> None:
    code, _, err = blobctl("--store", str(tmp_path / "s"), "fetch", odd("http://h/", 0xFF),
                           "--sha256", "a" * 64, "--name", "f:1", cwd=tmp_path)
    assert code == 4, err
    assert err.startswith("error: invalid URL 'http://h/\\udcff': it holds bytes that are "
                          "not UTF-8\nhint:"), err
    assert not (tmp_path / "s").exists()
