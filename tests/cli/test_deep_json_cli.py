"""JSON nested deeper than the interpreter's recursion limit (found from outside: msgspec
raised RecursionError, which no handler for bad bytes caught: pull exited 1, import of an
OCI folder exited 1, ``serve --push`` answered a bare 500, and a manifest file like that
in the store made list/verify/rm exit 1). blobstore/decoding.py turns it into a decode
error; each entry point then says what it says for any document that does not decode.

Hypothesis chooses the depth (up to 100 000), the nesting (arrays, objects, both) and
where in the document the deep value sits."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore import ModelName, Store
from tests.cli.clirun import run
from tests.helpers import make_gguf
from tests.registry_server.conftest import serving
from tests.servers import OCI_MANIFEST, FaultServer, make_manifest, sha

pytestmark = pytest.mark.timeout(240)

GGUF = make_gguf(Path(tempfile.mkdtemp(prefix="deep-gguf-")) / "m.gguf", seed=5)
CONFIG = b'{"model_format":"gguf","architecture":"amd64","os":"linux"}'
MODEL = "application/vnd.ollama.image.model"
CFG_TYPE = "application/vnd.docker.container.image.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
SETTINGS = settings(max_examples=12, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])

# past the recursion limit wherever the decode runs (hypothesis raises the limit by 2000
# while a test runs; the CLI and the server keep Python's 1000)
DEPTHS = st.one_of(st.integers(3_000, 6_000), st.integers(6_000, 100_000))
KINDS = st.sampled_from(["array", "object", "mixed"])
# where a value of any type is read (an unknown field): the decoder descends into it
MANIFEST_PLACES = st.sampled_from(["top", "config", "layer", "annotation-key"])


def deep(depth: int, kind: str) -> str:
    if kind == "array":
        return "[" * depth + "]" * depth
    if kind == "object":
        return '{"a":' * depth + "1" + "}" * depth
    half = depth // 2
    return ('{"a":[' * half) + "0" + ("]}" * half)


def deep_manifest(value: str, place: str) -> bytes:
    """A manifest with its blobs (GGUF, config) in order, ``value`` put at ``place``."""
    doc = json.loads(make_manifest(CONFIG, [(MODEL, GGUF.read_bytes())],
                                   media_type=OCI_MANIFEST, config_type=CFG_TYPE))
    marker = '"__deep__"'
    if place == "top":
        doc["x"] = "__deep__"
    elif place == "config":
        doc["config"]["x"] = "__deep__"
    elif place == "layer":
        doc["layers"][0]["x"] = "__deep__"
    else:  # annotations are str -> str: the deep value under an unknown field beside
        doc["annotations"] = {"k": "v"}
        doc["y"] = {"annotations": "__deep__"}
    return json.dumps(doc, separators=(",", ":")).replace(marker, value).encode()


def _error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1, err
    assert "unexpected error" not in err and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------ pull
@pytest.fixture(scope="module")
def registry() -> Iterator[FaultServer]:
    with FaultServer() as srv:
        srv.add_blob(CONFIG)
        srv.add_blob(GGUF.read_bytes())
        yield srv


@SETTINGS
@given(depth=DEPTHS, kind=KINDS, place=st.sampled_from(["top", "config", "layer",
                                                         "annotation-key", "index"]))
def test_pull_of_a_deep_manifest_is_a_registry_error(registry: FaultServer, tmp_path: Path,
                                                     depth: int, kind: str,
                                                     place: str) -> None:
    value = deep(depth, kind)
    tag = f"t{len(registry.manifests)}"
    if place == "index":
        raw = ('{"schemaVersion":2,"mediaType":"' + OCI_INDEX + '","manifests":[],'
               '"x":' + value + "}").encode()
        registry.manifests[("ns/m", tag)] = (raw, OCI_INDEX)
    else:
        registry.manifests[("ns/m", tag)] = (deep_manifest(value, place), OCI_MANIFEST)
    store = Path(tempfile.mkdtemp(dir=tmp_path))
    ref = f"{registry.netloc}/ns/m:{tag}"
    r = run("--store", str(store), "pull", ref, "--insecure", "--retries", "0")
    assert r.code == 6, r
    assert "nested too deep" in _error_line(r.err)
    assert not Store(store).has_model(ModelName.parse(ref))


# ------------------------------------------------------------------ import of a folder
def _oci_folder(root: Path, manifest: bytes, index_extra: str = "") -> Path:
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for data in (CONFIG, GGUF.read_bytes(), manifest):
        (blobs / hashlib.sha256(data).hexdigest()).write_bytes(data)
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    entry = ('{"mediaType":"' + OCI_MANIFEST + '","digest":"' + sha(manifest) + '","size":'
             + str(len(manifest)) + ',"annotations":{"org.opencontainers.image.ref.name":'
             '"ns/m:t"}}')
    (root / "index.json").write_text('{"schemaVersion":2,"manifests":[' + entry + "]"
                                     + index_extra + "}")
    return root


@SETTINGS
@given(depth=DEPTHS, kind=KINDS, place=st.sampled_from(["top", "config", "layer",
                                                         "annotation-key", "index.json"]))
def test_import_of_a_folder_with_deep_json_is_refused(tmp_path: Path, depth: int,
                                                      kind: str, place: str) -> None:
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    value = deep(depth, kind)
    if place == "index.json":
        folder = _oci_folder(work / "oci", deep_manifest("0", "top"), ',"x":' + value)
    else:
        folder = _oci_folder(work / "oci", deep_manifest(value, place))
    r = run("--store", str(work / "s"), "import", str(folder))
    line = _error_line(r.err)
    if place == "index.json":  # the archive's table of contents: damage (spec/archive.md)
        assert r.code == 5, r
        assert "index.json does not decode: nested too deep" in line
    else:  # a manifest that verifies but does not decode: a damaged model (exit 5)
        assert r.code == 5, r
        assert "0 model(s) imported, 1 refused" in line
        assert "warning: skipped ns/m:t: invalid manifest" in r.err
        assert "nested too deep" in r.err
    assert not Store(work / "s").has_model(ModelName.parse("ns/m:t"))
    shutil.rmtree(work)


# ------------------------------------------------------------------ serve --push
@pytest.fixture(scope="module")
def pushable(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    store = Store(tmp_path_factory.mktemp("deep-push"))
    store.put_bytes(CONFIG)
    store.put_bytes(GGUF.read_bytes())
    with serving(store, push=True) as (url, _):
        yield url, store


@SETTINGS
@given(depth=DEPTHS, kind=KINDS, place=MANIFEST_PLACES)
def test_push_of_a_deep_manifest_is_manifest_invalid(pushable: tuple[str, Store],
                                                     depth: int, kind: str,
                                                     place: str) -> None:
    url, store = pushable
    raw = deep_manifest(deep(depth, kind), place)
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.put("/v2/ns/deep/manifests/t", content=raw,
                  headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 400, (r.status_code, r.text[:300])
    assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    err = r.json()["errors"][0]
    assert err["code"] == "MANIFEST_INVALID" and "nested too deep" in err["message"]
    assert not store.has_model(ModelName.parse("ns/deep:t"))


# ------------------------------------------------------------------ a file in the store
@SETTINGS
@given(depth=DEPTHS, kind=KINDS, place=MANIFEST_PLACES)
def test_a_deep_manifest_file_in_the_store_is_skipped_reported_and_removable(
        tmp_path: Path, depth: int, kind: str, place: str) -> None:
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    s = str(work / "s")
    assert run("--store", s, "import", str(GGUF), "--name", "ok/m").code == 0
    bad = work / "s" / "manifests" / "registry.ollama.ai" / "ns" / "deep" / "latest"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(deep_manifest(deep(depth, kind), place))

    r = run("--store", s, "list")
    assert r.code == 0, r
    assert "ok/m:latest" in r.out
    assert "warning: skipping ns/deep:latest: invalid manifest" in r.err
    for cmd in (["du"], ["gc", "--dry-run"]):
        r = run("--store", s, *cmd)
        assert r.code == 0, (cmd, r)
    r = run("--store", s, "verify")
    assert r.code == 5, r
    assert f"invalid-manifest: {bad}: nested too deep" in r.out + r.err
    r = run("--store", s, "show", "ns/deep")
    assert r.code == 4 and "nested too deep" in _error_line(r.err), r
    r = run("--store", s, "rm", "ns/deep")
    assert r.code == 0, r
    assert not bad.exists()
    assert run("--store", s, "verify").code == 0
    shutil.rmtree(work)
