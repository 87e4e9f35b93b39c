from __future__ import annotations

import json

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from blobstore.digest import Digest
from blobstore.errors import InvalidManifest
from blobstore.manifest import (
    DOCKER_MANIFEST,
    LAYER_MODEL,
    OCI_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    build_manifest,
    go_json,
)

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


def doc(**over: object) -> dict[str, object]:
    d: dict[str, object] = {
        "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "digest": D1, "size": 10},
        "layers": [{"mediaType": LAYER_MODEL, "digest": D2, "size": 20}],
    }
    d.update(over)
    return d


def test_compact_and_go_encodings_decode_and_keep_raw() -> None:
    compact = json.dumps(doc(), separators=(",", ":")).encode()
    go = compact + b"\n"
    a, b = Manifest.decode(compact), Manifest.decode(go)
    assert a.raw == compact and b.raw == go
    assert a.digest != b.digest  # identity is the exact bytes
    assert a.size == b.size == 30
    assert a.model_layer() is not None and str(a.model_layer().digest) == D2  # type: ignore[union-attr]


def test_unknown_fields_tolerated() -> None:
    d = doc(annotations={"x": "y"}, extra=1)
    d["layers"][0]["from"] = "/some/path"  # type: ignore[index]
    d["layers"][0]["weird"] = {"a": 1}  # type: ignore[index]
    m = Manifest.decode(json.dumps(d).encode())
    assert len(m.layers) == 1


def test_oci_manifest_without_media_type() -> None:
    d = doc()
    del d["mediaType"]
    assert Manifest.decode(json.dumps(d).encode()).media_type == OCI_MANIFEST


@pytest.mark.parametrize("bad", [
    b"", b"{", b"[]", b"null",
    json.dumps(doc(schemaVersion=1)).encode(),
    json.dumps(doc(mediaType="text/html")).encode(),
    json.dumps(doc(config=None)).encode(),
    json.dumps(doc(layers=[{"mediaType": LAYER_MODEL, "digest": "sha256:../x", "size": 1}])).encode(),
    json.dumps(doc(layers=[{"mediaType": LAYER_MODEL, "digest": D2, "size": -1}])).encode(),
    json.dumps(doc(layers=[{"mediaType": LAYER_MODEL, "digest": D2, "size": 1 << 60}])).encode(),
    json.dumps(doc(layers=[{"mediaType": LAYER_MODEL, "digest": D2, "size": "1"}])).encode(),
    json.dumps(doc(layers=[{"mediaType": "", "digest": D2, "size": 1}])).encode(),
    json.dumps(doc(layers=[{"mediaType": LAYER_MODEL, "digest": "md5:" + "a" * 32,
                            "size": 1}])).encode(),
    json.dumps({"schemaVersion": 2, "manifests": []}).encode(),
])
def test_rejects_bad_manifests(bad: bytes) -> None:
    with pytest.raises(InvalidManifest):
        Manifest.decode(bad)


def test_go_json_escapes_like_go() -> None:
    assert go_json({"t": "<a>&\u2028"}) == b'{"t":"\\u003ca\\u003e\\u0026\\u2028"}\n'


def test_build_manifest_matches_ollama_layout() -> None:
    cfg = Descriptor(mediaType="application/vnd.docker.container.image.v1+json",
                     digest=Digest.parse(D1), size=10)
    lay = Descriptor(mediaType=LAYER_MODEL, digest=Digest.parse(D2), size=20)
    m = build_manifest(cfg, [lay])
    assert m.raw == (
        b'{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",'
        b'"config":{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"'
        + D1.encode() + b'","size":10},"layers":[{"mediaType":"application/vnd.ollama.image.model",'
        b'"digest":"' + D2.encode() + b'","size":20}]}\n'
    )
    assert Manifest.decode(m.raw).digest == m.digest


def test_index_select() -> None:
    raw = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                      "manifests": [
                          {"mediaType": OCI_MANIFEST, "digest": D1, "size": 5,
                           "platform": {"os": "linux", "architecture": "arm64"}},
                          {"mediaType": OCI_MANIFEST, "digest": D2, "size": 5,
                           "platform": {"os": "linux", "architecture": "amd64"}}]}).encode()
    idx = Index.decode(raw)
    assert str(idx.select("linux", "amd64").digest) == D2  # type: ignore[union-attr]
    assert idx.select("windows", "amd64") is None
    with pytest.raises(InvalidManifest):
        Manifest.decode(raw)


hexes = st.text("0123456789abcdef", min_size=64, max_size=64)
media = st.sampled_from([LAYER_MODEL, "application/vnd.ollama.image.template",
                         "application/vnd.oci.image.layer.v1.tar"])


@given(st.lists(st.tuples(media, hexes, st.integers(0, 1 << 40)), max_size=8),
       hexes, st.integers(0, 10**6))
def test_manifest_roundtrip(layers: list[tuple[str, str, int]], chex: str, csize: int) -> None:
    known: dict[str, int] = {}  # (one digest with two sizes never decodes: below)
    for h, s in [(chex, csize), *((h, s) for _, h, s in layers)]:
        assume(known.setdefault(h, s) == s)
    cfg = Descriptor(mediaType="application/vnd.docker.container.image.v1+json",
                     digest=Digest("sha256", chex), size=csize)
    descs = [Descriptor(mediaType=m, digest=Digest("sha256", h), size=s) for m, h, s in layers]
    m = build_manifest(cfg, descs)
    back = Manifest.decode(m.raw)
    assert back.raw == m.raw and back.digest == m.digest
    assert back.descriptors == m.descriptors
    assert back.size == csize + sum(s for _, _, s in layers)
    # the registry's compact re-encoding decodes to the same descriptors
    again = Manifest.decode(json.dumps(json.loads(m.raw), separators=(",", ":")).encode())
    assert again.descriptors == m.descriptors


@given(st.binary(max_size=300))
def test_garbage_never_crashes(data: bytes) -> None:
    try:
        Manifest.decode(data)
    except InvalidManifest:
        pass


@given(sizes=st.lists(st.integers(0, 10**12), min_size=2, max_size=6),
       dup_at=st.data(), same=st.booleans())
def test_a_digest_listed_with_two_sizes_never_decodes(sizes: list[int], dup_at: st.DataObject,
                                                      same: bool) -> None:
    """Found from outside: the same digest twice, with sizes that differ, was taken with
    its first size, so a pull passed or failed by the order of the layers. Wherever the
    second listing sits (config or any layer), it is refused; equal sizes are fine."""
    digests = [f"sha256:{i:064x}" for i in range(len(sizes))]
    i = dup_at.draw(st.integers(0, len(sizes) - 2))
    j = dup_at.draw(st.integers(i + 1, len(sizes) - 1))
    digests[j] = digests[i]
    if same:
        sizes[j] = sizes[i]
    elif sizes[j] == sizes[i]:
        sizes[j] += 1
    descs = [{"mediaType": "application/vnd.ollama.image.model", "digest": d, "size": s}
             for d, s in zip(digests, sizes, strict=True)]
    raw = json.dumps({"schemaVersion": 2,
                      "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                      "config": {**descs[0],
                                 "mediaType": "application/vnd.docker.container.image.v1+json"},
                      "layers": descs[1:]}).encode()
    if same:
        assert Manifest.decode(raw).size == sum(sizes)
    else:
        with pytest.raises(InvalidManifest, match="listed with sizes"):
            Manifest.decode(raw)
