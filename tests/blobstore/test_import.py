from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore.errors import GGUFError, IntegrityError, InvalidInput, NotFound
from blobstore.gguf import read_gguf
from blobstore.importer import import_gguf, parse_params
from blobstore.manifest import CONFIG_DOCKER, DOCKER_MANIFEST, LAYER_MODEL, LAYER_PARAMS
from blobstore.name import ModelName
from blobstore.store import Store
from tests.helpers import make_gguf, sha256_hex


def test_import_builds_the_model_as_ollama_create(tmp_path: Path) -> None:
    src = make_gguf(tmp_path / "m.gguf", arch="qwen2", file_type=15, n_embd=32, n_vocab=50)
    data = src.read_bytes()
    store = Store(tmp_path / "s")
    r = import_gguf(store, src, ModelName.parse("me/qwen:tiny"),
                    template="{{ .Prompt }}", system="hi", params={"temperature": 0.5},
                    license_text="MIT")
    raw = (store.root / "manifests/registry.ollama.ai/me/qwen/tiny").read_bytes()
    assert raw == r.manifest.raw and raw.endswith(b"}\n")
    doc = json.loads(raw)
    assert list(doc) == ["schemaVersion", "mediaType", "config", "layers"]
    assert doc["mediaType"] == DOCKER_MANIFEST
    assert doc["config"]["mediaType"] == CONFIG_DOCKER
    model = doc["layers"][0]
    assert model == {"mediaType": LAYER_MODEL, "digest": "sha256:" + sha256_hex(data),
                     "size": len(data)}
    kinds = [x["mediaType"].rsplit(".", 1)[1] for x in doc["layers"]]
    assert kinds == ["model", "template", "system", "params", "license"]
    cfg = json.loads((store.root / "blobs" / doc["config"]["digest"].replace(":", "-"))
                     .read_bytes())
    assert cfg["model_format"] == "gguf"
    assert cfg["model_family"] == "qwen2" and cfg["model_families"] == ["qwen2"]
    assert cfg["file_type"] == "Q4_K_M"
    assert cfg["model_type"] == f"{(50 * 32 + 32 * 32) / 1000:.0f}K"
    assert cfg["rootfs"]["diff_ids"] == [x["digest"] for x in doc["layers"]]
    params = next(x for x in doc["layers"] if x["mediaType"] == LAYER_PARAMS)
    assert (store.root / "blobs" / params["digest"].replace(":", "-")).read_bytes() == \
        b'{"temperature":0.5}\n'
    assert src.exists()  # copied, not moved
    assert store.verify().ok


def test_import_is_idempotent(tmp_path: Path, gguf_file: Path) -> None:
    store = Store(tmp_path / "s")
    a = import_gguf(store, gguf_file, ModelName.parse("x"))
    b = import_gguf(store, gguf_file, ModelName.parse("x"))
    assert a.manifest.raw == b.manifest.raw
    assert len(store.list_models()) == 1


def test_import_hardlink_and_move(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    a = make_gguf(tmp_path / "a.gguf", seed=5)
    r = import_gguf(store, a, ModelName.parse("a"), mode="hardlink")
    blob = store.blob_path(r.model_digest)
    assert os.path.samefile(a, blob) and r.mode == "hardlink"
    b = make_gguf(tmp_path / "b.gguf", seed=6)
    data = b.read_bytes()
    r2 = import_gguf(store, b, ModelName.parse("b"), mode="move")
    assert not b.exists() and store.blob_path(r2.model_digest).read_bytes() == data


@pytest.mark.parametrize("content", [b"", b"GGUF", b"not a gguf at all", b"GGUF\x09\0\0\0"])
def test_bad_files_write_nothing(tmp_path: Path, content: bytes) -> None:
    store = Store(tmp_path / "s")
    f = tmp_path / "bad.gguf"
    f.write_bytes(content)
    with pytest.raises(GGUFError):
        import_gguf(store, f, ModelName.parse("bad"))
    assert list(store.layout.blobs.iterdir()) == []
    assert store.list_models() == []


def test_adapter_refused_and_projector_layer(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    with pytest.raises(GGUFError, match="adapter"):
        import_gguf(store, make_gguf(tmp_path / "a.gguf", kind="adapter"), ModelName.parse("a"))
    r = import_gguf(store, make_gguf(tmp_path / "p.gguf", arch="clip", kind="mmproj"),
                    ModelName.parse("p"))
    assert r.manifest.layers[0].mediaType == "application/vnd.ollama.image.projector"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="no such file"):
        import_gguf(Store(tmp_path / "s"), tmp_path / "nope.gguf", ModelName.parse("x"))


def test_parse_params() -> None:
    assert parse_params(["temperature=0.7", "num_ctx=4096", "stop=a", "stop=b=c",
                         "penalize_newline=true", "mirostat_tau=5", "use_mmap=F"]) == {
        "temperature": 0.7, "num_ctx": 4096, "stop": ["a", "b=c"],
        "penalize_newline": True, "mirostat_tau": 5, "use_mmap": False}
    with pytest.raises(InvalidInput):
        parse_params(["novalue"])
    # as `ollama create` (api.FormatParams): a value of the wrong type is refused
    with pytest.raises(InvalidInput, match="needs a finite number"):
        parse_params(["mirostat_tau=x"])


def test_import_reports_copy_progress(tmp_path: Path) -> None:
    src = make_gguf(tmp_path / "m.gguf", n_vocab=3000, n_embd=128)  # > 1 MiB
    seen: list[tuple[int, int]] = []
    import_gguf(Store(tmp_path / "s"), src, ModelName.parse("p"),
                progress=lambda done, total: seen.append((done, total)))
    size = src.stat().st_size
    assert size > 1 << 20 and len(seen) >= 2
    assert seen[-1] == (size, size) and all(a <= b for (a, _), (b, _) in itertools.pairwise(seen))


def test_a_hardlink_import_across_file_systems_says_it_copied(tmp_path: Path) -> None:
    """Found from outside: the copy made across file systems was reported as "hardlink"."""
    import shutil
    import tempfile

    other = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="blobctl-test-"))
    try:
        if other.stat().st_dev == tmp_path.stat().st_dev:
            pytest.skip("/dev/shm is on the same file system here")
        a = make_gguf(other / "a.gguf", seed=7)
        r = import_gguf(Store(tmp_path / "s"), a, ModelName.parse("a"), mode="hardlink")
        assert r.mode == "copy" and a.stat().st_nlink == 1
    finally:
        shutil.rmtree(other, ignore_errors=True)


