"""HF-cache adoption and link farms, on a fake HF cache with the real layout."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blobstore.caches import (
    CacheDamaged,
    adopt_hf_cache,
    default_hf_cache,
    link_models,
    prune_links,
    quant_from_filename,
)
from blobstore.digest import Digest
from blobstore.errors import InvalidInput
from blobstore.linkfarm import PruneResult
from blobstore.manifest import LAYER_MODEL, Manifest
from blobstore.name import ModelName
from blobstore.store import Store
from tests.cli.clirun import Result, run
from tests.helpers import make_gguf
from tests.servers import sha


def one_error_line(r: Result) -> str:
    errors = [x for x in r.err.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1, r.err
    assert "Traceback" not in r.err
    return errors[0]


def hf_repo(cache: Path, org: str, repo: str, files: dict[str, bytes], *,
            rev: str = "0123abcd" * 5, bad: set[str] = frozenset()) -> dict[str, Path]:  # type: ignore[assignment]
    """A repo as huggingface_hub writes it: blobs/<sha256>, refs/main, snapshot symlinks.
    Files in ``bad`` get content that does not match their blob name."""
    root = cache / f"models--{org}--{repo}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(rev)
    out = {}
    for rel, data in files.items():
        sha = hashlib.sha256(data).hexdigest()
        blob = root / "blobs" / sha
        blob.write_bytes(data if rel not in bad else data[:-1] + bytes([data[-1] ^ 1]))
        link = root / "snapshots" / rev / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
        out[rel] = blob
    return out


@pytest.fixture
def ggufs(tmp_path: Path) -> list[bytes]:
    return [make_gguf(tmp_path / f"g{i}.gguf", seed=i, file_type=15).read_bytes()
            for i in range(4)]


def test_quant_from_filename() -> None:
    assert quant_from_filename("Qwen2.5-0.5B-Instruct-Q4_K_M.gguf") == "Q4_K_M"
    assert quant_from_filename("qwen2.5-0.5b-instruct-q4_k_m.gguf") == "q4_k_m"
    assert quant_from_filename("Llama-3-8B-IQ4_XS-00001-of-00003.gguf") == "IQ4_XS"
    assert quant_from_filename("model.Q8_0.gguf") == "Q8_0"
    assert quant_from_filename("tiny-f16.gguf") == "f16"
    assert quant_from_filename("my model.gguf") == "my-model"


@given(st.text(min_size=1, max_size=120))
def test_quant_is_always_a_valid_tag(name: str) -> None:
    tag = quant_from_filename(name + ".gguf")
    ModelName("hf.co", "org", "repo", tag)  # raises if not a valid tag


def test_default_cache_follows_the_hf_variables(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)
    assert default_hf_cache() == tmp_path / "home/.cache/huggingface/hub"
    monkeypatch.setenv("HF_HOME", "/x")
    assert default_hf_cache() == Path("/x/hub")
    monkeypatch.setenv("HF_HUB_CACHE", "/y")
    assert default_hf_cache() == Path("/y")


def test_adopt_by_hardlink_link_count_two_and_ollama_id(tmp_path: Path,
                                                       ggufs: list[bytes]) -> None:
    cache = tmp_path / "hub"
    blobs = hf_repo(cache, "bartowski", "Qwen2.5-0.5B-Instruct-GGUF", {
        "Qwen2.5-0.5B-Instruct-Q4_K_M.gguf": ggufs[0],
        "Qwen2.5-0.5B-Instruct-Q8_0.gguf": ggufs[1],
        "README.md": b"# readme"})
    store = Store(tmp_path / "s")
    r = adopt_hf_cache(store, cache)
    names = sorted(str(m.name) for m in r.models)
    assert names == ["hf.co/bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M",
                     "hf.co/bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q8_0"]
    assert all(m.linked for m in r.models) and not r.skipped
    name = ModelName.parse("hf.co/bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M")
    path = store.resolve(name).model_path
    assert path is not None and path.stat().st_nlink == 2
    assert os.path.samefile(path, blobs["Qwen2.5-0.5B-Instruct-Q4_K_M.gguf"])
    raw = store.find_manifest_path(name).read_bytes()  # type: ignore[union-attr]
    doc = json.loads(raw)
    assert doc["layers"] == [{"mediaType": LAYER_MODEL,
                              "digest": "sha256:" + hashlib.sha256(ggufs[0]).hexdigest(),
                              "size": len(ggufs[0])}]
    listing = {x["name"]: x for x in run("list", "--json", "--store", str(store.root)).json()}
    entry = listing[str(name)]
    assert entry["id"] == hashlib.sha256(raw).hexdigest()[:12]
    assert entry["size"] == doc["config"]["size"] + len(ggufs[0])
    assert store.verify().ok
    again = adopt_hf_cache(store, cache)  # idempotent
    assert [m.digest for m in again.models] == [m.digest for m in r.models]


def test_mismatching_file_is_named_skipped_and_exit_5(tmp_path: Path,
                                                      ggufs: list[bytes]) -> None:
    cache = tmp_path / "hub"
    blobs = hf_repo(cache, "org", "repo", {"m-Q4_K_M.gguf": ggufs[0],
                                           "m-Q5_K_M.gguf": ggufs[1]},
                    bad={"m-Q5_K_M.gguf"})
    store = Store(tmp_path / "s")
    with pytest.raises(CacheDamaged) as ei:
        adopt_hf_cache(store, cache)
    res = ei.value.result
    assert [str(m.name) for m in res.models] == ["hf.co/org/repo:Q4_K_M"]
    assert [s.file.name for s in res.skipped] == ["m-Q5_K_M.gguf"]
    assert not store.has_model(ModelName.parse("hf.co/org/repo:Q5_K_M"))
    assert not any(p.name.startswith("up-") for p in store.layout.ingest.iterdir())
    assert blobs["m-Q5_K_M.gguf"].stat().st_nlink == 1  # nothing of it kept
    r = run("import", "--hf-cache", str(cache), "--store", str(tmp_path / "s2"))
    assert r.code == 5
    line = one_error_line(r)
    assert line.startswith(f"error: 1 file(s) in {cache} do not match their sha256 names "
                           f"(first: {cache}/models--org--repo/snapshots/")
    assert "m-Q5_K_M.gguf); 1 model(s) adopted" in line
    assert "warning: skipped " in r.err and "digest mismatch" in r.err
    assert "adopted 'hf.co/org/repo:Q4_K_M'" in r.out


def test_split_gguf_is_one_model_with_layers_in_order(tmp_path: Path,
                                                      ggufs: list[bytes]) -> None:
    cache = tmp_path / "hub"
    hf_repo(cache, "org", "big", {
        "Q4_K_M/big-Q4_K_M-00002-of-00003.gguf": ggufs[1],
        "Q4_K_M/big-Q4_K_M-00001-of-00003.gguf": ggufs[0],
        "Q4_K_M/big-Q4_K_M-00003-of-00003.gguf": ggufs[2],
        "big-Q8_0-00001-of-00002.gguf": ggufs[3]})  # part 2 missing
    store = Store(tmp_path / "s")
    r = adopt_hf_cache(store, cache)
    assert [str(m.name) for m in r.models] == ["hf.co/org/big:Q4_K_M"]
    m = store.get_manifest(ModelName.parse("hf.co/org/big:Q4_K_M"))
    assert [d.digest.hex for d in m.layers] == [hashlib.sha256(g).hexdigest()
                                               for g in ggufs[:3]]
    assert [s.reason for s in r.skipped] == ["incomplete split GGUF (1 of 2 parts)"]


def test_copy_mode_and_missing_cache(tmp_path: Path, ggufs: list[bytes]) -> None:
    cache = tmp_path / "hub"
    blobs = hf_repo(cache, "org", "repo", {"m-Q4_0.gguf": ggufs[0]})
    store = Store(tmp_path / "s")
    r = adopt_hf_cache(store, cache, mode="copy")
    assert not r.models[0].linked and blobs["m-Q4_0.gguf"].stat().st_nlink == 1
    with pytest.raises(InvalidInput, match="no Hugging Face cache"):
        adopt_hf_cache(store, tmp_path / "nope")
    r2 = run("import", "--hf-cache", str(tmp_path / "nope"), "--store", str(store.root))
    assert r2.code == 4
    assert one_error_line(r2) == f"error: no Hugging Face cache at {tmp_path / 'nope'}"
    env = {"HF_HUB_CACHE": str(cache)}
    r3 = run("import", "--hf-cache", "--json", "--store", str(tmp_path / "s3"), env=env)
    assert r3.code == 0, r3.err
    assert r3.json()["models"][0]["name"] == "hf.co/org/repo:Q4_0"


def test_a_vision_projector_is_skipped_and_never_taken_for_the_model(
        tmp_path: Path, ggufs: list[bytes]) -> None:
    """The tester's repro_hf_projector.sh: model and projector share the tag F16; the
    projector sorted first, became the model (one projector layer), and the model was
    dropped without a word."""
    mmproj = make_gguf(tmp_path / "p.gguf", arch="clip", kind="mmproj", seed=9).read_bytes()
    cache = tmp_path / "hub"
    hf_repo(cache, "TheOrg", "Vision-Model-GGUF", {"vision-model-F16.gguf": ggufs[0],
                                                    "mmproj-vision-model-f16.gguf": mmproj})
    s = str(tmp_path / "s")
    r = run("import", "--hf-cache", str(cache), "--store", s, "--json")
    assert r.code == 0, r.err
    snap = cache / "models--TheOrg--Vision-Model-GGUF" / "snapshots" / ("0123abcd" * 5)
    assert [m["name"] for m in r.json()["models"]] == ["hf.co/TheOrg/Vision-Model-GGUF:F16"]
    assert r.json()["models"][0]["files"] == [str(snap / "vision-model-F16.gguf")]
    assert r.json()["skipped"] == [{
        "file": str(snap / "mmproj-vision-model-f16.gguf"),
        "reason": "a vision projector, not a model (projectors are not adopted)"}]
    p = run("path", "hf.co/TheOrg/Vision-Model-GGUF:F16", "--store", s, "--json")
    assert p.code == 0, p.err
    assert Path(p.json()["model_path"]).read_bytes() == ggufs[0]
    assert p.json()["projector_paths"] == []


def test_a_projector_known_only_by_its_metadata_is_skipped(tmp_path: Path) -> None:
    clip = make_gguf(tmp_path / "c.gguf", arch="clip", seed=8).read_bytes()
    cache = tmp_path / "hub"
    hf_repo(cache, "org", "repo", {"vision-encoder-F16.gguf": clip})
    r = adopt_hf_cache(Store(tmp_path / "s"), cache)
    assert not r.models and [x.reason for x in r.skipped] == [
        "a vision projector, not a model (projectors are not adopted)"]


def test_two_model_files_for_one_tag_are_a_reported_conflict(
        tmp_path: Path, ggufs: list[bytes]) -> None:
    cache = tmp_path / "hub"
    hf_repo(cache, "org", "repo", {"a-Q4_K_M.gguf": ggufs[0], "sub/b-Q4_K_M.gguf": ggufs[1],
                                   "c-Q8_0.gguf": ggufs[2]})
    r = run("import", "--hf-cache", str(cache), "--store", str(tmp_path / "s"))
    assert r.code == 0, r.err
    assert "adopted 'hf.co/org/repo:Q8_0'" in r.out and "Q4_K_M'" not in r.out
    warnings = [x for x in r.err.splitlines() if x.startswith("warning: skipped ")]
    assert len(warnings) == 2 and all(
        x.endswith(": 2 files would be hf.co/org/repo:Q4_K_M (a-Q4_K_M.gguf, b-Q4_K_M.gguf); "
                   "import the one you want: blobctl import FILE --name REF")
        for x in warnings)


def test_an_older_revision_of_a_model_is_listed_as_superseded(
        tmp_path: Path, ggufs: list[bytes]) -> None:
    cache = tmp_path / "hub"
    old = hf_repo(cache, "org", "repo", {"m-Q4_0.gguf": ggufs[1]}, rev="1" * 40)
    new = hf_repo(cache, "org", "repo", {"m-Q4_0.gguf": ggufs[0]}, rev="2" * 40)
    assert old and new  # refs/main now names the second revision
    r = adopt_hf_cache(Store(tmp_path / "s"), cache)
    snaps = cache / "models--org--repo" / "snapshots"
    assert [m.files for m in r.models] == [[snaps / ("2" * 40) / "m-Q4_0.gguf"]]
    assert [(x.file, x.reason) for x in r.skipped] == [(
        snaps / ("1" * 40) / "m-Q4_0.gguf",
        f"hf.co/org/repo:Q4_0 comes from {snaps / ('2' * 40) / 'm-Q4_0.gguf'} (the snapshot "
        "refs/main names, else the newest)")]


# ---------------------------------------------------------------------- link farms
def test_link_farm_lmstudio_prune_after_rm(tmp_path: Path, ggufs: list[bytes]) -> None:
    cache = tmp_path / "hub"
    hf_repo(cache, "org", "repo", {"m-Q4_K_M.gguf": ggufs[0], "m-Q8_0.gguf": ggufs[1]})
    store = Store(tmp_path / "s")
    adopt_hf_cache(store, cache, mode="copy")
    farm = tmp_path / "lms"
    a, b = ModelName.parse("hf.co/org/repo:Q4_K_M"), ModelName.parse("hf.co/org/repo:Q8_0")
    links = link_models(store, [a, b], farm)
    assert [x.path.relative_to(farm) for x in links] == [Path("org/repo/repo-Q4_K_M.gguf"),
                                                       Path("org/repo/repo-Q8_0.gguf")]
    assert (farm / "org/repo/repo-Q4_K_M.gguf").read_bytes() == ggufs[0]
    assert link_models(store, [a], farm)  # again: replaces its own link
    store.remove_model(b)
    assert not (farm / "org/repo/repo-Q8_0.gguf").exists()  # dangling symlink
    r = run("link", "--prune", "--to", str(farm), "--json")
    assert r.code == 0 and r.json() == {"removed": [str(farm / "org/repo/repo-Q8_0.gguf")],
                                        "relinked": [], "skipped": []}
    assert (farm / "org/repo/repo-Q4_K_M.gguf").is_symlink()


def test_link_flat_hardlink_and_refusals(tmp_path: Path, ggufs: list[bytes]) -> None:
    cache = tmp_path / "hub"
    hf_repo(cache, "org", "repo", {"m-Q4_K_M.gguf": ggufs[0]})
    store = Store(tmp_path / "s")
    adopt_hf_cache(store, cache, mode="copy")
    farm = tmp_path / "flat"
    s = str(store.root)
    r = run("link", "hf.co/org/repo:Q4_K_M", "--to", str(farm), "--layout", "flat",
            "--hardlink", "--store", s)
    assert r.code == 0, r.err
    f = farm / "repo-Q4_K_M.gguf"
    assert not f.is_symlink() and f.stat().st_nlink == 2
    store.remove_model(ModelName.parse("hf.co/org/repo:Q4_K_M"))
    assert f.read_bytes() == ggufs[0]  # a hardlink keeps the bytes alive
    assert prune_links(farm).removed == [f] and not f.exists()
    (farm / "repo-Q4_K_M.gguf").write_bytes(b"mine")  # a user's file is never replaced
    adopt_hf_cache(store, cache, mode="copy")
    r = run("link", "hf.co/org/repo:Q4_K_M", "--to", str(farm), "--layout", "flat",
            "--store", s)
    assert r.code == 4
    assert one_error_line(r) == (f"error: {farm / 'repo-Q4_K_M.gguf'} exists and is not a "
                                 "link blobctl made")
    assert (farm / "repo-Q4_K_M.gguf").read_bytes() == b"mine"
    r = run("link", "nope", "--to", str(farm), "--store", s)
    assert r.code == 3
    r = run("link", "--to", str(farm), "--store", s)
    assert r.code == 2
    assert prune_links(farm) == PruneResult()  # the user's file stays


@pytest.fixture
def other_fs(tmp_path: Path) -> Iterator[Path]:
    """A folder on another filesystem than tmp_path (tmpfs /dev/shm)."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="blobctl-test-"))
    assert d.stat().st_dev != tmp_path.stat().st_dev, "need /dev/shm on another filesystem"
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_across_filesystems_adoption_copies_and_hardlinks_are_refused(
        tmp_path: Path, other_fs: Path, ggufs: list[bytes]) -> None:
    cache = other_fs / "hub"
    blobs = hf_repo(cache, "org", "repo", {"m-Q4_K_M.gguf": ggufs[0]})
    store = Store(tmp_path / "s")
    r = adopt_hf_cache(store, cache)  # hardlink asked, copy done (verified)
    assert not r.models[0].linked and blobs["m-Q4_K_M.gguf"].stat().st_nlink == 1
    assert store.verify().ok
    farm = other_fs / "farm"
    r2 = run("link", "hf.co/org/repo:Q4_K_M", "--to", str(farm), "--hardlink",
             "--store", str(store.root))
    assert r2.code == 4
    assert one_error_line(r2).startswith("error: cannot hardlink ")
    assert "hint: hardlinks need the same filesystem; use symlinks" in r2.err
    r3 = run("link", "hf.co/org/repo:Q4_K_M", "--to", str(farm), "--store", str(store.root))
    assert r3.code == 0 and (farm / "org/repo/repo-Q4_K_M.gguf").read_bytes() == ggufs[0]
    r4 = run("link", "hf.co/org/repo:Q4_K_M", "--prune", "--to", str(farm))
    assert r4.code == 2 and one_error_line(r4) == "error: --prune takes no models"
    r5 = run("import", str(tmp_path), "--hf-cache", str(cache), "--store", str(store.root))
    assert r5.code == 2 and one_error_line(r5) == "error: give either FILE or --hf-cache, not both"


