"""The read side of the OCI API, in process (uvicorn in a thread) over a real store."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore import ModelName, Store
from registry_server.context import TIERS, Action, Decision, OpenAccess
from tests.registry_server.conftest import add_model, serving
from tests.servers import OCI_MANIFEST, sha

pytestmark = pytest.mark.timeout(120)


def test_base_and_manifest_by_tag_and_digest(store: Store) -> None:
    raw = add_model(store, "library/tiny:1", [b"layer-one" * 100])
    with serving(store) as (url, _), httpx.Client(base_url=url) as c:
        r = c.get("/v2/")
        assert r.status_code == 200
        assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
        for ref in ("1", sha(raw)):
            r = c.get(f"/v2/library/tiny/manifests/{ref}")
            assert r.status_code == 200
            assert r.content == raw  # byte-exact
            assert r.headers["Content-Type"] == OCI_MANIFEST
            assert r.headers["Docker-Content-Digest"] == sha(raw)
            h = c.head(f"/v2/library/tiny/manifests/{ref}")
            assert h.status_code == 200 and h.content == b""
            assert int(h.headers["Content-Length"]) == len(raw)
            assert h.headers["Docker-Content-Digest"] == sha(raw)
        r = c.get("/v2/library/tiny/manifests/2")
        assert r.status_code == 404
        assert r.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        r = c.get(f"/v2/library/tiny/manifests/sha256:{'0' * 64}")
        assert r.status_code == 404


def test_manifest_get_records_a_use(store: Store) -> None:
    add_model(store, "ns/used:1", [b"x"])
    name = ModelName.parse("ns/used:1")
    before = store.model_states().get(name.key)
    assert before is None or before.last_used is None
    with serving(store) as (url, _):
        assert httpx.head(f"{url}/v2/ns/used/manifests/1").status_code == 200
        st_ = store.model_states().get(name.key)
        assert st_ is None or st_.last_used is None  # HEAD serves no manifest
        t0 = time.time()
        assert httpx.get(f"{url}/v2/ns/used/manifests/1").status_code == 200
    used = store.model_states()[name.key].last_used
    assert used is not None and used >= t0 - 1


def test_other_hosts_are_the_first_path_component(store: Store) -> None:
    a = add_model(store, "hf.co/Org/Repo:q4", [b"hf"])
    b = add_model(store, "127.0.0.1:5055/ns/repo:v1", [b"port"])
    with serving(store) as (url, _), httpx.Client(base_url=url) as c:
        assert c.get("/v2/hf.co/Org/Repo/manifests/q4").content == a
        assert c.get("/v2/hf.co/org/repo/manifests/q4").content == a  # case-insensitive
        assert c.get("/v2/127.0.0.1%3A5055/ns/repo/manifests/v1").content == b
        assert c.get("/v2/127.0.0.1:5055/ns/repo/manifests/v1").content == b
        assert c.get(f"/v2/hf.co/Org/Repo/blobs/{sha(b'hf')}").content == b"hf"
        cat = c.get("/v2/_catalog").json()["repositories"]
        assert cat == sorted(["127.0.0.1:5055/ns/repo", "hf.co/Org/Repo"])


def test_blob_whole_range_and_unsatisfiable(store: Store) -> None:
    data = os.urandom(3 << 20)
    add_model(store, "library/big:1", [data])
    d = sha(data)
    with serving(store) as (url, _), httpx.Client(base_url=url) as c:
        h = c.head(f"/v2/library/big/blobs/{d}")
        assert h.status_code == 200 and int(h.headers["Content-Length"]) == len(data)
        assert h.headers["Docker-Content-Digest"] == d
        r = c.get(f"/v2/library/big/blobs/{d}")
        assert r.status_code == 200 and r.content == data and not r.history
        for rng, (a, b) in (("bytes=5-1048580", (5, 1048580)), ("bytes=100-", (100, len(data) - 1)),
                            ("bytes=-10", (len(data) - 10, len(data) - 1)),
                            (f"bytes=0-{len(data) * 2}", (0, len(data) - 1))):
            r = c.get(f"/v2/library/big/blobs/{d}", headers={"Range": rng})
            assert r.status_code == 206, rng
            assert r.headers["Content-Range"] == f"bytes {a}-{b}/{len(data)}"
            assert r.content == data[a:b + 1]
        r = c.get(f"/v2/library/big/blobs/{d}", headers={"Range": f"bytes={len(data)}-"})
        assert r.status_code == 416
        assert r.headers["Content-Range"] == f"bytes */{len(data)}"
        r = c.get(f"/v2/library/big/blobs/sha256:{'1' * 64}")
        assert r.status_code == 404 and r.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
        for bad in ("sha256:zz", "md5:abc", "sha256:" + "A" * 64):
            r = c.get(f"/v2/library/big/blobs/{bad}")
            assert r.status_code == 400 and r.json()["errors"][0]["code"] == "DIGEST_INVALID"
        for bad in ("/v2/.hidden/x/manifests/1", "/v2/a/b/c/d/manifests/1",
                    "/v2/-x/y/manifests/1", "/v2/UP/ok/manifests/bad:tag"):
            r = c.get(bad)
            assert r.status_code in (400, 404), bad
            assert r.json()["errors"][0]["code"] in ("NAME_INVALID", "DIGEST_INVALID",
                                                     "TAG_INVALID", "NAME_UNKNOWN")


def test_ollama_client_path_head_then_get_no_redirect(store: Store) -> None:
    data = b"gguf" * 5000
    add_model(store, "library/llama:latest", [data], oci=False)
    with serving(store) as (url, _), httpx.Client(base_url=url, follow_redirects=False) as c:
        assert c.head(f"/v2/library/llama/blobs/{sha(data)}").status_code == 200
        r = c.get(f"/v2/library/llama/blobs/{sha(data)}")
        assert r.status_code == 200 and r.content == data


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(tags=st.sets(st.from_regex(r"[a-z0-9][a-z0-9._-]{0,8}", fullmatch=True),
                    min_size=1, max_size=12),
       n=st.integers(1, 5))
def test_tags_and_catalog_pagination(tmp_path_factory: pytest.TempPathFactory,
                                     tags: set[str], n: int) -> None:
    store = Store(tmp_path_factory.mktemp("st"))
    for t in tags:
        add_model(store, f"ns/paged:{t}", [b"p"])
        add_model(store, f"ns{t.replace('.', '_')}/m:1", [b"q"])
    with serving(store) as (url, _), httpx.Client(base_url=url) as c:
        for path, key, want in (
                ("/v2/ns/paged/tags/list", "tags", sorted(tags)),
                ("/v2/_catalog", "repositories",
                 sorted({"ns/paged", *(f"ns{t.replace('.', '_')}/m" for t in tags)}))):
            got: list[str] = []
            nxt: str | None = f"{path}?n={n}"
            while nxt:
                r = c.get(nxt)
                assert r.status_code == 200
                page = r.json()[key]
                assert len(page) <= n
                got += page
                link = r.headers.get("Link")
                nxt = link[1:link.index(">")] if link else None
            assert got == want
            assert c.get(path).json()[key] == want


def test_tags_of_unknown_repository(store: Store) -> None:
    with serving(store) as (url, _):
        r = httpx.get(f"{url}/v2/ns/none/tags/list")
        assert r.status_code == 404 and r.json()["errors"][0]["code"] == "NAME_UNKNOWN"


def test_referrers_index_and_artifact_type_filter(store: Store) -> None:
    subject = add_model(store, "ns/img:1", [b"image"])
    sig = add_model(store, "ns/img:sig", [b"signature"],
                    extra={"artifactType": "application/vnd.example.sig",
                           "subject": {"mediaType": OCI_MANIFEST, "digest": sha(subject),
                                       "size": len(subject)}})
    sbom = add_model(store, "ns/img:sbom", [b"sbom"],
                     extra={"artifactType": "application/spdx+json",
                            "annotations": {"k": "v"},
                            "subject": {"mediaType": OCI_MANIFEST, "digest": sha(subject),
                                        "size": len(subject)}})
    with serving(store) as (url, _), httpx.Client(base_url=url) as c:
        r = c.get(f"/v2/ns/img/referrers/{sha(subject)}")
        assert r.status_code == 200
        assert r.headers["Content-Type"] == "application/vnd.oci.image.index.v1+json"
        idx = r.json()
        assert idx["schemaVersion"] == 2
        got = {m["digest"]: m for m in idx["manifests"]}
        assert set(got) == {sha(sig), sha(sbom)}
        assert got[sha(sbom)]["artifactType"] == "application/spdx+json"
        assert got[sha(sbom)]["annotations"] == {"k": "v"}
        assert got[sha(sig)]["size"] == len(sig)
        r = c.get(f"/v2/ns/img/referrers/{sha(subject)}",
                  params={"artifactType": "application/vnd.example.sig"})
        assert [m["digest"] for m in r.json()["manifests"]] == [sha(sig)]
        assert r.headers["OCI-Filters-Applied"] == "artifactType"
        r = c.get(f"/v2/ns/img/referrers/{sha(b'nothing')}")
        assert r.status_code == 200 and r.json()["manifests"] == []


# ---------------------------------------------------------------------- access control
class TokenPolicy:
    """A small real policy for these tests: Bearer tokens with a tier and read patterns
    (prefixes). The production policy (``--auth``) is tested with its own room."""

    def __init__(self, tokens: dict[str, tuple[str, list[str]]]) -> None:
        self.tokens = tokens
        self.open = OpenAccess()

    def authorize(self, headers: Mapping[str, str], repository: str | None,
                  action: Action, tier: str | None) -> Decision:
        auth = headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            return Decision(401, challenge='Bearer realm="test"')
        hit = self.tokens.get(auth[7:])
        if hit is None:
            return Decision(401, challenge='Bearer realm="test"', reason="bad token")
        t_tier, prefixes = hit
        if action != Action.READ:
            return Decision(403, "t")
        if repository is not None and not any(repository.startswith(p) for p in prefixes):
            return Decision(403, "t")
        if tier is not None and TIERS.index(tier) > TIERS.index(t_tier):
            return Decision(403, "t", reason="above tier")
        return Decision(200, "t")

    def tier_of(self, repository: str, annotations: Mapping[str, str] | None) -> str:
        return self.open.tier_of(repository, annotations)

    def visible(self, headers: Mapping[str, str], repository: str) -> bool:
        return self.authorize(headers, repository, Action.READ, None).allowed


def test_refusals_carry_no_data(store: Store) -> None:
    secret_layer = b"PRO-SECRET-" * 50
    shared = b"SHARED-LAYER-" * 50
    pro = add_model(store, "team/pro:1", [secret_layer, shared],
                    extra={"annotations": {"org.blobctl.tier": "professional"}})
    lite = add_model(store, "team/lite:1", [shared])
    add_model(store, "other/x:1", [b"OTHER-LAYER" * 10])
    policy = TokenPolicy({"lite-tok": ("lite", ["team/"]), "pro-tok": ("professional", ["team/"])})
    urls = ["/v2/team/pro/manifests/1", f"/v2/team/pro/manifests/{sha(pro)}",
            f"/v2/team/pro/blobs/{sha(secret_layer)}", f"/v2/team/lite/blobs/{sha(secret_layer)}",
            f"/v2/other/x/blobs/{sha(b'OTHER-LAYER' * 10)}", "/v2/other/x/manifests/1"]
    with serving(store, policy=policy) as (url, _), httpx.Client(base_url=url) as c:
        for who in (None, "wrong", "lite-tok"):
            h = {"Authorization": f"Bearer {who}"} if who else {}
            for u in urls:
                for method in ("GET", "HEAD"):
                    r = c.request(method, u, headers=h)
                    assert r.status_code in (401, 403, 404), (who, u, r.status_code)
                    assert b"SECRET" not in r.content and b"OTHER" not in r.content
                    assert pro not in r.content
                    if r.status_code == 401:
                        assert r.headers["WWW-Authenticate"] == 'Bearer realm="test"'
                    if method == "GET" and r.status_code in (401, 403):
                        assert r.json()["errors"][0]["code"] in ("UNAUTHORIZED", "DENIED")
        # the shared layer is readable through the lite model, whose tier is lite
        lite_h = {"Authorization": "Bearer lite-tok"}
        assert c.get(f"/v2/team/lite/blobs/{sha(shared)}", headers=lite_h).content == shared
        assert c.get("/v2/team/lite/manifests/1", headers=lite_h).content == lite
        # a blob the repository does not reference is unknown there, even to the pro token
        pro_h = {"Authorization": "Bearer pro-tok"}
        r = c.get(f"/v2/team/lite/blobs/{sha(secret_layer)}", headers=pro_h)
        assert r.status_code == 404 and b"SECRET" not in r.content
        assert c.get(f"/v2/team/pro/blobs/{sha(secret_layer)}", headers=pro_h).content \
            == secret_layer
        assert c.get("/v2/team/pro/manifests/1", headers=pro_h).content == pro
        # the catalog lists only what the caller may see
        assert c.get("/v2/_catalog", headers=lite_h).json()["repositories"] == \
            ["team/lite", "team/pro"]
        assert c.get("/v2/_catalog").status_code == 401


def test_open_access_serves_unreferenced_blobs_for_dedup(store: Store) -> None:
    add_model(store, "a/one:1", [b"only-in-one"])
    add_model(store, "b/two:1", [b"two"])
    with serving(store) as (url, _):
        r = httpx.get(f"{url}/v2/b/two/blobs/{sha(b'only-in-one')}")
        assert r.status_code == 200 and r.content == b"only-in-one"


def test_metrics_counts_requests_and_bytes(store: Store) -> None:
    data = b"m" * 10000
    add_model(store, "ns/m:1", [data])
    # (GET 200 also counts the /metrics polls themselves: not compared)
    want = {'blobctl_http_requests_total{method="GET",status="206"}': "1",
            'blobctl_http_requests_total{method="GET",status="404"}': "1",
            "blobctl_bytes_served_total": "10100", "blobctl_active_streams": "0"}
    with serving(store) as (url, _), httpx.Client(base_url=url) as c:
        c.get(f"/v2/ns/m/blobs/{sha(data)}")
        c.get(f"/v2/ns/m/blobs/{sha(data)}", headers={"Range": "bytes=0-99"})
        c.get("/v2/ns/m/manifests/nope")
        # a request is counted when its handler returns, a moment after the client has
        # the response: poll
        deadline = time.monotonic() + 10
        while True:
            text = c.get("/metrics").text
            lines = dict(line.rsplit(" ", 1) for line in text.splitlines()
                         if not line.startswith("#"))
            got = {k: lines.get(k) for k in want}
            if got == want or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert got == want
    assert int(lines['blobctl_http_requests_total{method="GET",status="200"}']) >= 1
