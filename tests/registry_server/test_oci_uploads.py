"""Pushing into the server: upload sessions as state, searched with hypothesis (chunk
splits, out-of-order and duplicate PATCHes, several sessions for the same blob
interleaved), plus the monolithic, mount and manifest paths."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore import Digest, ModelName, Store
from registry_server.context import ServerContext
from registry_server.uploads import Uploads
from tests.registry_server.conftest import APPS, MODEL_LAYER, OCI_CONFIG, add_model, serving
from tests.servers import OCI_MANIFEST, make_manifest, sha

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def pushable(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Store, ServerContext]]:
    store = Store(tmp_path_factory.mktemp("push-store"))
    with serving(store, push=True) as (url, ctx):
        yield url, store, ctx


def leftovers(store: Store) -> list[str]:
    """Upload temp files and lease files still on disk."""
    ingest = [p.name for p in store.layout.ingest.glob("up-*")]
    leases = [p.name for p in store.layout.leases.glob("*.json")]
    return ingest + leases


@dataclass
class Sess:
    location: str
    data: bytes
    offset: int = 0
    chunks: list[tuple[int, int]] = field(default_factory=list)
    step: int = 0
    finished: bool = False


@st.composite
def upload_plans(draw: st.DrawFn) -> tuple[list[bytes], list[list[tuple[int, int]]],
                                           list[int], list[str], list[str]]:
    """Blobs (some identical), each split into chunks, an interleaving of the sessions'
    steps, a per-step fault and each session's ending."""
    n = draw(st.integers(1, 3))
    pool = [draw(st.binary(min_size=0, max_size=3000)) for _ in range(draw(st.integers(1, n)))]
    blobs = [pool[draw(st.integers(0, len(pool) - 1))] for _ in range(n)]
    splits: list[list[tuple[int, int]]] = []
    for b in blobs:
        cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(b) - 1)), max_size=4))))
        cuts = [c for c in cuts if 0 < c < len(b)]
        edges = [0, *cuts, len(b)]
        splits.append([(edges[i], edges[i + 1]) for i in range(len(edges) - 1)])
    order: list[int] = []
    for i, ch in enumerate(splits):
        order += [i] * len(ch)
    order = draw(st.permutations(order))
    faults = draw(st.lists(st.sampled_from(["none", "none", "dup", "ahead", "no-range",
                                            "status"]),
                           min_size=len(order), max_size=len(order)))
    endings = [draw(st.sampled_from(["put", "put-last-chunk", "wrong-digest", "delete"]))
               for _ in blobs]
    return blobs, splits, order, faults, endings


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(plan=upload_plans())
def test_upload_sessions_search(pushable: tuple[str, Store, ServerContext],
                                plan: tuple[list[bytes], list[list[tuple[int, int]]],
                                            list[int], list[str], list[str]]) -> None:
    url, store, _ = pushable
    blobs, splits, order, faults, endings = plan
    tag = os.urandom(6).hex()  # each example's blobs are new to the store
    blobs = [tag.encode() + b for b in blobs]
    splits = [[(0 if a == 0 else a + 12, b + 12) for a, b in ch] for ch in splits]
    for ch in splits:
        if ch:
            ch[0] = (0, ch[0][1])
        else:
            ch.append((0, 12))
    with httpx.Client(base_url=url, timeout=30) as c:
        sessions: list[Sess] = []
        for blob, ch in zip(blobs, splits, strict=True):
            r = c.post("/v2/ns/up/blobs/uploads/")
            assert r.status_code == 202
            assert r.headers["Range"] == "0-0" and r.headers["Docker-Upload-UUID"]
            sessions.append(Sess(r.headers["Location"], blob, chunks=list(ch)))
        for i, fault in zip(order, faults, strict=True):
            s = sessions[i]
            a, b = s.chunks[s.step]
            if s.step == len(s.chunks) - 1 and endings[i] == "put-last-chunk":
                continue  # this chunk goes with the PUT
            if fault == "dup" and s.step > 0:
                pa, pb = s.chunks[s.step - 1]
                r = c.patch(s.location, content=s.data[pa:pb],
                            headers={"Content-Range": f"{pa}-{pb - 1}"})
                assert r.status_code == 416
            if fault == "ahead" and s.step + 1 < len(s.chunks):
                na, nb = s.chunks[s.step + 1]
                r = c.patch(s.location, content=s.data[na:nb],
                            headers={"Content-Range": f"{na}-{nb - 1}"})
                assert r.status_code == 416
            if fault == "status":
                r = c.get(s.location)
                assert r.status_code == 204
                assert r.headers["Range"] == f"0-{max(0, s.offset - 1)}"
            headers = {} if fault == "no-range" or a == b else {"Content-Range": f"{a}-{b - 1}"}
            r = c.patch(s.location, content=s.data[a:b], headers=headers)
            assert r.status_code == 202, r.text
            s.offset = b
            s.step += 1
            assert r.headers["Range"] == f"0-{max(0, b - 1)}"
        committed: set[str] = set()
        for s, ending in zip(sessions, endings, strict=True):
            rest = s.data[s.offset:] if ending == "put-last-chunk" else b""
            if ending == "delete":
                assert c.delete(s.location).status_code == 204
                assert c.get(s.location).status_code == 404
                continue
            digest = sha(s.data) if ending != "wrong-digest" else sha(s.data + b"?")
            r = c.put(s.location, params={"digest": digest}, content=rest)
            if ending == "wrong-digest":
                assert r.status_code == 400
                assert r.json()["errors"][0]["code"] == "DIGEST_INVALID"
                assert not store.has_blob(Digest.parse(digest))
            else:
                assert r.status_code == 201, r.text
                assert r.headers["Docker-Content-Digest"] == sha(s.data)
                committed.add(sha(s.data))
            assert c.get(s.location).status_code == 404  # the session is over
        for s in sessions:
            d = Digest.parse(sha(s.data))
            if sha(s.data) in committed:
                assert store.blob_path(d).read_bytes() == s.data
            else:
                assert not store.has_blob(d)  # nothing visible without a verified commit
    assert leftovers(store) == []