def test_hf_cache_refuses_gguf_only_options(tmp_path: Path) -> None:
    r = run("import", "--hf-cache", str(tmp_path), "--name", "x", "--store", str(tmp_path / "s"))
    assert r.code == 2 and one_error_line(r).startswith("error: --hf-cache takes only")
    r = run("import", "--hf-cache", str(tmp_path), "--move", "--store", str(tmp_path / "s"))
    assert r.code == 2


def test_readoption_hashes_nothing_and_never_replaces_another_model(
        tmp_path: Path, ggufs: list[bytes]) -> None:
    cache = tmp_path / "hub"
    hf_repo(cache, "org", "repo", {"m-Q4_K_M.gguf": ggufs[0]})
    store = Store(tmp_path / "s")
    first = adopt_hf_cache(store, cache)
    again = adopt_hf_cache(store, cache)
    assert again.bytes_hashed == 0 and again.models[0].digest == first.models[0].digest
    assert again.models[0].linked
    other = Store(tmp_path / "s2")  # a model of that name with other content exists
    from tests.blobstore.archutil import add_model

    before = add_model(other, "hf.co/org/repo:Q4_K_M", [ggufs[1]], oci=False)
    r = adopt_hf_cache(other, cache)
    assert not r.models and "already in the store with other content" in r.skipped[0].reason
    assert other.get_manifest(ModelName.parse("hf.co/org/repo:Q4_K_M")).raw == before.raw


