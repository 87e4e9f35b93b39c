"""Newer Ollama's ``manifests-v2/`` (PR #15735, 2026): a model's name is a link (symlink,
else hardlink, else copy) to its manifest's bytes stored as a blob, the default registry
spelt ``ollama.com``; a ``manifests/`` file of the same name is removed; a manifest list
(``application/vnd.ollama.manifest.list.v2+json``) names each runner's manifest by the
digest of its blob. Found from outside: blobctl saw none of these models, and its GC
(also the one after every pull under a max-size) and ``rm`` deleted their blobs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore.digest import Digest
from blobstore.errors import CapNotMet
from blobstore.gc import GCOptions, gc
from blobstore.manifest import (
    CONFIG_DOCKER,
    DOCKER_MANIFEST,
    LAYER_MODEL,
    LAYER_TEMPLATE,
    Descriptor,
    build_manifest,
)
from blobstore.name import ModelName
from blobstore.store import Store
from tests.blobstore.gcutil import add_model

LATER = time.time() + 10 * 86400
OLD = time.time() - 5 * 86400
LIST = "application/vnd.ollama.manifest.list.v2+json"
KINDS = ["symlink", "hardlink", "copy", "list"]


def _blob(store: Store, data: bytes) -> dict[str, object]:
    d = store.put_bytes(data)
    return {"digest": str(d), "size": len(data)}


def ollama_v2(store: Store, model: str, layers: list[bytes], kind: str = "symlink",
              *, host: str = "ollama.com", tag: str = "latest") -> dict[str, Path]:
    """Write a model as newer Ollama does (``manifest/manifest.go`` WriteManifestData and
    LinkManifest); ``kind`` is how the name links to the manifest blob, or ``list`` for a
    manifest list whose one runner's manifest is referenced by digest."""
    cfg = _blob(store, json.dumps({"model_format": "gguf", "m": model}).encode())
    descs = [Descriptor(mediaType=LAYER_MODEL if i == 0 else LAYER_TEMPLATE,
                        digest=Digest.parse(str(_blob(store, b)["digest"])), size=len(b))
             for i, b in enumerate(layers)]
    raw = build_manifest(Descriptor(mediaType=CONFIG_DOCKER,
                                    digest=Digest.parse(str(cfg["digest"])),
                                    size=int(str(cfg["size"]))), descs).raw
    if kind == "list":
        child = store.put_bytes(raw)
        raw = json.dumps({"schemaVersion": 2, "mediaType": LIST, "manifests": [
            {"mediaType": DOCKER_MANIFEST, "digest": str(child), "runner": "ollama",
             "format": "gguf"}]}).encode() + b"\n"
    mdig = store.put_bytes(raw)
    blob = store.layout.blob(mdig)
    link = store.root / "manifests-v2" / host / "library" / model / tag
    link.parent.mkdir(parents=True, exist_ok=True)
    if kind in ("symlink", "list"):
        link.symlink_to(os.path.relpath(blob, link.parent))
    elif kind == "hardlink":
        os.link(blob, link)
    else:
        shutil.copyfile(blob, link)
    for p in store.layout.blobs.iterdir():
        os.utime(p, (OLD, OLD))
    return {"link": link, "blob": blob}


def needed(store: Store, link: Path) -> set[Digest]:
    """Every blob an Ollama v2 model needs, as Ollama's referencedBlobDigestsForData
    collects them: the manifest's own blob, a list's manifests, config and layers."""
    raw = link.read_bytes()
    out = {Digest.of_bytes(raw)}
    doc = json.loads(raw)
    docs = [doc]
    if doc.get("mediaType") == LIST:
        docs = []
        for child in doc["manifests"]:
            d = Digest.parse(child["digest"])
            out.add(d)
            docs.append(json.loads(store.layout.blob(d).read_bytes()))
    for m in docs:
        for desc in [m["config"], *m["layers"]]:
            out.add(Digest.parse(desc["digest"]))
    return out


def assert_whole(store: Store, link: Path) -> None:
    assert link.exists(), f"{link} dangles"
    missing = [d for d in needed(store, link) if not store.has_blob(d)]
    assert not missing, f"{link}: blobs deleted: {missing}"


@pytest.mark.timeout(120)
@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=3),
       shared=st.booleans(),
       action=st.sampled_from(["sweep", "cap-met", "rm-other", "evict-other"]))
