"""`blobctl serve` answers the referrers API with a chunk index it builds on demand
(spec/serve.md, "Chunk indexes"; spec/delta.md, "Storage and discovery").

The server's store holds two versions of a GGUF-like model (tens of MB, made as the
delta tests make them); a client store holding the old one pulls the new one from serve
and must transfer only a small share of it, counted at the server (``/metrics``
``blobctl_bytes_served_total``)."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import httpx
import pytest

from blobstore import Digest, ModelName, Store
from registry_client.delta import ARTIFACT_TYPE, MEDIA_TYPE, ChunkIndex, chunk_bytes
from registry_client.pull import PullOptions, pull
from tests.registry_client.deltamodels import MiB, gguf_like
from tests.registry_server.conftest import add_model, serving, start_serve

PULL = PullOptions(insecure=True, connections=8, auto_gc=False)
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
TEMPLATE = b"{{ .Prompt }} template"


def counter(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(f"blobctl_{name}_total "):
            return float(line.split()[1])
    return 0.0


def referrers(url: str, repo: str, digest: str, artifact_type: str | None = None
              ) -> httpx.Response:
    params = {"artifactType": artifact_type} if artifact_type else None
    r = httpx.get(f"{url}/v2/{repo}/referrers/{digest}", params=params, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(OCI_INDEX)
    return r


def layer_of(st: Store, ref: str) -> bytes:
    m = st.get_manifest(ModelName.parse(ref))
    layer = m.model_layer()
    assert layer is not None
    data = st.blob_path(layer.digest).read_bytes()
    assert hashlib.sha256(data).hexdigest() == layer.digest.hex
    return data


def model_digest(raw: bytes) -> str:
    return "sha256:" + hashlib.sha256(raw).hexdigest()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("scenario", ["shifted", "changed"])
def test_pull_from_serve_fetches_only_what_changed(tmp_path: Path, scenario: str) -> None:
    n, tsize = 40, MiB  # a 40 MiB model layer
    v1 = gguf_like(seed=7, n_tensors=n, tensor_size=tsize)
    v2 = (gguf_like(seed=7, n_tensors=n, tensor_size=tsize, template="{{ .Prompt }}!!")
          if scenario == "shifted" else
          gguf_like(seed=7, n_tensors=n, tensor_size=tsize, changed={3: 99, 17: 98}))
    srv = Store(tmp_path / "srv")
    add_model(srv, "library/m:v1", [v1, TEMPLATE])
    raw2 = add_model(srv, "library/m:v2", [v2, TEMPLATE])
    sp = start_serve(srv.root, log_dir=tmp_path / "logs")
    try:
        client = Store(tmp_path / "client")
        pull(f"{sp.netloc}/library/m:v1", store=client, options=PULL)
        before = counter(sp.url, "bytes_served")
        t0 = time.monotonic()
        r = pull(f"{sp.netloc}/library/m:v2", store=client, options=PULL)
        took = time.monotonic() - t0
        sent = counter(sp.url, "bytes_served") - before
        assert layer_of(client, f"{sp.netloc}/library/m:v2") == v2
        assert r.delta_blobs == 1, r
        bound = 0.03 if scenario == "shifted" else 0.10
        assert sent <= bound * len(v2), (sent, len(v2))
        assert counter(sp.url, "index_builds") == 1
        build_s = counter(sp.url, "index_build_seconds")
        print(f"\n{scenario}: served {sent:.0f} of {len(v2)} bytes "
              f"({100 * sent / len(v2):.2f} %), pull {took:.2f} s, server index build "
              f"{build_s:.3f} s for {counter(sp.url, 'index_build_bytes'):.0f} bytes")
        # the referrers answer holds the built artifact; asking again does not rebuild
        doc = referrers(sp.url, "library/m", model_digest(raw2)).json()
        assert [e["artifactType"] for e in doc["manifests"]] == [ARTIFACT_TYPE]
        referrers(sp.url, "library/m", model_digest(raw2))
        assert counter(sp.url, "index_builds") == 1
    finally:
        assert sp.stop() == 0


@pytest.mark.timeout(120)
def test_artifact_filter_routes_and_lifetime(tmp_path: Path) -> None:
    st = Store(tmp_path / "srv")
    big = gguf_like(seed=3, n_tensors=12, tensor_size=MiB)
    raw = add_model(st, "library/m:v2", [big, TEMPLATE])
    add_model(st, "library/other:v1", [b"another model"])
    small = add_model(st, "library/small:v1", [b"x" * (1 << 20)])
    digest = model_digest(raw)
    with serving(st) as (url, _ctx):
        # a filter for another type: nothing built, header set
        r = referrers(url, "library/m", digest, "application/example")
        assert r.json()["manifests"] == [] and r.headers["oci-filters-applied"] == "artifactType"
        assert counter(url, "index_builds") == 0
        r = referrers(url, "library/m", digest, ARTIFACT_TYPE)
        assert r.headers["oci-filters-applied"] == "artifactType"
        (entry,) = r.json()["manifests"]
        assert entry["artifactType"] == ARTIFACT_TYPE and counter(url, "index_builds") == 1
        unfiltered = referrers(url, "library/m", digest)
        assert "oci-filters-applied" not in unfiltered.headers
        assert unfiltered.json()["manifests"] == [entry]
        # the artifact manifest and its blobs, by digest, through the ordinary routes
        m = httpx.get(f"{url}/v2/library/m/manifests/{entry['digest']}", timeout=10)
        assert m.status_code == 200 and model_digest(m.content) == entry["digest"]
        assert m.headers["docker-content-digest"] == entry["digest"]
        assert len(m.content) == entry["size"]
        art = m.json()
        assert art["subject"]["digest"] == digest and art["artifactType"] == ARTIFACT_TYPE
        cfg = httpx.get(f"{url}/v2/library/m/blobs/{art['config']['digest']}", timeout=10)
        assert cfg.status_code == 200 and cfg.content == b"{}"
        (layer,) = art["layers"]
        assert layer["mediaType"] == MEDIA_TYPE
        blob = Digest.parse(layer["annotations"]["org.blobctl.chunk-index.blob"])
        b = httpx.get(f"{url}/v2/library/m/blobs/{layer['digest']}", timeout=10)
        assert b.status_code == 200 and model_digest(b.content) == layer["digest"]
        idx = ChunkIndex.decode(b.content, blob=blob, size=len(big))
        assert idx == chunk_bytes(big, blob)
        part = httpx.get(f"{url}/v2/library/m/blobs/{layer['digest']}",
                         headers={"Range": "bytes=0-9"}, timeout=10)
        assert part.status_code == 206 and part.content == b.content[:10]
        # not under another repository
        for path in (f"manifests/{entry['digest']}", f"blobs/{layer['digest']}"):
            assert httpx.get(f"{url}/v2/library/other/{path}", timeout=10).status_code == 404
        # the referrers tag schema's tag is an ordinary (missing) tag here
        tag = httpx.get(f"{url}/v2/library/m/manifests/sha256-{digest[7:]}", timeout=10)
        assert tag.status_code == 404 and tag.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        # a model without a large layer has no index
        assert referrers(url, "library/small", model_digest(small)).json()["manifests"] == []
        # nothing was written as a model or a blob
        assert sorted(str(e.name) for e in st.list_models()) == sorted(
            str(ModelName.parse(n)) for n in ("library/m:v2", "library/other:v1",
                                              "library/small:v1"))
        assert not st.has_blob(Digest.parse(layer["digest"]))
    # a restarted server answers the same artifact from the index cache, no chunking
    with serving(st) as (url, _ctx):
        m2 = httpx.get(f"{url}/v2/library/m/manifests/{entry['digest']}", timeout=10)
        assert m2.status_code == 200 and m2.content == m.content
        assert counter(url, "index_builds") == 0
        b2 = httpx.get(f"{url}/v2/library/m/blobs/{layer['digest']}", timeout=10)
        assert b2.content == b.content
        # gone with the model
        st.remove_model(ModelName.parse("library/m:v2"))
        assert httpx.get(f"{url}/v2/library/m/manifests/{entry['digest']}",
                         timeout=10).status_code == 404
        assert httpx.get(f"{url}/v2/library/m/blobs/{layer['digest']}",
                         timeout=10).status_code == 404


@pytest.mark.timeout(120)
def test_concurrent_first_requests_share_one_build(tmp_path: Path) -> None:
    """8 simultaneous first requests for a model's index: one build, the others join it
    (or, if it already finished, get the kept one). On a loaded machine the build can end
    before the others arrive, so rounds with new models go on until one round saw a join;
    no round may build more than once."""
    st = Store(tmp_path / "srv")
    with serving(st) as (url, _ctx):
        n, shared = 8, 0.0
        for rnd in range(4):
            raw = add_model(st, f"library/big{rnd}:v1",
                            [gguf_like(seed=5 + rnd, n_tensors=64, tensor_size=MiB), TEMPLATE])
            digest = model_digest(raw)
            gate = threading.Barrier(n)
            got: list[list[dict[str, object]]] = []

            def ask(gate: threading.Barrier, got: list[list[dict[str, object]]],
                    name: str, digest: str) -> None:
                gate.wait(10)
                got.append(referrers(url, name, digest).json()["manifests"])

            threads = [threading.Thread(target=ask, args=(gate, got, f"library/big{rnd}",
                                                          digest)) for _ in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert len(got) == n and all(g == got[0] for g in got) and len(got[0]) == 1
            assert counter(url, "index_builds") == rnd + 1  # one build per model, never two
            if counter(url, "index_builds_shared") > shared:
                break
            shared = counter(url, "index_builds_shared")
        assert counter(url, "index_builds_shared") >= 1, "no round had a request join a build"


@pytest.mark.timeout(120)
def test_a_failed_build_answers_without_it_and_is_tried_again(tmp_path: Path) -> None:
    st = Store(tmp_path / "srv")
    big = gguf_like(seed=9, n_tensors=10, tensor_size=MiB)
    raw = add_model(st, "library/m:v1", [big, TEMPLATE])
    blob = Digest.of_bytes(big)
    st.blob_path(blob).unlink()  # the layer is gone: chunking it fails
    with serving(st) as (url, _ctx):
        assert referrers(url, "library/m", model_digest(raw)).json()["manifests"] == []
        assert counter(url, "index_build_errors") == 1
        st.put_bytes(big)
        (entry,) = referrers(url, "library/m", model_digest(raw)).json()["manifests"]
        assert entry["artifactType"] == ARTIFACT_TYPE
        assert counter(url, "index_builds") == 2


@pytest.mark.timeout(120)
def test_the_artifact_has_the_models_access(tmp_path: Path) -> None:
    """Anonymous callers may read library/* up to tier lite; a professional model's index
    is neither built for them nor readable by them; a professional token gets it."""
    import base64

    from registry_server.auth import add_token, load_policy

    f = tmp_path / "auth.toml"
    token = add_token(f, "pro", read=["**"], push=[], tier="professional")
    f.write_text(f.read_text() + '\n[anonymous]\nread = ["library/*"]\ntier = "lite"\n')
    st = Store(tmp_path / "srv")
    raw = add_model(st, "library/pro:v1", [gguf_like(seed=2, n_tensors=10, tensor_size=MiB)],
                    extra={"annotations": {"org.blobctl.tier": "professional"}})
    digest = model_digest(raw)
    auth = {"Authorization": "Basic " + base64.b64encode(f"x:{token}".encode()).decode()}
    with serving(st, policy=load_policy(f)) as (url, _ctx):
        anon = httpx.get(f"{url}/v2/library/pro/referrers/{digest}", timeout=30)
        assert anon.status_code == 200 and anon.json()["manifests"] == []
        assert counter(url, "index_builds") == 0
        r = httpx.get(f"{url}/v2/library/pro/referrers/{digest}", headers=auth, timeout=30)
        (entry,) = r.json()["manifests"]
        art = httpx.get(f"{url}/v2/library/pro/manifests/{entry['digest']}", headers=auth,
                        timeout=10)
        assert art.status_code == 200
        layer = art.json()["layers"][0]["digest"]
        assert httpx.get(f"{url}/v2/library/pro/blobs/{layer}", headers=auth,
                         timeout=10).status_code == 200
        for path in (f"manifests/{entry['digest']}", f"blobs/{layer}"):
            got = httpx.get(f"{url}/v2/library/pro/{path}", timeout=10)
            assert got.status_code in (401, 403), (path, got.status_code)


@pytest.mark.timeout(180)
def test_an_index_pushed_to_serve_is_listed_and_nothing_is_built(tmp_path: Path) -> None:
    """``blobctl push`` to serve attaches its index: serve answers the artifact's PUT with
    ``OCI-Subject``, so no referrers tag is written, and its referrers API lists the pushed
    artifact instead of building one; a delta pull uses it."""
    from registry_client.push import PushOptions, push

    pub = Store(tmp_path / "pub")
    v1 = gguf_like(seed=4, n_tensors=20, tensor_size=MiB)
    v2 = gguf_like(seed=4, n_tensors=20, tensor_size=MiB, template="{{ .Prompt }}?")
    srv = Store(tmp_path / "srv")
    with serving(srv, push=True) as (url, _ctx):
        host = url.removeprefix("http://")
        pushed = {}
        for tag, data in (("v1", v1), ("v2", v2)):
            add_model(pub, f"example.com/pub/m:{tag}", [data, TEMPLATE])
            r = push(f"example.com/pub/m:{tag}", f"{host}/library/m:{tag}", store=pub,
                     options=PushOptions(insecure=True))
            assert r.index_digest is not None
            pushed[tag] = r.index_digest
        raw2 = srv.get_manifest(ModelName.parse("library/m:v2")).raw
        assert not [e for e in srv.list_models()
                    if e.name.tag == f"sha256-{model_digest(raw2)[7:]}"]  # no referrers tag
        (entry,) = referrers(url, "library/m", model_digest(raw2)).json()["manifests"]
        assert entry["digest"] == str(pushed["v2"])
        client = Store(tmp_path / "client")
        pull(f"{host}/library/m:v1", store=client, options=PULL)
        got = pull(f"{host}/library/m:v2", store=client, options=PULL)
        assert got.delta_blobs == 1 and got.bytes_fetched <= 0.03 * len(v2)
        assert layer_of(client, f"{host}/library/m:v2") == v2
        assert counter(url, "index_builds") == 0


# --------------------------------------------------------------------------- interleavings
_LAYERS = [gguf_like(seed=20 + i, n_tensors=9, tensor_size=MiB) for i in range(3)]
_MODELS = ["library/a:v1", "library/a:v2", "library/b:v1"]


@pytest.mark.timeout(600)
def test_interleavings_of_requests_removals_and_cache_drops(tmp_path_factory:
                                                            pytest.TempPathFactory) -> None:
    """Hypothesis picks a run of: batches of concurrent referrers requests, fetches of the
    artifact, removals and re-additions of models, drops of the index cache. Always: a
    present model's answer lists exactly one chunk index, the same artifact every time
    (digest stable across cache drops), fetchable and describing the model's layer; an
    absent model has none and its artifact is not served; each model is built once."""
    import shutil

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as hs

    op = hs.one_of(
        hs.tuples(hs.just("ask"), hs.integers(0, 2), hs.integers(1, 4)),
        hs.tuples(hs.just("fetch"), hs.integers(0, 2), hs.just(0)),
        hs.tuples(hs.just("remove"), hs.integers(0, 2), hs.just(0)),
        hs.tuples(hs.just("add"), hs.integers(0, 2), hs.just(0)),
        hs.tuples(hs.just("drop-cache"), hs.just(0), hs.just(0)),
    )

    @settings(max_examples=12, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow])
    @given(hs.lists(op, min_size=1, max_size=10))
    def run(ops: list[tuple[str, int, int]]) -> None:
        st = Store(tmp_path_factory.mktemp("ix") / "srv")
        raws = [add_model(st, name, [layer]) for name, layer in zip(_MODELS, _LAYERS,
                                                                     strict=True)]
        present = [True, True, True]
        artifact: dict[int, str] = {}
        asked: set[int] = set()
        with serving(st) as (url, _ctx), httpx.Client(timeout=60) as c:
            def answers(i: int, k: int) -> list[list[dict[str, object]]]:
                out: list[list[dict[str, object]]] = []
                repo = _MODELS[i].split(":")[0]

                def one() -> None:
                    r = c.get(f"{url}/v2/{repo}/referrers/{model_digest(raws[i])}")
                    assert r.status_code == 200
                    out.append(r.json()["manifests"])

                threads = [threading.Thread(target=one) for _ in range(k)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(60)
                assert len(out) == k
                return out

            for kind, i, k in ops:
                repo = _MODELS[i].split(":")[0]
                if kind == "ask":
                    got = answers(i, k)
                    if not present[i]:
                        assert all(g == [] for g in got)
                        continue
                    asked.add(i)
                    assert all(g == got[0] for g in got) and len(got[0]) == 1
                    digest = str(got[0][0]["digest"])
                    assert artifact.setdefault(i, digest) == digest
                elif kind == "fetch" and i in artifact:
                    m = c.get(f"{url}/v2/{repo}/manifests/{artifact[i]}")
                    if not present[i]:
                        assert m.status_code == 404
                        continue
                    assert m.status_code == 200 and model_digest(m.content) == artifact[i]
                    layer = m.json()["layers"][0]["digest"]
                    b = c.get(f"{url}/v2/{repo}/blobs/{layer}")
                    assert b.status_code == 200
                    ChunkIndex.decode(b.content, blob=Digest.of_bytes(_LAYERS[i]),
                                      size=len(_LAYERS[i]))
                elif kind == "remove" and present[i]:
                    st.remove_model(ModelName.parse(_MODELS[i]))
                    present[i] = False
                elif kind == "add" and not present[i]:
                    add_model(st, _MODELS[i], [_LAYERS[i]])
                    present[i] = True
                elif kind == "drop-cache":
                    shutil.rmtree(st.layout.state_dir / "delta", ignore_errors=True)
            assert counter(url, "index_builds") == len(asked)
            assert counter(url, "index_build_errors") == 0

    run()


@pytest.mark.timeout(240)
def test_blobctl_update_from_serve(tmp_path: Path) -> None:
    """The CLI end to end: a client store pulled ``m:latest`` from a real ``blobctl serve``;
    serve's ``latest`` becomes version 2 (header grown: every tensor shifted); ``blobctl
    update --dry-run`` predicts a delta, ``blobctl update`` fetches a small share (counted
    by serve) and the client's blob is version 2."""
    import json
    import subprocess
    import sys

    from tests.registry_server.conftest import ROOT, cli_env

    v1 = gguf_like(seed=8, n_tensors=40, tensor_size=MiB)
    v2 = gguf_like(seed=8, n_tensors=40, tensor_size=MiB, template="{{ .Prompt }} :)")
    srv = Store(tmp_path / "srv")
    add_model(srv, "library/m:latest", [v1, TEMPLATE])
    sp = start_serve(srv.root, log_dir=tmp_path / "logs")
    client = tmp_path / "client"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli", "--store", str(client), "--json",
                               *args], capture_output=True, text=True, env=cli_env(),
                              cwd=ROOT, timeout=180)

    try:
        ref = f"{sp.netloc}/library/m:latest"
        assert cli("pull", ref, "--insecure", "-q").returncode == 0
        add_model(srv, "library/m:latest", [v2, TEMPLATE])  # the new version, same tag
        dry = cli("update", ref, "--insecure", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "bytes_reused" in dry.stdout, dry.stdout
        before = counter(sp.url, "bytes_served")
        up = cli("update", ref, "--insecure", "-q")
        assert up.returncode == 0, up.stderr
        sent = counter(sp.url, "bytes_served") - before
        docs = [json.loads(line) for line in up.stdout.splitlines() if line.startswith("{")]
        summary = next(d for d in docs if "bytes_fetched" in d)
        assert summary["bytes_reused"] >= 0.95 * len(v2), summary
        assert summary["bytes_fetched"] <= 0.03 * len(v2) and sent <= 0.03 * len(v2), sent
        assert layer_of(Store(client), ref) == v2
        print(f"\nblobctl update: serve sent {sent:.0f} of {len(v2)} bytes "
              f"({100 * sent / len(v2):.2f} %)")
    finally:
        assert sp.stop() == 0


@pytest.mark.timeout(180)
@pytest.mark.skipif(__import__("shutil").which("skopeo") is None, reason="skopeo not installed")
def test_skopeo_copies_the_built_artifact(tmp_path: Path) -> None:
    """An independent client reads the built artifact like any OCI manifest: ``skopeo
    copy`` of it by digest from a real ``blobctl serve`` into an OCI layout fetches the
    manifest, the empty config and the index blob, and checks their digests."""
    import json
    import subprocess

    st = Store(tmp_path / "srv")
    big = gguf_like(seed=11, n_tensors=10, tensor_size=MiB)
    raw = add_model(st, "library/m:v1", [big, TEMPLATE])
    sp = start_serve(st.root, log_dir=tmp_path / "logs")
    try:
        (entry,) = referrers(sp.url, "library/m", model_digest(raw)).json()["manifests"]
        out = tmp_path / "oci"
        r = subprocess.run(["skopeo", "copy", "--src-tls-verify=false",
                            f"docker://{sp.netloc}/library/m@{entry['digest']}", f"oci:{out}"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        index = json.loads((out / "index.json").read_text())
        assert index["manifests"][0]["digest"] == entry["digest"]
        art = json.loads((out / "blobs/sha256" / entry["digest"][7:]).read_text())
        data = (out / "blobs/sha256" / art["layers"][0]["digest"][7:]).read_bytes()
        assert ChunkIndex.decode(data, blob=Digest.of_bytes(big), size=len(big)) == \
            chunk_bytes(big, Digest.of_bytes(big))
    finally:
        assert sp.stop() == 0


@pytest.mark.timeout(120)
def test_artifacts_dropped_from_memory_are_answered_from_the_cache(tmp_path: Path) -> None:
    """Past the memory cap the kept artifacts are dropped; answers stay the same (read
    back from the index cache) and nothing is chunked again."""
    from tests.registry_server.conftest import APPS

    st = Store(tmp_path / "srv")
    raws = [add_model(st, name, [layer]) for name, layer in zip(_MODELS, _LAYERS, strict=True)]
    with serving(st) as (url, ctx):
        APPS[id(ctx)].state.oci.indexes.MAX_KEPT_BYTES = 1  # every new one drops the rest
        first = {}
        for name, raw in zip(_MODELS, raws, strict=True):
            repo = name.split(":")[0]
            (entry,) = referrers(url, repo, model_digest(raw)).json()["manifests"]
            first[name] = entry["digest"]
        def cache_files() -> dict[str, int]:  # name -> inode (a rewrite is a new inode)
            return {p.name: p.stat().st_ino for p in (st.layout.state_dir / "delta").iterdir()}

        chunked = cache_files()
        for name, raw in zip(_MODELS, raws, strict=True):
            repo = name.split(":")[0]
            m = httpx.get(f"{url}/v2/{repo}/manifests/{first[name]}", timeout=10)
            assert m.status_code == 200 and model_digest(m.content) == first[name]
            (entry,) = referrers(url, repo, model_digest(raw)).json()["manifests"]
            assert entry["digest"] == first[name]
        assert len(chunked) == len(_MODELS) and cache_files() == chunked


@pytest.mark.timeout(240)
@pytest.mark.parametrize("with_auth", [False, True])
def test_an_index_pushed_after_serve_built_one_is_accepted(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           with_auth: bool) -> None:
    """Found from outside: once a client had asked serve's referrers API about a model (as
    every delta pull does), HEAD of the built artifact's empty config `{}` answered 200
    though the blob is not in blobs/; a publisher's push of its own index for that model
    then skipped the upload and the manifest PUT was refused MANIFEST_BLOB_UNKNOWN (exit 6
    with --index, a warning and no index without). The PUT now takes a blob the server
    built and answers for; with auth, at the model's own read access."""
    import base64
    import json

    from registry_client.push import PushOptions, push
    from registry_server.auth import add_token, load_policy

    policy = None
    headers: dict[str, str] = {}
    if with_auth:
        f = tmp_path / "auth.toml"
        token = add_token(f, "pub", read=["**"], push=["**"], tier="professional")
        policy = load_policy(f)
        headers = {"Authorization": "Basic " + base64.b64encode(f"x:{token}".encode()).decode()}
    pub = Store(tmp_path / "pub")
    add_model(pub, "example.com/pub/m:v1", [gguf_like(seed=5, n_tensors=12, tensor_size=MiB),
                                            TEMPLATE])
    srv = Store(tmp_path / "srv")
    empty = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    with serving(srv, push=True, policy=policy) as (url, _ctx):
        host = url.removeprefix("http://")
        if with_auth:
            cfg = tmp_path / "docker"
            cfg.mkdir()
            (cfg / "config.json").write_text(json.dumps(
                {"auths": {host: {"username": "x", "password": token}}}))
            monkeypatch.setenv("DOCKER_CONFIG", str(cfg))
        push("example.com/pub/m:v1", f"{host}/library/m:v1", store=pub,
             options=PushOptions(insecure=True, index=False))
        raw = srv.get_manifest(ModelName.parse("library/m:v1")).raw
        r = httpx.get(f"{url}/v2/library/m/referrers/{model_digest(raw)}", headers=headers,
                      timeout=60)
        (built,) = r.json()["manifests"]
        assert httpx.head(f"{url}/v2/library/m/blobs/{empty}", headers=headers,
                          timeout=10).status_code == 200
        assert not srv.has_blob(Digest.parse(empty))
        got = push("example.com/pub/m:v1", f"{host}/library/m:v1", store=pub,
                   options=PushOptions(insecure=True, index=True))
        assert got.index_digest is not None and str(got.index_digest) != built["digest"]
        assert srv.has_blob(Digest.parse(empty), 2)
        listed = httpx.get(f"{url}/v2/library/m/referrers/{model_digest(raw)}",
                           headers=headers, timeout=60).json()["manifests"]
        assert [e["digest"] for e in listed] == [str(got.index_digest)]