# --- the store's own files as the source (found from outside: --move deleted the blob)
def _alias_of_blob(how: str, store: Store, blob: Path, tmp_path: Path) -> Path:
    """A path that reaches the store's blob ``blob`` in the way ``how`` names."""
    if how == "canonical":
        return blob
    if how == "legacy":  # Ollama's old ``sha256:<hex>`` name, the only name the blob has
        legacy = blob.with_name(blob.name.replace("-", ":", 1))
        os.rename(blob, legacy)
        return legacy
    if how == "symlinked-folder":
        (tmp_path / "via").symlink_to(store.layout.blobs)
        return tmp_path / "via" / blob.name
    if how == "symlinked-root":
        (tmp_path / "root-link").symlink_to(store.root)
        return tmp_path / "root-link" / "blobs" / blob.name
    if how == "symlinked-blob-target":  # a big blob moved to another disk, linked back
        target = tmp_path / "elsewhere.gguf"
        os.rename(blob, target)
        blob.symlink_to(target)
        return target
    raise AssertionError(how)


@pytest.mark.parametrize("mode", ["move", "hardlink", "copy"])
@pytest.mark.parametrize("how", ["canonical", "legacy", "symlinked-folder", "symlinked-root",
                                 "symlinked-blob-target"])
def test_importing_a_store_blob_never_removes_it(tmp_path: Path, how: str, mode: str) -> None:
    store = Store(tmp_path / "s")
    src = make_gguf(tmp_path / "m.gguf", seed=11)
    data = src.read_bytes()
    a = import_gguf(store, src, ModelName.parse("a:1"))
    path = _alias_of_blob(how, store, store.blob_path(a.model_digest), tmp_path)

    b = import_gguf(store, path, ModelName.parse("b:1"), mode=mode)

    assert path.read_bytes() == data, "the source (a store blob) must stay"
    assert b.model_digest == a.model_digest
    assert store.blob_path(a.model_digest).read_bytes() == data
    if mode == "move":
        assert b.mode != "move", "nothing was moved: the result must say so"
    report = store.verify()
    assert report.ok, report
    assert {str(e.name.display()) for e in store.list_models()} == {"a:1", "b:1"}