# ---------------------------------------------------------------------- adopting again, whatever
# the snapshot file is (the tester's repro_idempotent.sh, repro_missing_readopt.sh)
_FORMS = ("sha256", "SHA256", "git-sha1", "plain")


def _snapshot_file(cache: Path, form: str, data: bytes) -> Path:
    """One GGUF in a snapshot as a cache may hold it: a symlink to a sha256 blob name
    (lower or upper case), to a git blob's sha1 name, or a plain file (symlinks off)."""
    repo = cache / "models--o--r"
    rev = "c" * 40
    snap = repo / "snapshots" / rev / "m-Q6_K.gguf"
    snap.parent.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    if form == "plain":
        snap.write_bytes(data)
        return snap
    name = {"sha256": hashlib.sha256(data).hexdigest(),
            "SHA256": hashlib.sha256(data).hexdigest().upper(),
            "git-sha1": hashlib.sha1(data).hexdigest()}[form]
    (repo / "blobs").mkdir()
    (repo / "blobs" / name).write_bytes(data)
    snap.symlink_to(f"../../blobs/{name}")
    return snap


@pytest.mark.timeout(60)
@settings(max_examples=24, deadline=None)
@given(form=st.sampled_from(_FORMS), mode=st.sampled_from(("hardlink", "copy")),
       harm=st.sampled_from(("none", "deleted", "cut short")))
