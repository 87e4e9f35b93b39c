"""`blobctl import FILE --name REF`: what it refuses (exit 4, one `error:` line, nothing
written) and what it keeps (found from outside)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore.importer import PARAMETERS
from blobstore.name import ModelName
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
        args = ["--param", "k" + os.fsdecode(data) + "=1"]
    r = run("--store", str(store), "import", str(gguf), "--name", "m", *args)
    assert r.code == 4, r.err
    assert "not valid UTF-8" in one_error_line(r)
    assert _blobs(store) == before
    assert not [p for p in (store / "manifests").rglob("*") if p.is_file()]


_FLOATS = sorted(k for k, t in PARAMETERS.items() if t is float)
_INTS = sorted(k for k, t in PARAMETERS.items() if t is int)
_BOOLS = sorted(k for k, t in PARAMETERS.items() if t is bool)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(param=st.one_of(
    # found from outside: temperature=nan was stored as {"temperature":null}, exit 0
    st.tuples(st.sampled_from(_FLOATS),
              st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "1e999", "abc", ""])),
    st.tuples(st.sampled_from(_INTS), st.sampled_from(["abc", "1.5", "1e3", "0x10", "nan"])),
    st.tuples(st.sampled_from(_BOOLS), st.sampled_from(["yes", "no", "2", "on"])),
    st.tuples(st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12).filter(
        lambda k: k not in PARAMETERS), st.just("1"))))
def test_a_parameter_ollama_would_refuse_is_exit_4(
        tmp_path: Path, gguf: Path, param: tuple[str, str]) -> None:
    store = tmp_path / "s"
    key, value = param
    r = run("--store", str(store), "import", str(gguf), "--name", "m", "--param",
            f"{key}={value}")
    assert r.code == 4, r.err
    line = one_error_line(r)
    if key in PARAMETERS:
        assert line.startswith(f"error: parameter '{key}' needs "), line
    else:
        assert line == f"error: unknown parameter '{key}'"
        assert "temperature" in r.err.splitlines()[1]  # the hint names the valid ones
    assert not store.exists() or not _blobs(store)


def test_valid_parameters_are_stored_as_ollama_types_them(tmp_path: Path, gguf: Path) -> None:
    import json

    store = tmp_path / "s"
    r = run("--store", str(store), "import", str(gguf), "--name", "m", "--param",
            "temperature=0.5", "--param", "num_ctx=4096", "--param", "use_mmap=false",
            "--param", "top_k=40", "--param", "repeat_penalty=1", "--json")
    assert r.code == 0, r.err
    with Store(store) as s:
        m = s.get_manifest(ModelName.parse("m"))
        params = [d for d in m.layers if d.mediaType.endswith(".params")]
        assert len(params) == 1
        doc = json.loads(s.blob_path(params[0].digest).read_bytes())
    assert doc == {"num_ctx": 4096, "repeat_penalty": 1, "temperature": 0.5, "top_k": 40,
                   "use_mmap": False}


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ext=st.sampled_from([".tar", ".tar.zst", ".gguf", "", "/", ".bin"]),
       named=st.booleans())
def test_a_missing_source_is_exit_3_whatever_its_name(tmp_path: Path, ext: str,
                                                      named: bool) -> None:
    # found from outside: /nonexistent.tar said "a GGUF file needs --name REF" (exit 2),
    # and with --name "no such file" was exit 4; spec/cli.md's not-found is 3
    missing = tmp_path / f"nope{ext}"
    r = run("--store", str(tmp_path / "s"), "import", str(missing),
            *(["--name", "m"] if named else []))
    assert r.code == 3, r.err
    assert one_error_line(r) == f"error: {missing}: no such file"