def test_a_move_of_a_file_inside_the_store_folders_copies_it(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    inside = make_gguf(store.layout.state_dir / "stray.gguf", seed=12)
    data = inside.read_bytes()
    r = import_gguf(store, inside, ModelName.parse("c:1"), mode="move")
    assert inside.read_bytes() == data and r.mode == "copy"
    blob = store.blob_path(r.model_digest)
    assert not os.path.samefile(blob, inside), "never a hardlink of a store-internal file"
    assert store.verify().ok


def test_a_move_of_a_hardlink_of_a_blob_outside_the_store_still_moves(tmp_path: Path) -> None:
    """An outside name of a blob's inode is the user's: --move removes that name only."""
    store = Store(tmp_path / "s")
    src = make_gguf(tmp_path / "m.gguf", seed=13)
    a = import_gguf(store, src, ModelName.parse("a:1"))
    outside = tmp_path / "mine.gguf"
    os.link(store.blob_path(a.model_digest), outside)
    r = import_gguf(store, outside, ModelName.parse("b:1"), mode="move")
    assert r.mode == "move" and not outside.exists()
    assert store.verify().ok


# --- a GGUF that changes while it is imported (found from outside: a blob starting NOPE)
def _assert_committed_models_are_ggufs(store: Store) -> None:
    """The invariant: every committed model's blob holds its digest's bytes and passes
    the GGUF check the import promises, and its config says what that GGUF says."""
    for entry in store.list_models():
        manifest = store.get_manifest(entry.name)
        layer = manifest.model_layer()
        assert layer is not None
        blob = store.blob_path(layer.digest)
        assert sha256_hex(blob.read_bytes()) == layer.digest.hex
        info = read_gguf(blob)  # raises GGUFError for a blob that is not one
        config = json.loads(store.blob_path(manifest.config.digest).read_bytes())
        assert config["model_family"] == info.architecture


@pytest.mark.timeout(120)
def test_a_header_that_changes_during_the_copy_is_refused(tmp_path: Path) -> None:
    """The source passes the GGUF check, then its header (past the first MiB) is
    overwritten while the copy runs: the bytes stored are not a GGUF -> exit 4, no
    model, no blob, the source untouched by us."""
    src = make_gguf(tmp_path / "big-header.gguf", n_vocab=120_000, n_embd=2)
    assert read_gguf(src).metadata["tokenizer.ggml.tokens"] == 120_000
    size = src.stat().st_size
    assert size > 2 << 20
    store = Store(tmp_path / "s")
    spoiled: list[int] = []

    def spoil(done: int, total: int) -> None:
        if not spoiled:  # after the first MiB was copied: tokens' lengths become garbage
            with open(src, "r+b") as f:
                f.seek((1 << 20) + 4096)
                f.write(b"\xff" * 65536)
            spoiled.append(done)

    with pytest.raises(GGUFError, match="changed while it was being imported"):
        import_gguf(store, src, ModelName.parse("spoiled:1"), progress=spoil)
    assert spoiled and store.list_models() == []
    assert list(store.layout.blobs.iterdir()) == []
    assert src.stat().st_size == size


@pytest.mark.parametrize("mode", ["copy", "hardlink", "move"])
@pytest.mark.parametrize("present", [False, True])
def test_put_file_check_refuses_the_stored_bytes_before_they_get_a_name(
        tmp_path: Path, mode: str, present: bool) -> None:
    """``check`` sees the store's own bytes (copy, link, or the blob already there), and
    what it raises leaves no new blob, no ingest folder, and the source in place."""
    from blobstore.lease import Lease

    store = Store(tmp_path / "s")
    src = make_gguf(tmp_path / "m.gguf", seed=21)
    data = src.read_bytes()
    if present:
        store.put_bytes(data)
    seen: list[tuple[bytes, bool]] = []

    def refuse(p: Path) -> None:
        seen.append((p.read_bytes(), store.layout.owns(p)))
        raise GGUFError(str(p), "refused by the test")

    before = sorted(store.layout.blobs.iterdir())
    with Lease(store.layout, "test") as lease, pytest.raises(GGUFError, match="refused"):
        store.put_file(src, mode=mode, lease=lease, check=refuse)
    assert seen == [(data, True)]
    assert sorted(store.layout.blobs.iterdir()) == before
    assert list(store.layout.ingest.iterdir()) == []
    assert src.read_bytes() == data


FLIPPER = """
import os, sys, time
path, offset, pattern, period, ready = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
fd = os.open(path, os.O_RDWR)
original = os.pread(fd, len(pattern), offset)
open(ready, "w").close()
end = time.monotonic() + 60
while time.monotonic() < end and os.path.exists(ready):
    for b in (pattern, original):  # in place, same inode, as an editor or a writer would
        os.pwrite(fd, b, offset)
        if period:
            time.sleep(period)
os.pwrite(fd, original, offset)
"""


@pytest.mark.timeout(300)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=12,
          deadline=None)
@given(offset=st.integers(0, 400), pattern=st.binary(min_size=1, max_size=8),
       period=st.sampled_from([0.0, 0.0005, 0.002]))
def test_flips_during_copy_imports_never_commit_a_non_gguf(
        tmp_path_factory: pytest.TempPathFactory, offset: int, pattern: bytes,
        period: float) -> None:
    """Another process rewrites bytes of the header in place (hypothesis picks where,
    what and how fast) while the file is imported again and again: each import commits
    a model whose blob is a GGUF of its digest, or refuses cleanly."""
    tmp = tmp_path_factory.mktemp("flip")
    src = make_gguf(tmp / "m.gguf", seed=3)
    store = Store(tmp / "s")
    ready = tmp / "ready"
    proc = subprocess.Popen([sys.executable, "-c", FLIPPER, str(src), str(offset),
                             pattern.hex(), str(period), str(ready)])
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        for i in range(15):
            try:
                import_gguf(store, src, ModelName.parse(f"flip:{i}"))
            except (InvalidInput, IntegrityError):
                pass  # refused: fine, as long as nothing bad was committed
        _assert_committed_models_are_ggufs(store)
    finally:
        ready.unlink(missing_ok=True)
        proc.wait(timeout=30)