def test_adopting_again_reports_or_repairs_the_same_files(
        tmp_path_factory: pytest.TempPathFactory, form: str, mode: str, harm: str) -> None:
    """A second adoption of the same cache file reports the model, whatever the file's
    blob name; one whose store blob was lost or damaged meanwhile is linked back. Never
    "other content" for the same bytes; with the store's own inode, nothing is hashed."""
    tmp = tmp_path_factory.mktemp("again")
    data = make_gguf(tmp / "g.gguf", seed=8, file_type=18).read_bytes()
    cache = tmp / "hub"
    snap = _snapshot_file(cache, form, data)
    store = Store(tmp / "s")
    first = adopt_hf_cache(store, cache, mode=mode)
    assert [str(m.name) for m in first.models] == ["hf.co/o/r:Q6_K"], first.skipped
    name = ModelName.parse("hf.co/o/r:Q6_K")
    blob = store.resolve(name).model_path
    assert blob is not None
    if harm == "deleted":
        blob.unlink()
    elif harm == "cut short":
        blob.unlink()  # another tool rewrote the store's name (the cache file is intact)
        blob.write_bytes(data[:100])
    again = adopt_hf_cache(store, cache, mode=mode)
    assert not again.skipped, again.skipped[0].reason
    assert [m.digest for m in again.models] == [m.digest for m in first.models]
    assert not store.missing_blobs(store.get_manifest(name))
    assert store.verify().ok
    if mode == "hardlink":
        now = store.resolve(name).model_path
        assert now is not None and os.path.samefile(now, snap)
        if harm == "none":
            assert again.bytes_hashed == 0


