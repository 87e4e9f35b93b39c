"""Tags in manifest URLs (spec/serve.md, "Names"): OCI allows tags of up to 128
characters, the store's names (as Ollama's) hold at most 80. Found from outside: an
81-character tag was 400 TAG_INVALID "invalid model name 'registry.ollama.ai/library/x:
ttt…'", naming a repository nobody asked for. Now: a malformed tag is TAG_INVALID naming
the request's repository and why; a well-formed one the store cannot hold is simply not
here (404), refused with its reason when pushed, and served by a mirror from upstream
without being stored."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore import Store
from registry_server.context import ServerContext
from tests.registry_server.conftest import serving
from tests.registry_server.mirrorkit import new_mirror, registry
from tests.servers import OCI_MANIFEST, DockerRegistry, sha

__all__ = ["registry"]  # fixture

pytestmark = pytest.mark.timeout(120)

OCI_TAGS = st.from_regex(r"\A[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")
BAD_TAGS = st.one_of(
    st.from_regex(r"\A[A-Za-z0-9_][A-Za-z0-9_.-]{128,140}\Z"),   # too long for OCI
    st.from_regex(r"\A[.-][A-Za-z0-9_.-]{0,20}\Z")                # bad first character
    .filter(lambda t: t not in (".", "..")),  # (dot segments: the client drops them)
    st.from_regex(r"\A[A-Za-z0-9_]{1,5}[!+~@,][A-Za-z0-9]{0,5}\Z"))  # bad character


@pytest.fixture(scope="module")
def pushable(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Store, ServerContext]]:
    store = Store(tmp_path_factory.mktemp("tag-store"))
    with serving(store, push=True) as (url, ctx), httpx.Client(base_url=url) as c:
        cfg = b'{"architecture":"amd64","os":"linux"}'
        assert c.post("/v2/ns/t/blobs/uploads/", params={"digest": sha(cfg)},
                      content=cfg).status_code == 201
        yield url, store, ctx


def _manifest() -> bytes:
    cfg = b'{"architecture":"amd64","os":"linux"}'
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                  "digest": sha(cfg), "size": len(cfg)},
                       "layers": []}).encode()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(tag=st.one_of(OCI_TAGS, BAD_TAGS), method=st.sampled_from(["GET", "HEAD", "PUT",
                                                                   "DELETE"]))
def test_a_tag_is_judged_by_oci_grammar_and_the_stores_limit(
        pushable: tuple[str, Store, ServerContext], tag: str, method: str) -> None:
    url, _, _ = pushable
    oci = len(tag) <= 128 and tag[0] not in ".-" and all(
        ch.isascii() and (ch.isalnum() or ch in "_.-") for ch in tag)
    stored = oci and len(tag) <= 80
    with httpx.Client(base_url=url, timeout=30) as c:
        kw = ({"content": _manifest(), "headers": {"Content-Type": OCI_MANIFEST}}
              if method == "PUT" else {})
        r = c.request(method, f"/v2/ns/t/manifests/{tag}", **kw)  # type: ignore[arg-type]
        if method == "HEAD":
            expect = 400 if not oci else (404 if not stored else r.status_code)
            assert r.status_code == expect, (tag, r.status_code)
            return
        if not oci or (method == "PUT" and not stored):
            assert r.status_code == 400, (tag, r.status_code, r.text)
            err = r.json()["errors"][0]
            assert err["code"] == "TAG_INVALID"
            assert "ns/t" in err["message"] and "library/x" not in err["message"], err
            assert ("at most 80" in err["message"]) == oci, err
            return
        if method == "PUT":
            assert r.status_code == 201, r.text
        elif not stored:
            assert r.status_code == 404, (tag, r.status_code, r.text)
            assert r.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        else:
            assert r.status_code in (200, 202, 404), r.text


@pytest.mark.timeout(60)
def test_a_mirror_serves_a_tag_the_store_cannot_hold_without_storing_it(
        tmp_path: Path, registry: DockerRegistry) -> None:
    tag = "v" * 100
    layer = os.urandom(50_000)
    cfg = json.dumps({"model_format": "gguf", "t": tag}).encode()
    raw = registry.push("ns/longtag", tag, cfg, [("application/vnd.ollama.image.model",
                                                  layer)])
    store = Store(tmp_path / "store")
    with serving(store) as (url, ctx), httpx.Client(base_url=url, timeout=30) as c:
        mirror = new_mirror(store, registry.url)
        ctx.mirror = mirror
        r = c.get(f"/v2/ns/longtag/manifests/{tag}")
        assert r.status_code == 200, r.text
        assert r.content == raw and r.headers["Docker-Content-Digest"] == sha(raw)
        b = c.get(f"/v2/ns/longtag/blobs/{sha(layer)}")
        assert b.status_code == 200 and b.content == layer
        assert mirror.wait_idle(20)
        mirror.close(5)
    assert store.list_models() == []  # no name to store it by
