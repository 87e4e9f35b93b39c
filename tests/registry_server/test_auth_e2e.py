"""Access control end to end: a real ``blobctl serve --auth FILE --push`` process, every
endpoint tried without, with wrong, with under-tier and with right credentials (httpx),
skopeo ``--creds x:TOKEN`` reading and pushing through the /token flow, ``blobctl pull``
with the token in ``~/.docker/config.json``, and ``blobctl token add|rm`` against the
running server."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

import registry_server.app  # noqa: F401 - the serve routes under test (fail, never skip)
from blobstore.manifest import Manifest
from blobstore.name import ModelName
from blobstore.store import Store
from registry_server.auth import add_token
from tests.cli.clirun import ROOT, run_proc

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


@dataclass
class Stored:
    repo: str
    tag: str
    raw: bytes
    digest: str
    layer: str
    layer_bytes: bytes


def put_model(store: Store, ref: str, *, oci: bool, tier: str | None) -> Stored:
    name = ModelName.parse(ref)
    layer = os.urandom(200_000) + b"PROTECTED-" + ref.encode()
    if oci:
        config = json.dumps({"architecture": "amd64", "os": "linux", "m": ref}).encode()
        mt, ct, lt = OCI_MANIFEST, "application/vnd.oci.image.config.v1+json", \
            "application/vnd.oci.image.layer.v1.tar"
    else:  # as Ollama writes one, plus top-level annotations
        config = json.dumps({"model_format": "gguf", "m": ref}).encode()
        mt, ct, lt = DOCKER_MANIFEST, "application/vnd.docker.container.image.v1+json", \
            "application/vnd.ollama.image.model"
    cd, ld = store.put_bytes(config), store.put_bytes(layer)
    doc: dict[str, object] = {
        "schemaVersion": 2, "mediaType": mt,
        "config": {"mediaType": ct, "digest": str(cd), "size": len(config)},
        "layers": [{"mediaType": lt, "digest": str(ld), "size": len(layer)}]}
    if tier:
        doc["annotations"] = {"org.blobctl.tier": tier}
    raw = json.dumps(doc).encode()
    m = Manifest.decode(raw)
    store.put_manifest(name, m)
    repo = name.repository if name.host == "registry.ollama.ai" else \
        f"{name.host}/{name.repository}"
    return Stored(repo, name.tag, raw, str(m.digest), str(ld), layer)


TOKENS = {"lite_all": (["**"], [], "lite"), "std_all": (["**"], [], "standard"),
          "pro_lib": (["library/*"], [], "professional"),
          "pusher": ([], ["team/**"], "lite")}


@dataclass
class Served:
    url: str
    netloc: str
    file: Path
    store: Path
    tokens: dict[str, str]
    models: dict[str, Stored]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("e2e")
    store = Store(root / "store")
    models = {"free": put_model(store, "library/free:latest", oci=True, tier=None),
              "std": put_model(store, "library/std:latest", oci=False, tier="standard"),
              "pro": put_model(store, "hf.co/org/pro:q4", oci=True, tier="professional")}
    f = root / "auth.toml"
    tokens = {n: add_token(f, n, read=r, push=p, tier=t) for n, (r, p, t) in TOKENS.items()}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--listen", "127.0.0.1:0",
                             "--auth", str(f), "--push", "--json", "--store", str(root / "store")],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                            cwd=ROOT, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        url = json.loads(line)["url"]
        yield Served(url, url.removeprefix("http://"), f, root / "store", tokens, models)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def creds(kind: str, srv: Served, token: str | None) -> dict[str, str]:
    if kind == "none":
        return {}
    if kind == "wrong":
        return {"Authorization": "Bearer blobctl_" + "x" * 43}
    if kind == "wrong-basic":
        return {"Authorization": "Basic " + base64.b64encode(b"x:blobctl_nope").decode()}
    assert token is not None
    if kind == "basic":
        raw = f"x:{srv.tokens[token]}".encode()
        return {"Authorization": "Basic " + base64.b64encode(raw).decode()}
    return {"Authorization": f"Bearer {srv.tokens[token]}"}


def endpoints(m: Stored) -> list[tuple[str, str, dict[str, str], bytes | None]]:
    """(method, path, extra headers, the protected bytes a 200 carries)."""
    base = f"/v2/{m.repo}"
    return [("GET", f"{base}/manifests/{m.tag}", {}, m.raw),
            ("HEAD", f"{base}/manifests/{m.tag}", {}, None),
            ("GET", f"{base}/manifests/{m.digest}", {}, m.raw),
            ("GET", f"{base}/blobs/{m.layer}", {}, m.layer_bytes),
            ("HEAD", f"{base}/blobs/{m.layer}", {}, None),
            ("GET", f"{base}/blobs/{m.layer}", {"Range": "bytes=100-199"}, m.layer_bytes[100:200])]


def assert_clean_refusal(r: httpx.Response, srv: Served) -> None:
    for m in srv.models.values():
        assert b"PROTECTED" not in r.content and m.raw not in r.content
        assert m.layer_bytes[:64] not in r.content
    if r.status_code == 401:
        ch = r.headers["www-authenticate"]
        assert ch.startswith(f'Bearer realm="{srv.url}/token",service="blobctl"'), ch


@pytest.mark.timeout(120)
def test_every_endpoint_without_wrong_under_tier_and_right_credentials(served: Served) -> None:
    srv = served
    # (model, token that is under its tier, token with the right)
    cases = {"free": (None, "lite_all"), "std": ("lite_all", "std_all"),
             "pro": ("std_all", None)}
    with httpx.Client(base_url=srv.url, timeout=20) as c:
        for key, (under, right) in cases.items():
            m = srv.models[key]
            for method, path, extra, body in endpoints(m):
                for kind in ("none", "wrong", "wrong-basic"):
                    r = c.request(method, path, headers={**extra, **creds(kind, srv, None)})
                    assert r.status_code == 401, (kind, method, path, r.status_code)
                    assert_clean_refusal(r, srv)
                if under is not None:
                    for kind in ("bearer", "basic"):
                        r = c.request(method, path, headers={**extra, **creds(kind, srv, under)})
                        assert r.status_code == 403, (under, method, path, r.status_code)
                        assert_clean_refusal(r, srv)
                if right is not None:
                    for kind in ("bearer", "basic"):
                        r = c.request(method, path, headers={**extra, **creds(kind, srv, right)})
                        assert r.status_code in (200, 206), (right, method, path, r.text)
                        if body is not None:
                            assert r.content == body
            # a right to other repositories only: 403 everywhere in this one
            outsider = "pusher" if key != "pro" else "pro_lib"
            for method, path, extra, _ in [*endpoints(m),
                                           ("GET", f"/v2/{m.repo}/tags/list", {}, None),
                                           ("GET", f"/v2/{m.repo}/referrers/{m.digest}", {},
                                            None)]:
                r = c.request(method, path, headers={**extra, **creds("bearer", srv, outsider)})
                assert r.status_code == 403, (outsider, method, path, r.status_code)
                assert_clean_refusal(r, srv)
        # listings: credentials needed; the catalog shows what the caller may read
        assert c.get("/v2/").status_code == 401
        assert c.get("/v2/", headers=creds("basic", srv, "pusher")).status_code == 200
        assert c.get("/v2/_catalog").status_code == 401
        got = c.get("/v2/_catalog", headers=creds("bearer", srv, "pro_lib")).json()
        assert sorted(got["repositories"]) == ["library/free", "library/std"]
        got = c.get("/v2/_catalog", headers=creds("bearer", srv, "lite_all")).json()
        assert sorted(got["repositories"]) == ["hf.co/org/pro", "library/free", "library/std"]
        # push endpoints: none 401, a reader 403, the pusher on its own pattern 202
        for kind, token, repo, want in (("none", None, "team/new", 401),
                                        ("bearer", "std_all", "team/new", 403),
                                        ("bearer", "pusher", "library/free", 403),
                                        ("basic", "pusher", "team/new", 202)):
            r = c.post(f"/v2/{repo}/blobs/uploads/", headers=creds(kind, srv, token))
            assert r.status_code == want, (kind, token, repo, r.text)
        r = c.delete(f"/v2/library/free/manifests/{srv.models['free'].digest}",
                     headers=creds("bearer", srv, "pro_lib"))
        assert r.status_code == 403
        r = c.put("/v2/library/free/manifests/x", content=srv.models["free"].raw,
                  headers={"Content-Type": OCI_MANIFEST})
        assert r.status_code == 401


def skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.timeout(240)
def test_skopeo_reads_and_pushes_with_creds(served: Served, tmp_path: Path) -> None:
    assert shutil.which("skopeo"), "skopeo is needed (.ci/run installs it)"
    srv = served
    std = f"docker://{srv.netloc}/library/std:latest"
    p = skopeo("inspect", "--raw", "--tls-verify=false", "--creds",
               f"x:{srv.tokens['std_all']}", std)
    assert p.returncode == 0, p.stderr
    assert p.stdout.encode() == srv.models["std"].raw
    for c in (f"x:{srv.tokens['lite_all']}", "x:blobctl_wrong", f"x:{srv.tokens['pusher']}"):
        p = skopeo("inspect", "--raw", "--tls-verify=false", "--creds", c, std)
        assert p.returncode != 0 and "PROTECTED" not in p.stdout
        assert re.search(r"denied|unauthorized|authentication required", p.stderr, re.I), p.stderr
    # read an OCI model out, push it into team/ with the pusher's token (token flow, push scope)
    free = f"docker://{srv.netloc}/library/free:latest"
    out = tmp_path / "free"
    p = skopeo("copy", "--src-tls-verify=false", "--src-creds",
               f"me:{srv.tokens['lite_all']}", free, f"dir:{out}")
    assert p.returncode == 0, p.stderr
    dest = f"docker://{srv.netloc}/team/copied:v1"
    p = skopeo("copy", "--dest-tls-verify=false", "--dest-creds",
               f"x:{srv.tokens['std_all']}", f"dir:{out}", dest)
    assert p.returncode != 0, "a reader must not push"
    p = skopeo("copy", "--preserve-digests", "--dest-tls-verify=false", "--dest-creds",
               f"x:{srv.tokens['pusher']}", f"dir:{out}", dest)
    assert p.returncode == 0, p.stderr
    p = skopeo("inspect", "--raw", "--tls-verify=false", "--creds",
               f"x:{srv.tokens['pusher']}", dest)
    assert p.returncode == 0 and p.stdout.encode() == srv.models["free"].raw
    listed = run_proc("list", "--json", "--store", str(srv.store))
    assert "registry.ollama.ai/team/copied:v1" in [e["name"] for e in listed.json()]


@pytest.mark.timeout(240)
def test_blobctl_pull_with_the_token_in_docker_config(served: Served, tmp_path: Path) -> None:
    srv = served
    ref = f"{srv.netloc}/library/std:latest"

    def pull(token: str) -> int:
        cfg = tmp_path / token
        cfg.mkdir()
        (cfg / "config.json").write_text(json.dumps(
            {"auths": {srv.netloc: {"username": "x", "password": srv.tokens[token]}}}))
        r = run_proc("pull", ref, "--insecure", "--retries", "0", "--store",
                     str(tmp_path / f"s-{token}"), env={"DOCKER_CONFIG": str(cfg)})
        return r.code

    assert pull("lite_all") == 7  # under tier: refused, nothing stored
    assert not (tmp_path / "s-lite_all" / "blobs").exists() or not any(
        p.name.endswith(srv.models["std"].layer.split(":")[1])
        for p in (tmp_path / "s-lite_all" / "blobs").iterdir())
    assert pull("std_all") == 0
    got = Store(tmp_path / "s-std_all").resolve(ModelName.parse(ref))
    assert got.manifest.raw == srv.models["std"].raw


@pytest.mark.timeout(120)
def test_token_add_and_rm_apply_to_the_running_server(served: Served) -> None:
    srv = served
    path = "/v2/library/free/manifests/latest"
    with httpx.Client(base_url=srv.url, timeout=20) as c:
        r = run_proc("token", "add", "late", "--auth", str(srv.file), "--read", "library/free")
        assert r.code == 0, r.err
        token = r.out.strip()
        t0 = time.monotonic()
        while c.get(path, headers={"Authorization": f"Bearer {token}"}).status_code != 200:
            assert time.monotonic() - t0 < 10, "token not picked up"
            time.sleep(0.05)
        assert run_proc("token", "rm", "late", "--auth", str(srv.file)).code == 0
        t0 = time.monotonic()
        while (r2 := c.get(path, headers={"Authorization": f"Bearer {token}"})).status_code != 401:
            assert time.monotonic() - t0 < 10, "removed token still accepted"
            time.sleep(0.05)
        assert_clean_refusal(r2, srv)