def test_blobctl_never_deletes_what_an_ollama_v2_model_needs(
        tmp_path_factory: pytest.TempPathFactory, kinds: list[str], shared: bool,
        action: str) -> None:
    store = Store(tmp_path_factory.mktemp("v2") / "s")
    common = b"GGUF shared weights" * 100
    links = [ollama_v2(store, f"m{i}", [common if shared else b"GGUF %d" % i * 500,
                                        b"{{ .Prompt }} %d" % i], kind)["link"]
             for i, kind in enumerate(kinds)]
    add_model(store, "mine", [common, b"mine only" * 10], used=time.time())
    orphan = store.put_bytes(b"nobody's")
    os.utime(store.layout.blob(orphan), (OLD, OLD))
    if action == "sweep":
        gc(store, GCOptions(), now=LATER)
        assert not store.has_blob(orphan)  # GC still works
    elif action == "cap-met":  # the GC a pull runs under a max-size far above the use
        gc(store, GCOptions(max_size=1 << 40), now=LATER)
    elif action == "rm-other":
        store.remove_model(ModelName.parse("mine"))
    else:  # the cap evicts blobctl's model: what it shared with Ollama's stays
        gc(store, GCOptions(max_size=sum(os.path.getsize(p) for p in store.layout.blobs.iterdir())
                            - 1), now=LATER)
    for link in links:
        assert_whole(store, link)


def test_v2_models_are_listed_once_and_resolve_to_the_v2_manifest(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    add_model(store, "tiny", [b"GGUF old" * 100])  # manifests/registry.ollama.ai/...
    v2 = ollama_v2(store, "tiny", [b"GGUF new" * 100, b"tmpl"])
    ollama_v2(store, "other", [b"GGUF other" * 100], "hardlink", host="example.com:5000")
    names = sorted(e.name.display() for e in store.list_models())
    assert names == ["example.com:5000/library/other:latest", "tiny:latest"]
    entry = next(e for e in store.list_models() if e.name.display() == "tiny:latest")
    assert str(entry.path) == str(v2["link"])
    path = store.resolve(ModelName.parse("tiny")).model_path
    assert path is not None and path.read_bytes() == b"GGUF new" * 100
    # the two spellings of the default registry are one model (Ollama's rule)
    assert store.find_manifest_path(ModelName.parse("registry.ollama.ai/library/tiny")) \
        == v2["link"]


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "copy"])
def test_rm_removes_the_v2_name_the_name_it_hid_and_the_manifest_blob(
        tmp_path: Path, kind: str) -> None:
    store = Store(tmp_path / "s")
    add_model(store, "tiny", [b"GGUF old" * 100])
    v2 = ollama_v2(store, "tiny", [b"GGUF new" * 100], kind)
    keep = ollama_v2(store, "keep", [b"GGUF new" * 100], kind)  # shares the weights
    result = store.remove_model(ModelName.parse("tiny"))
    assert not os.path.lexists(v2["link"])
    assert not store.layout.manifest(ModelName.parse("tiny")).exists()  # not back
    assert [e.name.display() for e in store.list_models()] == ["keep:latest"]
    assert Digest.of_bytes(v2["blob"].read_bytes() if v2["blob"].exists() else b"") \
        not in result.kept_shared
    assert not v2["blob"].exists()  # the manifest's own blob went with it
    assert_whole(store, keep["link"])


def test_writing_a_model_replaces_its_v2_name(tmp_path: Path) -> None:
    """A pull or import of a name newer Ollama has in ``manifests-v2/`` writes
    ``manifests/`` (every Ollama reads it) and drops the v2 link, which would hide it."""
    store = Store(tmp_path / "s")
    v2 = ollama_v2(store, "tiny", [b"GGUF old" * 100])
    add_model(store, "tiny", [b"GGUF new" * 100])
    assert not os.path.lexists(v2["link"])
    path = store.resolve(ModelName.parse("tiny")).model_path
    assert path is not None and path.read_bytes() == b"GGUF new" * 100
    gc(store, GCOptions(), now=LATER)  # the old manifest blob is garbage now
    assert not v2["blob"].exists()
    assert [e.name.display() for e in store.list_models()] == ["tiny:latest"]


