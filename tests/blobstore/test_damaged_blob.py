"""A file of the wrong size at a blob's name (cut short by a crash of another tool, or
overwritten) is damage, not the blob (found from outside for `pull`, then by review for
every other writer): an archive import, a GGUF import in any mode and ``put_bytes`` write
the verified bytes over it instead of taking it for the blob and committing a manifest of
a broken model. Hypothesis chooses the damage and the writer."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore.archive.export import export_models
from blobstore.archive.load import import_archive
from blobstore.digest import Digest
from blobstore.importer import import_gguf
from blobstore.name import ModelName
from blobstore.store import Store
from tests.blobstore.gcutil import add_model
from tests.helpers import make_gguf


def _damage(path: Path, how: str, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.chmod(0o644)
    path.write_bytes({"short": data[: len(data) // 3], "empty": b"",
                      "long": data + b"\0" * 7}[how])


@settings(max_examples=24, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(how=st.sampled_from(["short", "empty", "long"]),
       writer=st.sampled_from(["archive", "import-copy", "import-hardlink", "import-move",
                               "put_bytes"]),
       legacy=st.booleans())
@pytest.mark.timeout(120)
def test_a_blob_file_of_the_wrong_size_is_replaced_not_trusted(
        how: str, writer: str, legacy: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        gguf = make_gguf(t / "m.gguf", seed=3).read_bytes()
        d = Digest.of_bytes(gguf)
        store = Store(t / "s")
        layout = store.layout
        target = layout.legacy_blob(d) if legacy else layout.blob(d)
        if writer == "archive":
            src = Store(t / "src")
            add_model(src, "a:1", [gguf])
            export_models(src, [ModelName.parse("a:1")], t / "a.tar")
            _damage(target, how, gguf)
            import_archive(store, t / "a.tar")
        elif writer.startswith("import-"):
            _damage(target, how, gguf)
            import_gguf(store, t / "m.gguf", ModelName.parse("a:1"),
                        mode=writer.removeprefix("import-"))
        else:
            _damage(target, how, gguf)
            assert store.put_bytes(gguf) == d
        assert store.blob_path(d).read_bytes() == gguf
        if writer != "put_bytes":
            model = store.resolve(ModelName.parse("a:1")).model_path
            assert model is not None and model.read_bytes() == gguf
        store.close()