@pytest.mark.timeout(120)
def test_concurrent_sessions_for_one_blob_and_racing_patches(
        pushable: tuple[str, Store, ServerContext]) -> None:
    url, store, _ = pushable
    data = os.urandom(3 << 20)
    results: list[int] = []
    lock = threading.Lock()

    def one() -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            loc = c.post("/v2/ns/race/blobs/uploads/").headers["Location"]
            step = 1 << 20
            for a in range(0, len(data), step):
                r = c.patch(loc, content=data[a:a + step],
                            headers={"Content-Range": f"{a}-{min(len(data), a + step) - 1}"})
                assert r.status_code == 202
            r = c.put(loc, params={"digest": sha(data)})
            with lock:
                results.append(r.status_code)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(100)
    assert results == [201] * 4
    assert store.blob_path(Digest.parse(sha(data))).read_bytes() == data
    # the same chunk sent 4 times at once to one session: exactly one lands
    with httpx.Client(base_url=url, timeout=60) as c:
        loc = c.post("/v2/ns/race/blobs/uploads/").headers["Location"]
    chunk = os.urandom(1 << 20)
    codes: list[int] = []

    def patch() -> None:
        r = httpx.patch(url + loc, content=chunk,
                        headers={"Content-Range": f"0-{len(chunk) - 1}"}, timeout=60)
        with lock:
            codes.append(r.status_code)

    threads = [threading.Thread(target=patch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(100)
    assert sorted(codes) == [202, 416, 416, 416]
    r = httpx.put(url + loc, params={"digest": sha(chunk)}, timeout=60)
    assert r.status_code == 201
    assert leftovers(store) == []


def test_monolithic_mount_and_manifest(pushable: tuple[str, Store, ServerContext]) -> None:
    url, store, _ = pushable
    cfg = b'{"os":"linux","architecture":"amd64","k":"' + os.urandom(4).hex().encode() + b'"}'
    layer = os.urandom(100_000)
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v2/ns/mono/blobs/uploads/", params={"digest": sha(cfg)}, content=cfg)
        assert r.status_code == 201 and r.headers["Docker-Content-Digest"] == sha(cfg)
        loc = c.post("/v2/ns/mono/blobs/uploads/").headers["Location"]
        r = c.put(loc, params={"digest": sha(layer)}, content=layer)
        assert r.status_code == 201
        raw = make_manifest(cfg, [(MODEL_LAYER, layer)], media_type=OCI_MANIFEST,
                            config_type=OCI_CONFIG)
        # a manifest naming a blob nobody uploaded is refused, nothing stored
        bad = make_manifest(cfg, [(MODEL_LAYER, b"never uploaded")], media_type=OCI_MANIFEST,
                            config_type=OCI_CONFIG)
        r = c.put("/v2/ns/mono/manifests/bad", content=bad,
                  headers={"Content-Type": OCI_MANIFEST})
        assert r.status_code == 400
        assert r.json()["errors"][0]["code"] == "MANIFEST_BLOB_UNKNOWN"
        assert not store.has_model(ModelName.parse("ns/mono:bad"))
        r = c.put("/v2/ns/mono/manifests/not-json", content=b"{nope",
                  headers={"Content-Type": OCI_MANIFEST})
        assert r.status_code == 400 and r.json()["errors"][0]["code"] == "MANIFEST_INVALID"
        r = c.put("/v2/ns/mono/manifests/v1", content=raw,
                  headers={"Content-Type": "application/vnd.docker.distribution.manifest.v2+json"})
        assert r.status_code == 400 and r.json()["errors"][0]["code"] == "MANIFEST_INVALID"
        r = c.put("/v2/ns/mono/manifests/v1", content=raw, headers={"Content-Type": OCI_MANIFEST})
        assert r.status_code == 201 and r.headers["Docker-Content-Digest"] == sha(raw)
        got = c.get("/v2/ns/mono/manifests/v1")
        assert got.content == raw and got.headers["Content-Type"] == OCI_MANIFEST
        assert store.get_manifest(ModelName.parse("ns/mono:v1")).raw == raw  # byte-exact
        # by digest: stored under the sha256-<hex> tag and found by digest
        r = c.put(f"/v2/ns/mono/manifests/{sha(raw)}", content=raw,
                  headers={"Content-Type": OCI_MANIFEST})
        assert r.status_code == 201
        r = c.put(f"/v2/ns/mono/manifests/{sha(b'other')}", content=raw,
                  headers={"Content-Type": OCI_MANIFEST})
        assert r.status_code == 400 and r.json()["errors"][0]["code"] == "DIGEST_INVALID"
        # mount into another repository: 201 when the blob is here, else a session (202)
        r = c.post("/v2/ns/other/blobs/uploads/", params={"mount": sha(layer), "from": "ns/mono"})
        assert r.status_code == 201 and r.headers["Docker-Content-Digest"] == sha(layer)
        r = c.post("/v2/ns/other/blobs/uploads/",
                   params={"mount": sha(b"absent"), "from": "ns/mono"})
        assert r.status_code == 202
        assert c.delete(r.headers["Location"]).status_code == 204
        # DELETE of a manifest by digest removes every tag holding it
        assert c.delete(f"/v2/ns/mono/manifests/{sha(raw)}").status_code == 202
        assert c.get("/v2/ns/mono/manifests/v1").status_code == 404
        assert c.delete(f"/v2/ns/mono/manifests/{sha(raw)}").status_code == 404
    assert leftovers(store) == []


def test_abandoned_sessions_are_reaped(pushable: tuple[str, Store, ServerContext]) -> None:
    url, store, ctx = pushable
    with httpx.Client(base_url=url, timeout=30) as c:
        loc = c.post("/v2/ns/idle/blobs/uploads/").headers["Location"]
        assert c.patch(loc, content=b"x" * 1000).status_code == 202
        assert list(store.layout.ingest.glob("up-*"))
        uploads = ctx_uploads(ctx)
        uploads.idle_timeout = 0.0
        try:
            loc2 = c.post("/v2/ns/idle/blobs/uploads/").headers["Location"]
        finally:
            uploads.idle_timeout = 3600.0
        assert c.get(loc).status_code == 404
        assert c.delete(loc2).status_code == 204
    assert leftovers(store) == []


def ctx_uploads(ctx: ServerContext) -> Uploads:
    """The upload sessions of the app serving ``ctx``."""
    uploads = APPS[id(ctx)].state.oci.uploads
    assert isinstance(uploads, Uploads)
    return uploads


def test_without_push_writes_are_refused(store: Store) -> None:
    raw = add_model(store, "ns/ro:1", [b"ro"])
    with serving(store) as (url, _), httpx.Client(base_url=url) as c:
        for method, path in (("POST", "/v2/ns/ro/blobs/uploads/"),
                             ("PATCH", "/v2/ns/ro/blobs/uploads/abc"),
                             ("PUT", "/v2/ns/ro/manifests/2"),
                             ("DELETE", "/v2/ns/ro/manifests/1")):
            r = c.request(method, path, content=raw)
            assert r.status_code == 405, (method, path)
            assert r.json()["errors"][0]["code"] == "UNSUPPORTED"
        assert c.get("/v2/ns/ro/manifests/1").content == raw


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(cut=st.integers(1, 199_999), size=st.integers(200_000, 600_000))
def test_a_patch_cut_mid_body_keeps_what_arrived(pushable: tuple[str, Store, ServerContext],
                                                 cut: int, size: int) -> None:
    """A client that dies mid-PATCH: the session holds a prefix of what it sent (its Range
    says how much) and the upload resumes from there to a verified commit."""
    url, store, _ = pushable
    data = os.urandom(size)
    with httpx.Client(base_url=url, timeout=30) as c:
        loc = c.post("/v2/ns/cut/blobs/uploads/").headers["Location"]
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as s:
            s.sendall(f"PATCH {loc} HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n"
                      f"Content-Range: 0-{size - 1}\r\n\r\n".encode() + data[:cut])
        # Resume as a client does: from the Range the server reports. The cut PATCH may
        # still be landing (a 416 then names the new Range); "0-0" means 0 or 1 byte.
        held, tries = 0, 0
        while True:
            r = c.patch(loc, content=data[held:], headers={"Content-Range": f"{held}-{size - 1}"})
            if r.status_code == 202:
                break
            assert r.status_code == 416, r.text
            last = int(r.headers["Range"].split("-")[1])
            # refused at 0 with "0-0": it holds exactly 1 byte
            held = last + 1 if last > 0 else (1 if held == 0 else 0)
            tries += 1
            assert tries < 50
            time.sleep(0.02)
        assert held <= cut
        r = c.put(loc, params={"digest": sha(data)})
        assert r.status_code == 201
    assert store.blob_path(Digest.parse(sha(data))).read_bytes() == data
    assert leftovers(store) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("pinned", [0, 1, 2])
def test_delete_by_digest_with_a_pinned_tag_removes_nothing(tmp_path: Path,
                                                           pinned: int) -> None:
    """Found from outside: three tags held one manifest, one of them pinned; DELETE by
    digest answered 409 after the tags before the pinned one were gone. All or nothing."""
    store = Store(tmp_path / "s")
    layer = os.urandom(3000)
    tags = ["a", "b", "c"]
    for t in tags:
        add_model(store, f"ns/pin:{t}", [layer], config=b'{"model_format":"gguf"}')
    digest = store.get_manifest(ModelName.parse("ns/pin:a")).digest
    store.set_pinned(ModelName.parse(f"ns/pin:{tags[pinned]}"), True)
    with serving(store, push=True) as (url, _), httpx.Client(base_url=url) as c:
        r = c.delete(f"/v2/ns/pin/manifests/{digest}")
        assert r.status_code == 409 and r.json()["errors"][0]["code"] == "DENIED"
    assert all(store.has_model(ModelName.parse(f"ns/pin:{t}")) for t in tags)


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(delta=st.integers(-5, 5).filter(bool), which=st.sampled_from(["config", "layer"]))
def test_a_manifest_giving_a_blob_another_size_is_refused(
        pushable: tuple[str, Store, ServerContext], delta: int, which: str) -> None:
    """Found by review: a manifest whose descriptor gave a blob another size than the
    stored one passed the route's check (present, size not asked) and put_manifest
    refused it as damaged, but the route read only the missing blobs and answered 201
    with nothing stored. Now 400 MANIFEST_BLOB_UNKNOWN naming it, nothing stored."""
    import json

    url, store, _ = pushable
    cfg = b'{"os":"linux","architecture":"amd64","k":"' + os.urandom(4).hex().encode() + b'"}'
    layer = os.urandom(5000)
    with httpx.Client(base_url=url, timeout=30) as c:
        for blob in (cfg, layer):
            r = c.post("/v2/ns/sized/blobs/uploads/", params={"digest": sha(blob)},
                       content=blob)
            assert r.status_code == 201
        doc = json.loads(make_manifest(cfg, [(MODEL_LAYER, layer)], media_type=OCI_MANIFEST,
                                       config_type=OCI_CONFIG))
        desc = doc["config"] if which == "config" else doc["layers"][0]
        desc["size"] += delta
        raw = json.dumps(doc).encode()
        r = c.put("/v2/ns/sized/manifests/t", content=raw,
                  headers={"Content-Type": OCI_MANIFEST})
        assert r.status_code == 400, r.text
        err = r.json()["errors"][0]
        assert err["code"] == "MANIFEST_BLOB_UNKNOWN" and desc["digest"] in str(err), err
        assert c.get("/v2/ns/sized/manifests/t").status_code == 404
    assert not store.has_model(ModelName.parse("ns/sized:t"))
