"""Delta updates against the real docker-registry (no referrers API: the referrers tag
schema is what is exercised), bytes counted at the registry side by FaultProxy
(spec/delta.md).

A publisher store pushes version 1 and version 2 of a model (with their chunk indexes, as
``blobctl push`` does by default); a client store pulls v1 through the proxy, then v2:
the v2 pull must transfer only what changed, and the blob must be exactly v2's."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from blobstore.name import ModelName
from blobstore.store import Store
from registry_client.pull import PullOptions, PullResult, estimate, pull
from registry_client.push import PushOptions, push
from tests.blobstore.archutil import add_model
from tests.faultproxy import FaultProxy
from tests.registry_client.deltamodels import MiB, gguf_like
from tests.servers import DockerRegistry

PULL = PullOptions(insecure=True, connections=8, auto_gc=False)
N, TSIZE = 40, 1 * MiB   # 40 MiB model layer


def publish(registry: DockerRegistry, pub: Store, repo: str, tag: str, layer: bytes,
            **push_kw: object) -> None:
    ref = f"example.com/pub/{repo.replace('/', '-')}:{tag}"
    add_model(pub, ref, [layer, b"{{ .Prompt }} template"])
    push(ref, f"{registry.netloc}/{repo}:{tag}", store=pub,
         options=PushOptions(insecure=True, **push_kw))  # type: ignore[arg-type]


def pull_counted(px: FaultProxy, ref: str, st: Store,
                 opts: PullOptions = PULL) -> tuple[PullResult, int]:
    mark = px.mark()
    r = pull(ref, store=st, options=opts)
    px.wait_idle()
    return r, px.blob_bytes_sent(since=mark)


def layer_of(st: Store, ref: str) -> bytes:
    m = st.get_manifest(ModelName.parse(ref))
    layer = m.model_layer()
    assert layer is not None
    data = st.blob_path(layer.digest).read_bytes()
    assert hashlib.sha256(data).hexdigest() == layer.digest.hex
    return data


@pytest.fixture
def pub(tmp_path: Path) -> Store:
    return Store(tmp_path / "pub")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("scenario", ["header", "tensors", "unrelated"])
def test_update_transfers_only_what_changed(registry: DockerRegistry, proxy: FaultProxy,
                                            pub: Store, tmp_path: Path, scenario: str) -> None:
    repo = f"delta/{scenario}"
    v1 = gguf_like(seed=1, n_tensors=N, tensor_size=TSIZE)
    if scenario == "header":     # a fixed chat template: 7 more bytes, every tensor shifted
        v2 = gguf_like(seed=1, n_tensors=N, tensor_size=TSIZE, template="{{ .Prompt }}\n<eos>")
        bound = 0.02
    elif scenario == "tensors":  # 5 % of the tensors re-quantized
        v2 = gguf_like(seed=1, n_tensors=N, tensor_size=TSIZE, changed={7: 99, 31: 98})
        bound = 0.07
    else:
        v2 = gguf_like(seed=2, n_tensors=N, tensor_size=TSIZE)
        bound = 1.0
    assert len(v2) != len(v1) or scenario != "header"
    publish(registry, pub, repo, "v1", v1)
    publish(registry, pub, repo, "v2", v2)
    st = Store(tmp_path / "client")
    pull(f"{proxy.netloc}/{repo}:v1", store=st, options=PULL)
    est = estimate(f"{proxy.netloc}/{repo}:v2", store=st, options=PULL)
    r, sent = pull_counted(proxy, f"{proxy.netloc}/{repo}:v2", st)
    assert layer_of(st, f"{proxy.netloc}/{repo}:v2") == v2
    share = sent / len(v2)
    print(f"{scenario}: registry sent {sent} bytes = {100 * share:.2f}% of the layer; "
          f"reused {r.bytes_reused}")
    if scenario == "unrelated":
        assert r.delta_blobs == 0 and r.bytes_reused == 0 and est.bytes_reused == 0
        assert sent >= len(v2)
    else:
        assert r.delta_blobs == 1 and share <= bound
        assert r.bytes_reused + r.bytes_fetched >= len(v2)
        assert r.bytes_reused >= len(v2) * (1 - bound)
        # the dry run's decision is the pull's decision
        assert est.delta_blobs == 1 and est.bytes_reused == r.bytes_reused
    # the other tag is untouched and both verify
    assert layer_of(st, f"{proxy.netloc}/{repo}:v1") == v1


@pytest.mark.timeout(180)
def test_base_option_reuses_another_model(registry: DockerRegistry, proxy: FaultProxy,
                                          pub: Store, tmp_path: Path) -> None:
    """A model of another repository named with ``base`` serves as the old version."""
    v1 = gguf_like(seed=5, n_tensors=16, tensor_size=TSIZE)
    v2 = gguf_like(seed=5, n_tensors=16, tensor_size=TSIZE, template="{{ .System }}")
    publish(registry, pub, "delta/basea", "v1", v1)
    publish(registry, pub, "delta/baseb", "v1", v2)
    st = Store(tmp_path / "client")
    pull(f"{proxy.netloc}/delta/basea:v1", store=st, options=PULL)
    r, sent = pull_counted(proxy, f"{proxy.netloc}/delta/baseb:v1", st)
    assert r.delta_blobs == 0 and sent >= len(v2)  # another repository: not a version of it
    st2 = Store(tmp_path / "client2")
    pull(f"{proxy.netloc}/delta/basea:v1", store=st2, options=PULL)
    opts = PullOptions(insecure=True, connections=8, auto_gc=False,
                       base=(f"{proxy.netloc}/delta/basea:v1",))
    r, sent = pull_counted(proxy, f"{proxy.netloc}/delta/baseb:v1", st2, opts)
    assert r.delta_blobs == 1 and sent <= 0.02 * len(v2)
    assert layer_of(st2, f"{proxy.netloc}/delta/baseb:v1") == v2


@pytest.mark.timeout(180)
def test_skopeo_and_the_registry_treat_the_index_as_an_ordinary_artifact(
        registry: DockerRegistry, pub: Store, tmp_path: Path) -> None:
    v1 = gguf_like(seed=3, n_tensors=12, tensor_size=TSIZE)
    add_model(pub, "example.com/pub/sk:v1", [v1])
    r = push("example.com/pub/sk:v1", f"{registry.netloc}/delta/sk:v1", store=pub,
             options=PushOptions(insecure=True))
    assert r.index_digest is not None and r.index_blobs == 1
    assert r.index_bytes <= 0.001 * len(v1)
    m = pub.get_manifest(ModelName.parse("example.com/pub/sk:v1"))
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                          f"docker://{registry.netloc}/delta/sk:v1"], capture_output=True,
                         timeout=60)
    assert raw.returncode == 0 and raw.stdout == m.raw
    # the referrers tag holds an image index listing the artifact
    tag = f"sha256-{m.digest.hex}"
    idx = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                          f"docker://{registry.netloc}/delta/sk:{tag}"], capture_output=True,
                         timeout=60)
    assert idx.returncode == 0 and str(r.index_digest).encode() in idx.stdout
    out = tmp_path / "lay"
    cp = subprocess.run(["skopeo", "copy", "--src-tls-verify=false",
                         f"docker://{registry.netloc}/delta/sk:v1", f"oci:{out}"],
                        capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    layer = m.model_layer()
    assert layer is not None
    assert (out / "blobs/sha256" / layer.digest.hex).read_bytes() == v1
    # the artifact itself copies like any other OCI manifest
    cp = subprocess.run(["skopeo", "copy", "--src-tls-verify=false",
                         f"docker://{registry.netloc}/delta/sk@{r.index_digest}",
                         f"oci:{tmp_path / 'art'}"], capture_output=True, text=True,
                        timeout=120)
    assert cp.returncode == 0, cp.stderr
    # a plain pull of the model (no older version) never asks for referrers
    st = Store(tmp_path / "plain")
    got = pull(f"{registry.netloc}/delta/sk:v1", store=st, options=PULL)
    assert got.delta_blobs == 0 and layer_of(st, f"{registry.netloc}/delta/sk:v1") == v1
    shutil.rmtree(out)


@pytest.mark.timeout(120)
def test_a_registry_with_the_referrers_api(pub: Store, tmp_path: Path) -> None:
    """On an OCI 1.1 registry the index is listed by its referrers API: no referrers tag
    is written, and the pull finds it there."""
    from tests.registry_client.oci11 import Oci11
    from tests.servers import running_asgi

    reg = Oci11()
    v1 = gguf_like(seed=41, n_tensors=10, tensor_size=TSIZE)
    v2 = gguf_like(seed=41, n_tensors=10, tensor_size=TSIZE, template="{{ .Prompt }}?")
    with running_asgi(reg.app()) as url:
        host = url.removeprefix("http://")
        for tag, data in (("v1", v1), ("v2", v2)):
            add_model(pub, f"example.com/pub/o11:{tag}", [data])
            r = push(f"example.com/pub/o11:{tag}", f"{host}/o11/m:{tag}", store=pub,
                     options=PushOptions(insecure=True))
            assert r.index_digest is not None
        assert not [t for (_, t) in reg.tags if t.startswith("sha256-")]
        st = Store(tmp_path / "client")
        pull(f"{host}/o11/m:v1", store=st, options=PULL)
        before = len(reg.requests)
        r2 = pull(f"{host}/o11/m:v2", store=st, options=PULL)
        asked = reg.requests[before:]
    assert r2.delta_blobs == 1 and r2.bytes_fetched <= 0.02 * len(v2)
    assert any("/referrers/" in x for x in asked)
    assert not any("/manifests/sha256-" in x for x in asked)  # no tag-schema fallback
    assert layer_of(st, f"{host}/o11/m:v2") == v2
