"""A model whose blob is cut short or overwritten is damaged (exit 5, `blobctl verify`),
whatever the command (found from outside: `path` said exit 0 and `show --json`
`missing_blobs: []` for a blob of another size than its manifest's)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore.importer import import_gguf
from blobstore.name import ModelName
from blobstore.store import Store
from tests.cli.clirun import run
from tests.helpers import make_gguf


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, bytes]:
    tmp = tmp_path_factory.mktemp("damaged")
    with Store(tmp / "s") as store:
        result = import_gguf(store, make_gguf(tmp / "m.gguf"), ModelName.parse("m"))
        blob = store.blob_path(result.model_digest)
    os.chmod(blob, 0o644)
    return tmp / "s", blob, blob.read_bytes()


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.floats(0, 1, exclude_max=True), extra=st.binary(max_size=64),
       command=st.sampled_from([["path", "m"], ["path", "m", "--json"],
                                ["export", "m", "-o", "{tmp}/x.tar"]]))
def test_a_blob_of_another_size_is_a_damaged_model(
        model: tuple[Path, Path, bytes], tmp_path: Path, cut: float, extra: bytes,
        command: list[str]) -> None:
    store, blob, good = model
    bad = good[:int(cut * len(good))] + extra
    if len(bad) == len(good):
        bad += b"\0"
    blob.write_bytes(bad)
    try:
        args = [a.replace("{tmp}", str(tmp_path)) for a in command]
        r = run("--store", str(store), *args)
        assert r.code == 5, r.err
        assert r.err.splitlines()[0].startswith("error: model 'm:latest' is damaged: "
                                                "1 blob(s) damaged (sha256:")
        assert r.err.splitlines()[1].startswith("hint: run 'blobctl verify'")
        shown = run("--store", str(store), "show", "m", "--json")
        assert shown.code == 0 and len(shown.json()["missing_blobs"]) == 1
    finally:
        blob.write_bytes(good)
    assert run("--store", str(store), "path", "m").code == 0