def test_evicting_a_v2_model_leaves_no_dangling_link(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    v2 = ollama_v2(store, "old", [b"GGUF old" * 1000])
    add_model(store, "new", [b"GGUF new" * 10], used=time.time())
    report = gc(store, GCOptions(max_size=2_000), now=LATER)
    assert [n for n in report.removed_models] and not os.path.lexists(v2["link"])
    assert not v2["blob"].exists()
    assert not (store.root / "manifests-v2" / "ollama.com").exists()  # emptied folders go
    assert [e.name.display() for e in store.list_models()] == ["new:latest"]


def _list_model(store: Store, children: list[tuple[str, str]]) -> Path:
    """A manifest list (in ``manifests-v2/``) of one manifest per (runner, how): ``ref``
    names the manifest's blob by digest, ``inline`` embeds it; each runner's GGUF holds
    the runner's name."""
    entries = []
    for runner, how in children:
        gguf = f"GGUF for {runner}".encode() * 20
        m = build_manifest(
            Descriptor(mediaType=CONFIG_DOCKER, digest=store.put_bytes(b"{}"), size=2),
            [Descriptor(mediaType=LAYER_MODEL, digest=store.put_bytes(gguf), size=len(gguf))])
        if how == "ref":
            entries.append({"mediaType": DOCKER_MANIFEST, "digest": str(store.put_bytes(m.raw)),
                            "runner": runner, "format": "gguf"})
        else:
            entries.append({**json.loads(m.raw), "runner": runner, "format": "gguf"})
    raw = json.dumps({"schemaVersion": 2, "mediaType": LIST, "manifests": entries}).encode()
    blob = store.layout.blob(store.put_bytes(raw))
    link = store.root / "manifests-v2" / "ollama.com" / "library" / "lst" / "latest"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    return link


@pytest.mark.parametrize(("children", "runs"), [
    ([("mlx", "ref"), ("ollama", "ref")], "ollama"),
    ([("mlx", "inline"), ("llamacpp", "inline")], "llamacpp"),
    ([("mlx", "ref")], "mlx"),
    ([("LlamaCpp", "ref"), ("mlx", "inline")], "LlamaCpp"),
])
def test_an_ollama_manifest_list_is_the_manifest_ollama_would_run(
        tmp_path: Path, children: list[tuple[str, str]], runs: str) -> None:
    store = Store(tmp_path / "s")
    link = _list_model(store, children)
    [entry] = store.list_models()
    assert entry.error is None and entry.summary is not None
    assert entry.summary.digest == Digest.of_bytes(link.read_bytes())  # the file's ID
    path = store.resolve(ModelName.parse("lst")).model_path
    assert path is not None and path.read_bytes() == f"GGUF for {runs}".encode() * 20
    assert store.verify().ok
    gc(store, GCOptions(), now=LATER)  # every runner's manifest and layers stay
    for runner, _ in children:
        assert store.has_blob(Digest.of_bytes(f"GGUF for {runner}".encode() * 20))
    assert store.resolve(ModelName.parse("lst")).model_path == path


def test_a_list_without_a_runner_here_or_missing_its_manifest_is_reported(
        tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    link = _list_model(store, [("tpu", "ref")])
    assert "without a manifest for the runners" in (store.list_models()[0].error or "")
    link.unlink()
    link = _list_model(store, [("ollama", "ref")])
    child = Digest.parse(json.loads(link.read_bytes())["manifests"][0]["digest"])
    store.layout.blob(child).unlink()
    assert "is missing" in (store.list_models()[0].error or "")
    assert not store.verify().ok


@pytest.mark.parametrize("tree", ["manifests", "manifests-v2"])
def test_gc_keeps_the_blobs_of_ollamas_five_level_kind_names(tmp_path: Path, tree: str) -> None:
    """``<host>/<ns>/<kind>/<model>/<tag>`` (Ollama's skill/agent names): not a model
    blobctl lists, but what it uses is kept."""
    store = Store(tmp_path / "s")
    body = store.put_bytes(b"skill body")
    cfg = store.put_bytes(b'{"x":1}')
    raw = build_manifest(Descriptor(mediaType=CONFIG_DOCKER, digest=cfg, size=7),
                         [Descriptor(mediaType="application/vnd.ollama.image.skill",
                                     digest=body, size=10)]).raw
    host = "ollama.com" if tree == "manifests-v2" else "registry.ollama.ai"
    p = store.root / tree / host / "library" / "skill" / "myskill" / "latest"
    p.parent.mkdir(parents=True)
    if tree == "manifests-v2":
        p.symlink_to(os.path.relpath(store.layout.blob(store.put_bytes(raw)), p.parent))
    else:
        p.write_bytes(raw)
    for b in store.layout.blobs.iterdir():
        os.utime(b, (OLD, OLD))
    add_model(store, "mine", [b"GGUF" * 10])
    store.remove_model(ModelName.parse("mine"))
    gc(store, GCOptions(), now=LATER)
    assert store.has_blob(body) and store.has_blob(cfg) and p.exists()
    assert store.list_models() == []


def test_the_cli_lists_shows_and_keeps_an_ollama_v2_model(tmp_path: Path) -> None:
    """The outside repro: ``list`` showed nothing and ``gc`` removed all four blobs."""
    from tests.cli.clirun import run

    store = Store(tmp_path / "s")
    v2 = ollama_v2(store, "tiny", [b"GGUF tiny" * 100, b"{{ .Prompt }}"])
    s = str(store.root)
    listed = run("list", "--store", s, "--json")
    assert listed.code == 0 and [m["display_name"] for m in listed.json()] == ["tiny:latest"]
    swept = run("gc", "--store", s, "--json")
    assert swept.code == 0 and swept.json()["removed_blobs"] == [], swept.out
    assert run("verify", "--store", s).code == 0
    assert_whole(store, v2["link"])
    assert run("rm", "--store", s, "tiny").code == 0
    assert not any(store.layout.blobs.iterdir()) and not os.path.lexists(v2["link"])


# ---------------------------------------------------------------- found by review
def test_a_list_whose_runner_manifest_arrives_later_keeps_its_layers(tmp_path: Path) -> None:
    """A list's summary is not cached: its file stays the same while a runner's manifest
    and layers arrive (the cached one lacked them, and a later GC deleted them)."""
    store = Store(tmp_path / "s")
    gguf = b"GGUF for mlx" * 20
    m = build_manifest(
        Descriptor(mediaType=CONFIG_DOCKER, digest=Digest.of_bytes(b"{}"), size=2),
        [Descriptor(mediaType=LAYER_MODEL, digest=Digest.of_bytes(gguf), size=len(gguf))])
    link = _list_model(store, [("ollama", "ref")])
    doc = json.loads(link.read_bytes())
    doc["manifests"].append({"mediaType": DOCKER_MANIFEST, "digest": str(m.digest),
                             "runner": "mlx"})
    link.unlink()
    blob = store.layout.blob(store.put_bytes(json.dumps(doc).encode()))
    link.symlink_to(os.path.relpath(blob, link.parent))
    assert store.list_models()[0].error is None
    time.sleep(2.2)  # older than the index's racy window: a summary would be trusted now
    store.list_models()
    for data in (b"{}", gguf, m.raw):  # the mlx manifest arrives, with its layers
        os.utime(store.layout.blob(store.put_bytes(data)), (OLD, OLD))
    gc(store, GCOptions(), now=LATER)
    assert store.has_blob(Digest.of_bytes(gguf)) and store.has_blob(m.digest)
    store.remove_model(ModelName.parse("lst"))  # rm of a list frees what it reaches
    assert not any(p.name.startswith("sha256-") for p in store.layout.blobs.iterdir())


def test_a_v2_link_whose_manifest_blob_is_gone_is_a_broken_model(tmp_path: Path) -> None:
    """As for Ollama (lstat): it is the model, hiding the manifests/ file; path says it
    is damaged (exit 5), verify reports it, rm removes both, a pull replaces it."""
    from tests.cli.clirun import run

    store = Store(tmp_path / "s")
    add_model(store, "tiny", [b"GGUF old" * 100])
    v2 = ollama_v2(store, "tiny", [b"GGUF new" * 100])
    v2["blob"].unlink()  # (as the GC of blobctl before it read manifests-v2/ did)
    s = str(store.root)
    assert run("path", "--store", s, "tiny").code == 5
    assert run("verify", "--store", s).code == 5
    assert "tiny" not in run("list", "--store", s).out
    add_model(store, "tiny", [b"GGUF newer" * 100])  # a pull of it
    assert not os.path.lexists(v2["link"])
    assert run("path", "--store", s, "tiny").code == 0
    v2 = ollama_v2(store, "tiny", [b"GGUF new" * 100])
    v2["blob"].unlink()
    assert run("rm", "--store", s, "tiny").code == 0
    assert not os.path.lexists(v2["link"]) and store.list_models() == []


def test_evicting_a_v2_model_removes_the_file_it_hid_and_a_new_link_is_young(
        tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    add_model(store, "tiny", [b"GGUF old" * 1000])
    legacy = store.layout.manifest(ModelName.parse("tiny"))
    os.utime(legacy, (OLD, OLD))
    v2 = ollama_v2(store, "tiny", [b"GGUF new" * 1000])
    os.utime(v2["link"], (OLD, OLD), follow_symlinks=False)
    report = gc(store, GCOptions(max_size=0), now=LATER)
    assert report.removed_models == ["registry.ollama.ai/library/tiny:latest"]
    assert not legacy.exists() and not os.path.lexists(v2["link"])
    assert store.list_models() == []
    # a name Ollama linked just now to an old manifest blob (ollama cp) is young
    fresh = ollama_v2(store, "cp", [b"GGUF cp" * 1000])
    with pytest.raises(CapNotMet):
        gc(store, GCOptions(max_size=0))
    assert os.path.lexists(fresh["link"])


def test_rm_of_two_names_hardlinked_to_one_manifest_blob_removes_both(tmp_path: Path) -> None:
    """Newer Ollama's fallback when it cannot symlink (``ollama cp`` too): two names, one
    inode. ``rm`` counted them as one file and removed one (found by review)."""
    from tests.cli.clirun import run

    store = Store(tmp_path / "s")
    a = ollama_v2(store, "alpha", [b"GGUF a" * 100], "hardlink")
    b = a["link"].parent.parent / "beta" / "latest"
    b.parent.mkdir()
    os.link(a["blob"], b)
    r = run("rm", "--store", str(store.root), "alpha", "beta")
    assert r.code == 0, r.err
    assert store.list_models() == [] and not b.exists() and not a["link"].exists()


def test_a_hardlinked_v2_name_made_just_now_is_young(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    v2 = ollama_v2(store, "cp", [b"GGUF cp" * 1000], "hardlink")  # blob mtimes: days old
    with pytest.raises(CapNotMet):
        gc(store, GCOptions(max_size=0))
    assert v2["link"].exists()


# ------------------------------------------------------- found from outside, round two
@pytest.mark.parametrize("action", ["rm", "write"])
def test_a_v2_name_hides_only_the_manifests_file_of_exactly_its_name(
        tmp_path: Path, action: str) -> None:
    """Ollama's foo (manifests-v2/) and blobctl's Foo (manifests/) are two models, as
    list shows them: rm foo, or a pull or import of foo, leaves Foo as it was (it took
    Foo's file for the one foo hides, removed it or wrote over it)."""
    store = Store(tmp_path / "s")
    add_model(store, "Foo", [b"GGUF Foo" * 100])
    upper = store.layout.manifest(ModelName.parse("Foo"))
    before = upper.read_bytes()
    v2 = ollama_v2(store, "foo", [b"GGUF foo" * 100])
    if action == "rm":
        store.remove_model(ModelName.parse("foo"))
        assert not os.path.lexists(v2["link"])
    else:
        add_model(store, "foo", [b"GGUF new foo" * 100])
        path = store.resolve(ModelName.parse("foo")).model_path
        assert path is not None and path.read_bytes() == b"GGUF new foo" * 100
    assert upper.read_bytes() == before
    path = store.resolve(ModelName.parse("Foo")).model_path
    assert path is not None and path.read_bytes() == b"GGUF Foo" * 100


def test_show_gives_a_manifest_lists_id_as_list_does(tmp_path: Path) -> None:
    from tests.cli.clirun import run

    store = Store(tmp_path / "s")
    _list_model(store, [("ollama", "ref")])
    s = str(store.root)
    listed = run("list", "--store", s, "--json").json()
    shown = run("show", "--store", s, "lst", "--json").json()
    assert shown["id"] == listed[0]["id"] and shown["digest"] == listed[0]["digest"]


@pytest.mark.timeout(120)
def test_writes_survive_another_program_removing_empty_manifest_folders(
        tmp_path: Path) -> None:
    """Ollama removes the empty folders of both manifest trees after each of its writes
    and removals (PruneDirectory), and takes no lock: a folder blobctl just made for a new
    name could go before the manifest was renamed into it (exit 11, "check permissions")."""
    import threading

    store = Store(tmp_path / "s")
    stop = threading.Event()

    def prune() -> None:
        while not stop.is_set():
            for root in (store.layout.manifests, store.root / "manifests-v2"):
                for d, _, _ in sorted(os.walk(root), key=lambda w: -w[0].count(os.sep)):
                    if d != str(root):
                        with contextlib.suppress(OSError):
                            os.rmdir(d)

    t = threading.Thread(target=prune, daemon=True)
    t.start()
    try:
        for i in range(40):
            add_model(store, f"n{i}/m{i}", [b"GGUF %d" % i * 50])
    finally:
        stop.set()
        t.join(10)
    assert len(store.list_models()) == 40



@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_rm_of_two_spellings_of_one_v2_name_removes_it_once(tmp_path: Path,
                                                           kind: str) -> None:
    """``foo`` and ``team/foo`` through a symlinked namespace folder are one entry: the
    second spelling is not "not found" after the first removed it (found by review)."""
    from tests.cli.clirun import run

    store = Store(tmp_path / "s")
    v2 = ollama_v2(store, "foo", [b"GGUF foo" * 100], kind)
    (v2["link"].parent.parent.parent / "team").symlink_to("library")
    r = run("rm", "--store", str(store.root), "foo", "team/foo")
    assert r.code == 0, r.err
    assert not os.path.lexists(v2["link"])
