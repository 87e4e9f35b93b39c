"""A mirror with access control (``serve --upstream … --auth FILE``): a request the policy
refuses costs nothing (spec/serve.md, "What every OCI route does"). The upstream is a real
``docker-registry`` holding models whose manifests carry ``org.blobctl.tier``; hypothesis
picks the route (manifest GET/HEAD by tag or digest, blob GET/HEAD), the repository and
the caller (anonymous, a token below the model's tier, a token that does not exist), and
after each refused request the store must be exactly as before: no blob, manifest or
ingest written, no use recorded, no GC, no mirror fetch started (found from outside: a
`reader` refused 403 made the mirror pull the professional model, whose automatic GC then
evicted the other models)."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore import ModelName, Store
from registry_server.auth import AuthPolicy, add_token
from registry_server.context import ServerContext
from registry_server.mirror import UpstreamMirror
from tests.registry_server.conftest import add_model, serving
from tests.registry_server.mirrorkit import new_mirror, registry
from tests.servers import DockerRegistry, sha

__all__ = ["registry"]  # fixture

pytestmark = pytest.mark.timeout(120)

LAYER = "application/vnd.ollama.image.model"
REPOS = ("library/pro", "ns/pro")  # anonymous reads library/* only


@dataclass
class Upstream:
    raw: bytes
    config: bytes
    layer: bytes


def push_tiered(reg: DockerRegistry, repo: str, tier: str) -> Upstream:
    config = json.dumps({"model_format": "gguf", "repo": repo}).encode()
    layer = os.urandom(300_000)
    for b in (config, layer):
        reg.push_blob(repo, b)
    doc = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                      "digest": sha(config), "size": len(config)},
           "layers": [{"mediaType": LAYER, "digest": sha(layer), "size": len(layer)}],
           "annotations": {"org.blobctl.tier": tier}}
    raw = json.dumps(doc).encode()
    r = httpx.put(f"{reg.url}/v2/{repo}/manifests/v1", content=raw, timeout=30,
                  headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    assert r.status_code == 201, r.text
    return Upstream(raw, config, layer)


def auth_file(path: Path) -> dict[str, str]:
    path.write_text('[anonymous]\nread = ["library/*"]\npush = []\ntier = "lite"\n')
    return {"reader": add_token(path, "reader", read=["**"], push=[], tier="lite"),
            "pro": add_token(path, "pro", read=["**"], push=[], tier="professional")}


@dataclass
class Mirrored:
    url: str
    store: Store
    ctx: ServerContext
    mirror: UpstreamMirror
    models: dict[str, Upstream]
    tokens: dict[str, str]


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory: pytest.TempPathFactory,
             registry: DockerRegistry) -> Iterator[Mirrored]:
    root = tmp_path_factory.mktemp("mirror-auth")
    models = {repo: push_tiered(registry, repo, "professional") for repo in REPOS}
    tokens = auth_file(root / "auth.toml")
    store = Store(root / "store")
    add_model(store, "library/keep:latest", [os.urandom(200_000)])  # what a GC would evict
    store.set_config("max-size", "100KB")
    with serving(store, policy=AuthPolicy(root / "auth.toml")) as (url, ctx):
        mirror = new_mirror(store, registry.url)
        ctx.mirror = mirror
        yield Mirrored(url, store, ctx, mirror, models, tokens)
        mirror.close(5)


def snapshot(store: Store) -> tuple[dict[str, int], dict[str, object]]:
    """Every file of the store but the state database (with its size), and every model's
    state (pins, last use)."""
    files = {str(p.relative_to(store.root)): p.stat().st_size
             for p in sorted(store.root.rglob("*")) if p.is_file()
             and not p.name.startswith("state.db")}
    return files, {k: (v.pinned, v.last_used) for k, v in store.model_states().items()}


CALLERS = {
    "anonymous": {},
    "low tier": "reader",
    "wrong token": {"Authorization": "Bearer blobctl_" + "A" * 43},
    "wrong basic": {"Authorization": "Basic "
                    + base64.b64encode(b"x:blobctl_" + b"B" * 43).decode()},
}


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(repo=st.sampled_from(REPOS), caller=st.sampled_from(sorted(CALLERS)),
       method=st.sampled_from(["GET", "HEAD"]),
       what=st.sampled_from(["tag", "digest", "config blob", "layer blob"]))
def test_a_refused_request_costs_the_mirror_nothing(mirrored: Mirrored, repo: str,
                                                    caller: str, method: str,
                                                    what: str) -> None:
    m = mirrored
    up = m.models[repo]
    spec = CALLERS[caller]
    headers = ({"Authorization": f"Bearer {m.tokens[spec]}"} if isinstance(spec, str)
               else dict(spec))
    path = {"tag": f"/v2/{repo}/manifests/v1",
            "digest": f"/v2/{repo}/manifests/{sha(up.raw)}",
            "config blob": f"/v2/{repo}/blobs/{sha(up.config)}",
            "layer blob": f"/v2/{repo}/blobs/{sha(up.layer)}"}[what]
    before = snapshot(m.store)
    _, acts_before = m.mirror.activity.snapshot()
    r = httpx.request(method, m.url + path, headers=headers, timeout=30)
    # the manifest routes refuse (401 anonymous or bad credentials, 403 a known caller
    # below the tier); a blob no manifest of the repository references is unknown there
    assert r.status_code in ((401, 403) if "blob" not in what else (401, 403, 404)), \
        (r.status_code, r.text)
    assert up.raw not in r.content and up.config not in r.content
    assert m.mirror.wait_idle(20)
    assert snapshot(m.store) == before
    _, acts = m.mirror.activity.snapshot()
    assert [a.name for a in acts] == [a.name for a in acts_before], "a fetch was started"
    assert m.store.has_model(ModelName.parse("library/keep:latest"))


@pytest.mark.timeout(60)
def test_an_authorized_caller_still_gets_the_model_stored(tmp_path: Path,
                                                          registry: DockerRegistry) -> None:
    up = push_tiered(registry, "ns/allowed", "professional")
    tokens = auth_file(tmp_path / "auth.toml")
    store = Store(tmp_path / "store")
    with serving(store, policy=AuthPolicy(tmp_path / "auth.toml")) as (url, ctx):
        mirror = new_mirror(store, registry.url)
        ctx.mirror = mirror
        r = httpx.get(f"{url}/v2/ns/allowed/manifests/v1", timeout=30,
                      headers={"Authorization": f"Bearer {tokens['pro']}"})
        assert r.status_code == 200 and r.content == up.raw
        assert mirror.wait_idle(20)
        mirror.close(5)
    assert store.has_model(ModelName.parse("ns/allowed:v1"))
    assert store.blob_path(store.resolve(ModelName.parse("ns/allowed:v1"))
                           .manifest.layers[0].digest).read_bytes() == up.layer