def test_adopting_again_still_refuses_other_bytes_of_the_same_size(
        tmp_path: Path, ggufs: list[bytes]) -> None:
    """A plain snapshot file whose bytes changed (same size) is other content: skipped."""
    cache = tmp_path / "hub"
    snap = _snapshot_file(cache, "plain", ggufs[0])
    store = Store(tmp_path / "s")
    adopt_hf_cache(store, cache, mode="copy")
    snap.write_bytes(ggufs[0][:-1] + bytes([ggufs[0][-1] ^ 1]))
    r = adopt_hf_cache(store, cache, mode="copy")
    assert not r.models and "already in the store with other content" in r.skipped[0].reason


# ---------------------------------------------------------------------- a model pulled from
# hf.co with the cache's GGUF (the reviewer's exp_hf.py: a lost template blob made
# import --hf-cache replace the pulled manifest by an adoption one, template and params gone)
_PULLED_PARTS = ("config", "model", "template", "params")


@pytest.mark.timeout(90)
@settings(max_examples=30, deadline=None)
@given(harmed=st.dictionaries(st.sampled_from(_PULLED_PARTS),
                              st.sampled_from(("deleted", "cut short")), max_size=4),
       mode=st.sampled_from(("hardlink", "copy")))
def test_a_pulled_model_with_the_caches_gguf_is_never_replaced(
        tmp_path_factory: pytest.TempPathFactory, harmed: dict[str, str], mode: str) -> None:
    """hf.co/ORG/REPO:TAG pulled (its config, the GGUF the cache holds, a template,
    params), then some of its blobs lost or cut short (hypothesis picks which and how).
    Adopting the cache keeps the pulled manifest, byte for byte, whatever is missing: a
    lost model layer is linked back from the cache file; a lost blob the cache does not
    hold is named in a skip reason that says to pull it."""
    from tests.blobstore.archutil import DOCKER_CONFIG, DOCKER_MANIFEST

    tmp = tmp_path_factory.mktemp("pulled")
    gguf = make_gguf(tmp / "g.gguf", seed=3, file_type=15).read_bytes()
    cache = tmp / "hub"
    hf_repo(cache, "org", "repo", {"m-Q4_K_M.gguf": gguf})
    store = Store(tmp / "s")
    blobs = {"config": json.dumps({"model_format": "gguf", "pulled": True}).encode(),
             "model": gguf, "template": b"{{ .Prompt }} <pulled template>",
             "params": b'{"stop":["<|eot|>"]}'}
    for b in blobs.values():
        store.put_bytes(b)

    def desc(media_type: str, b: bytes) -> dict[str, object]:
        return {"mediaType": media_type, "digest": sha(b), "size": len(b)}

    doc = {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
           "config": desc(DOCKER_CONFIG, blobs["config"]),
           "layers": [desc(LAYER_MODEL, blobs["model"]),
                      desc("application/vnd.ollama.image.template", blobs["template"]),
                      desc("application/vnd.ollama.image.params", blobs["params"])]}
    pulled = Manifest.decode(json.dumps(doc, separators=(",", ":")).encode())
    name = ModelName.parse("hf.co/org/repo:Q4_K_M")
    store.put_manifest(name, pulled)
    for part, how in harmed.items():
        path = store.blob_path(Digest.of_bytes(blobs[part]))
        path.unlink()
        if how == "cut short":
            path.write_bytes(blobs[part][:7])

    r = adopt_hf_cache(store, cache, mode=mode)

    assert store.get_manifest(name).raw == pulled.raw  # never replaced
    # the model layer is back from the cache, verified, whatever else is missing
    assert store.has_blob(Digest.of_bytes(gguf), len(gguf))
    assert store.blob_path(Digest.of_bytes(gguf)).read_bytes() == gguf
    lost = {Digest.of_bytes(blobs[p]) for p in harmed if p != "model"}
    assert set(store.missing_blobs(pulled)) == lost
    if lost:
        assert not r.models
        [skip] = r.skipped
        assert "blobctl pull hf.co/org/repo:Q4_K_M" in skip.reason, skip.reason
        assert all(str(d) in skip.reason for d in lost), skip.reason
    else:
        assert not r.skipped, r.skipped[0].reason
        assert [m.digest for m in r.models] == [pulled.digest]
    if mode == "hardlink" and "model" in harmed:  # linked back: one inode with the cache
        assert os.path.samefile(store.blob_path(Digest.of_bytes(gguf)),
                                cache / "models--org--repo" / "snapshots" / ("0123abcd" * 5)
                                / "m-Q4_K_M.gguf")


