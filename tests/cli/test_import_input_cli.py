"""`blobctl import FILE --name REF`: what it refuses (exit 4, one `error:` line, nothing
written) and what it keeps (found from outside)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore.store import Store
from tests.cli.clirun import Result, run
from tests.helpers import make_gguf


def one_error_line(r: Result) -> str:
    errors = [x for x in r.err.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1, r.err
    assert "Traceback" not in r.err and "unexpected error" not in r.err
    return errors[0]


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_gguf(tmp_path_factory.mktemp("src") / "m.gguf")


def _blobs(store: Path) -> set[str]:
    return {p.name for p in (store / "blobs").iterdir()} if (store / "blobs").exists() else set()


def _not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


# argv cannot carry NUL; everything else a shell can pass may come
_NOT_UTF8 = st.binary(min_size=1, max_size=12).filter(lambda b: b"\0" not in b and _not_utf8(b))


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=_NOT_UTF8, where=st.sampled_from(["--template", "--license", "--system",
                                              "--param stop", "--param key"]))
def test_text_that_is_not_utf8_is_exit_4_and_writes_nothing(
        tmp_path: Path, gguf: Path, data: bytes, where: str) -> None:
    store = tmp_path / "s"
    Store(store).close()
    before = _blobs(store)
    if where in ("--template", "--license"):
        f = tmp_path / "bad.txt"
        f.write_bytes(data)
        args = [where, str(f)]
    elif where == "--system":
        args = [where, os.fsdecode(data)]  # as Python holds argv bytes that are not UTF-8
    elif where == "--param stop":
        args = ["--param", "stop=" + os.fsdecode(data)]
    else:
        args = ["--param", os.fsdecode(data) + "=1"]
    r = run("--store", str(store), "import", str(gguf), "--name", "m", *args)
    assert r.code == 4, r.err
    assert "not valid UTF-8" in one_error_line(r)
    assert _blobs(store) == before
    assert not [p for p in (store / "manifests").rglob("*") if p.is_file()]