# ---------------------------------------------------------------------- a user's file at a
# path blobctl once linked (the tester's repro_link_userfile.sh)
@pytest.fixture
def hard_farm(tmp_path: Path) -> tuple[Store, Path, dict[str, Path]]:
    """Two models hardlinked into a farm; the user has replaced both links by own files."""
    from tests.blobstore.archutil import add_model

    store = Store(tmp_path / "s")
    add_model(store, "org/good:q4", [b"good model" * 100], oci=False)
    add_model(store, "org/other:q4", [b"other model" * 100], oci=False)
    farm = tmp_path / "lms"
    link_models(store, [ModelName.parse("org/good:q4"), ModelName.parse("org/other:q4")],
                farm, hardlink=True)
    paths = {"good": farm / "org/good/good-q4.gguf", "other": farm / "org/other/other-q4.gguf"}
    for m, f in paths.items():
        f.unlink()
        f.write_bytes(f"user file {m}".encode())
    return store, farm, paths


def test_prune_leaves_a_users_file_at_a_recorded_path_while_the_model_lives(
        hard_farm: tuple[Store, Path, dict[str, Path]]) -> None:
    store, farm, paths = hard_farm
    r = run("link", "--prune", "--to", str(farm), "--store", str(store.root))
    assert r.code == 0, r.err
    assert paths["good"].read_bytes() == b"user file good"  # not re-linked to the blob
    assert paths["other"].read_bytes() == b"user file other"
    assert "removed" not in r.out and "relinked" not in r.out
    assert (f"warning: skipped {paths['good']}: it is not the hardlink blobctl made there "
            "(replaced since)") in r.err.splitlines()
    again = run("link", "--prune", "--to", str(farm), "--store", str(store.root), "--json")
    assert again.json() == {"removed": [], "relinked": [], "skipped": []}  # reported once


def test_prune_after_rm_leaves_a_users_file_and_says_so_in_json(
        hard_farm: tuple[Store, Path, dict[str, Path]]) -> None:
    store, farm, paths = hard_farm
    store.remove_model(ModelName.parse("org/other:q4"))
    r = run("link", "--prune", "--to", str(farm), "--store", str(store.root), "--json")
    assert r.code == 0, r.err
    assert paths["other"].read_bytes() == b"user file other"  # not deleted
    assert r.json()["removed"] == []
    assert {x["path"] for x in r.json()["skipped"]} == {str(p) for p in paths.values()}


def test_link_refuses_a_users_file_at_a_recorded_path(
        hard_farm: tuple[Store, Path, dict[str, Path]]) -> None:
    store, farm, paths = hard_farm
    r = run("link", "org/good:q4", "--to", str(farm), "--store", str(store.root))
    assert r.code == 4
    assert one_error_line(r) == f"error: {paths['good']} exists and is not a link blobctl made"
    assert ("hint: it is not the hardlink blobctl made there (replaced since); move it away, "
            "or link into another folder") in r.err.splitlines()
    assert paths["good"].read_bytes() == b"user file good" and not paths["good"].is_symlink()


def test_prune_leaves_a_users_file_that_took_the_freed_inode(tmp_path: Path) -> None:
    """After rm, the farm's hardlink held the blob's last link; the user deletes it and
    writes a file, which the filesystem may give the same inode number."""
    from tests.blobstore.archutil import add_model

    store = Store(tmp_path / "s")
    add_model(store, "org/m:q4", [b"model" * 300], oci=False)
    farm = tmp_path / "farm"
    link_models(store, [ModelName.parse("org/m:q4")], farm, hardlink=True)
    f = farm / "org/m/m-q4.gguf"
    store.remove_model(ModelName.parse("org/m:q4"))
    ino = f.stat().st_ino
    for _ in range(50):  # until the inode number is reused, if this filesystem does
        f.unlink()
        f.write_bytes(b"mine")
        if f.stat().st_ino == ino:
            break
    r = prune_links(farm, store)
    assert f.read_bytes() == b"mine" and r.removed == [] and [s.path for s in r.skipped] == [f]


def test_relinking_a_hardlink_leaves_no_hidden_link_behind(tmp_path: Path) -> None:
    """rename(2) between two links of one inode does nothing: replacing blobctl's own
    hardlink through a temp hardlink left the temp file, which kept the bytes alive."""
    from tests.blobstore.archutil import add_model

    store = Store(tmp_path / "s")
    add_model(store, "org/m:q4", [b"model" * 300], oci=False)
    farm = tmp_path / "farm"
    for _ in range(2):
        link_models(store, [ModelName.parse("org/m:q4")], farm, hardlink=True)
    f = farm / "org/m/m-q4.gguf"
    assert sorted(p.name for p in f.parent.iterdir()) == ["m-q4.gguf"]
    assert f.stat().st_nlink == 2  # the store's blob and the farm's link
    store.remove_model(ModelName.parse("org/m:q4"))
    assert prune_links(farm, store).removed == [f] and not (farm / "org").exists()


def test_an_older_record_without_inodes_is_trusted_only_where_provable(
        tmp_path: Path) -> None:
    """Records written before identities were kept (path -> digest): a symlink into a
    blobs/ folder or the store's own inode is blobctl's; a stale file is reported, kept."""
    from tests.blobstore.archutil import add_model

    store = Store(tmp_path / "s")
    live = add_model(store, "org/live:q4", [b"live" * 300], oci=False).layers[0].digest
    gone = add_model(store, "org/gone:q4", [b"gone" * 300], oci=False).layers[0].digest
    farm = tmp_path / "farm"
    farm.mkdir()
    (farm / "live.gguf").hardlink_to(store.blob_path(live))
    (farm / "gone-hard.gguf").hardlink_to(store.blob_path(gone))
    (farm / "gone-sym.gguf").symlink_to(store.blob_path(gone))
    (farm / "mine.gguf").write_bytes(b"mine")
    (farm / ".blobctl-links.json").write_text(json.dumps({"links": {
        "live.gguf": str(live), "gone-hard.gguf": str(gone), "gone-sym.gguf": str(gone),
        "mine.gguf": str(gone)}}))
    store.remove_model(ModelName.parse("org/gone:q4"))
    r = prune_links(farm, store)
    assert r.removed == [farm / "gone-sym.gguf"]
    assert {s.path for s in r.skipped} == {farm / "gone-hard.gguf", farm / "mine.gguf"}
    assert "older blobctl recorded it without its inode" in r.skipped[0].reason
    assert (farm / "gone-hard.gguf").read_bytes() == b"gone" * 300
    assert (farm / "mine.gguf").read_bytes() == b"mine"
    rec = json.loads((farm / ".blobctl-links.json").read_text())["links"]
    assert rec["live.gguf"]["kind"] == "hardlink"  # proven, so its identity is recorded
    assert rec["live.gguf"]["ino"] == (farm / "live.gguf").stat().st_ino


# ---------------------------------------------------------------------- link farm state
from hypothesis import settings as _settings  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule  # noqa: E402


class LinkFarmMachine(RuleBasedStateMachine):
    """Link, remove, re-add and prune models, and a user who replaces a link (or puts a
    file where a link would go), in any order: a live model's link always gives its GGUF
    bytes (a hardlink of a model removed and added again is re-linked to the new blob by
    prune); prune removes the links of removed models; no file or symlink of the user's
    is ever changed, and every recorded link left dangling is reported."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        from tests.blobstore.archutil import add_model

        self.add_model = add_model
        self.tmp = Path(tempfile.mkdtemp(prefix="farm-"))
        self.store = Store(self.tmp / "s")
        self.farm = self.tmp / "farm"
        self.farm.mkdir()
        (self.farm / "user.gguf").write_bytes(b"user")  # must survive everything
        self.data = {f"m{i}": os.urandom(1000 + i) for i in range(3)}
        self.live: set[str] = set()
        self.linked: dict[str, str] = {}  # model -> "symlink"/"hardlink" of its last link
        self.user: dict[Path, tuple[str, bytes]] = {}  # the user's: ("file", bytes) or
        (self.tmp / "mine.gguf").write_bytes(b"the user's own model")  # ("symlink", text)

    def teardown(self) -> None:
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)

    def name(self, m: str) -> ModelName:
        return ModelName.parse(f"hf.co/org/{m}:Q4_0")

    def path(self, m: str) -> Path:
        return self.farm / "org" / m / f"{m}-Q4_0.gguf"

    @rule(m=st.sampled_from(["m0", "m1"]))
    def add(self, m: str) -> None:
        self.add_model(self.store, str(self.name(m)), [self.data[m]], oci=False)
        self.live.add(m)

    @rule(m=st.sampled_from(["m0", "m1"]), hard=st.booleans())
    def link(self, m: str, hard: bool) -> None:
        if self.path(m) in self.user:  # refused, whether the model is live or not
            with pytest.raises(Exception):  # noqa: B017  (InvalidInput, ModelNotFound)
                link_models(self.store, [self.name(m)], self.farm, hardlink=hard)
            return
        if m not in self.live:
            with pytest.raises(Exception):  # noqa: B017  (ModelNotFound)
                link_models(self.store, [self.name(m)], self.farm, hardlink=hard)
            return
        link_models(self.store, [self.name(m)], self.farm, hardlink=hard)
        self.linked[m] = "hardlink" if hard else "symlink"

    @rule(m=st.sampled_from(["m0", "m1"]))
    def remove(self, m: str) -> None:
        if m in self.live:
            self.store.remove_model(self.name(m))
            self.live.discard(m)

    @rule(m=st.sampled_from(["m0", "m1"]), how=st.sampled_from(["file", "symlink",
                                                                 "dangling"]))
    def user_replaces(self, m: str, how: str) -> None:
        """The user deletes what is at the path (blobctl's link, or nothing) and puts
        their own file there: bytes, a symlink to their file, or a dangling symlink into
        a blobs/ folder under a blob name."""
        path = self.path(m)
        if path in self.user:
            return
        self.linked.pop(m, None)
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        if how == "file":
            self.user[path] = ("file", f"user file {m}".encode())
            path.write_bytes(self.user[path][1])
        else:
            text = str(self.tmp / "mine.gguf") if how == "symlink" else \
                str(self.tmp / "blobs" / ("sha256-" + "0" * 64))
            self.user[path] = ("symlink", text.encode())
            path.symlink_to(text)

    @rule()
    def prune(self) -> None:
        had = (self.farm / ".blobctl-links.json").exists()
        r = prune_links(self.farm, self.store)
        removed = set(r.removed)
        gone = {self.path(m) for m in self.linked if m not in self.live}
        assert removed <= gone
        assert not removed & set(self.user) and not set(r.relinked) & set(self.user)
        # a prune never starts a record in a folder blobctl never linked into
        assert (self.farm / ".blobctl-links.json").exists() == had
        record = json.loads((self.farm / ".blobctl-links.json").read_text())["links"] \
            if had else {}
        for rel in record:  # a recorded link that dangles was reported
            p = self.farm / rel
            if p.is_symlink() and not p.exists():
                assert p in {s.path for s in r.skipped}
        for m in [m for m in self.linked if m not in self.live]:
            assert not self.path(m).exists() and not self.path(m).is_symlink()
            del self.linked[m]
        for m, kind in self.linked.items():  # live: the store's own file again
            if kind == "hardlink":
                blob = self.store.resolve(self.name(m), record=False).model_path
                assert blob is not None and os.path.samefile(blob, self.path(m))

    @invariant()
    def links_of_live_models_give_their_bytes(self) -> None:
        assert (self.farm / "user.gguf").read_bytes() == b"user"
        for path, (how, data) in self.user.items():
            if how == "file":
                assert not path.is_symlink() and path.read_bytes() == data
            else:
                assert os.readlink(path) == data.decode()
        for m, kind in self.linked.items():
            if m in self.live:
                assert self.path(m).read_bytes() == self.data[m]
                assert self.path(m).is_symlink() == (kind == "symlink")


TestLinkFarm = LinkFarmMachine.TestCase
TestLinkFarm.settings = _settings(max_examples=60, stateful_step_count=12, deadline=None)


def test_prune_relinks_a_hardlink_whose_model_came_back(tmp_path: Path) -> None:
    """The sequence the state machine above needs ~600 examples to find."""
    machine = LinkFarmMachine()
    try:
        machine.add("m0")
        machine.link("m0", True)
        machine.remove("m0")
        machine.add("m0")  # the same bytes again: a new file in blobs/
        machine.prune()    # re-linked to it, not removed
        machine.links_of_live_models_give_their_bytes()
        r = run("link", "--prune", "--to", str(machine.farm), "--json",
                "--store", str(machine.store.root))
        assert r.code == 0 and r.json() == {"removed": [], "relinked": [], "skipped": []}
    finally:
        machine.teardown()
