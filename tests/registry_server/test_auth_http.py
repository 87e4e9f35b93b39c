"""AuthPolicy in front of a small real ASGI registry (starlette under uvicorn), driven by
httpx and skopeo: every credential kind against every right and tier, the docker token
flow, the challenge's realm, live reload while serving.

The app below protects its routes exactly as the OCI routes do: each calls
``policy.authorize(request.headers, repository, action, tier)`` before it touches the
model, and answers ``decision.status`` with ``WWW-Authenticate: decision.challenge``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from blobstore.store import Store
from registry_server.auth import AuthPolicy, add_token, load_policy, remove_token, routes
from registry_server.auth.patterns import canonical_repository
from registry_server.context import Action, Decision, ServeOptions, ServerContext
from tests.servers import running_asgi

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


@dataclass
class Model:
    raw: bytes
    annotations: dict[str, str]
    blobs: dict[str, bytes]


def make_model(repo: str, tier: str | None) -> Model:
    config = json.dumps({"architecture": "amd64", "os": "linux", "repo": repo}).encode()
    layer = os.urandom(3000) + b"PROTECTED-" + repo.encode()
    ann = {"org.blobctl.tier": tier} if tier else {}
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                      "digest": sha(config), "size": len(config)},
           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                       "digest": sha(layer), "size": len(layer)}]}
    if ann:
        doc["annotations"] = ann
    return Model(json.dumps(doc).encode(), ann, {sha(config): config, sha(layer): layer})


# repository -> tier annotation; "team/tabled" gets professional from the [tiers] table
MODELS = {"library/lite": make_model("library/lite", None),
          "library/std": make_model("library/std", "standard"),
          "library/pro": make_model("library/pro", "professional"),
          "team/tabled": make_model("team/tabled", None),
          "hf.co/org/m": make_model("hf.co/org/m", None)}
MODEL_TIER = {"library/lite": 0, "library/std": 1, "library/pro": 2, "team/tabled": 2,
              "hf.co/org/m": 0}

# token -> (repositories it may read, may push, tier rank): written out by hand
TOKENS = {
    "reader_lite": (["library/*"], [], "lite"),
    "reader_std": (["library/*", "team/**"], [], "standard"),
    "reader_pro": (["**"], [], "professional"),
    "pusher_std": ([], ["library/*"], "standard"),
    "nobody": ([], [], "professional"),
}
CAN_READ = {"reader_lite": {"library/lite", "library/std", "library/pro"},
            "reader_std": {"library/lite", "library/std", "library/pro", "team/tabled"},
            "reader_pro": set(MODELS),
            "pusher_std": {"library/lite", "library/std", "library/pro"},
            "nobody": set()}
CAN_PUSH = {"pusher_std": {"library/lite", "library/std", "library/pro"}}
RANK = {"lite": 0, "standard": 1, "professional": 2}


def _deny(d: Decision) -> Response:
    code = "UNAUTHORIZED" if d.status == 401 else "DENIED"
    headers = {"WWW-Authenticate": d.challenge} if d.challenge else {}
    return JSONResponse({"errors": [{"code": code, "message": d.reason}]},
                        status_code=d.status, headers=headers)


def make_app(ctx: ServerContext) -> Starlette:
    policy = ctx.policy

    def model_of(request: Request) -> tuple[str, Model | None]:
        name = request.path_params["name"]
        return name, MODELS.get(canonical_repository(name))

    async def v2(request: Request) -> Response:
        d = policy.authorize(request.headers, None, Action.READ, None)
        return JSONResponse({}) if d.allowed else _deny(d)

    async def manifest(request: Request) -> Response:
        name, m = model_of(request)
        tier = policy.tier_of(name, m.annotations) if m else None
        if request.method == "PUT":
            d = policy.authorize(request.headers, name, Action.PUSH, tier)
            return Response(status_code=201) if d.allowed else _deny(d)
        d = policy.authorize(request.headers, name, Action.READ, tier)
        if not d.allowed:
            return _deny(d)
        if m is None:
            return JSONResponse({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status_code=404)
        return Response(m.raw, media_type=OCI_MANIFEST,
                        headers={"Docker-Content-Digest": sha(m.raw)})

    async def blob(request: Request) -> Response:
        name, m = model_of(request)
        d = policy.authorize(request.headers, name, Action.READ,
                             policy.tier_of(name, m.annotations) if m else None)
        if not d.allowed:
            return _deny(d)
        data = m.blobs.get(request.path_params["digest"]) if m else None
        if data is None:
            return JSONResponse({"errors": [{"code": "BLOB_UNKNOWN"}]}, status_code=404)
        return Response(data, media_type="application/octet-stream",
                        headers={"Docker-Content-Digest": request.path_params["digest"]})

    async def admin(request: Request) -> Response:
        name, m = model_of(request)
        d = policy.authorize(request.headers, name, Action.ADMIN,
                             policy.tier_of(name, m.annotations) if m else None)
        return JSONResponse({"pinned": name}) if d.allowed else _deny(d)

    return Starlette(routes=[
        Route("/v2/", v2),
        Route("/v2/{name:path}/manifests/{ref}", manifest, methods=["GET", "HEAD", "PUT"]),
        Route("/v2/{name:path}/blobs/{digest}", blob, methods=["GET", "HEAD"]),
        Route("/admin/pin/{name:path}", admin, methods=["POST"]),
        *routes(ctx),
    ])


@dataclass
class Server:
    url: str
    file: Path
    policy: AuthPolicy
    tokens: dict[str, str]


def serve(tmp: Path, anonymous: str = "") -> Iterator[Server]:
    f = tmp / "auth.toml"
    tokens = {name: add_token(f, name, read=r, push=p, tier=t)
              for name, (r, p, t) in TOKENS.items()}
    text = f.read_text() + '\n[tiers]\n"team/**" = "professional"\n' + anonymous
    f.write_text(text)
    policy = load_policy(f)
    ctx = ServerContext(Store(tmp / "store"), ServeOptions(auth_file=f), policy=policy)
    with running_asgi(make_app(ctx)) as url:
        yield Server(url, f, policy, tokens)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from serve(tmp_path_factory.mktemp("auth"))


@pytest.fixture(scope="module")
def anon_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from serve(tmp_path_factory.mktemp("anon"),
                     '[anonymous]\nread = ["library/*"]\ntier = "standard"\n')


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def parse_challenge(header: str) -> dict[str, str]:
    assert header.startswith("Bearer "), header
    return dict(re.findall(r'(\w+)="([^"]*)"', header))


def token_flow(c: httpx.Client, method: str, url: str, creds: str | None) -> httpx.Response:
    """What a docker-style client does: try, answer the Bearer challenge at its realm
    (Basic with the API token as password, or anonymously), try again with the token."""
    r = c.request(method, url)
    if r.status_code != 401:
        return r
    ch = parse_challenge(r.headers["www-authenticate"])
    params = {"service": ch["service"], **({"scope": ch["scope"]} if "scope" in ch else {})}
    t = c.get(ch["realm"], params=params,
              headers={"Authorization": basic("x", creds)} if creds else {})
    if t.status_code != 200:
        return t
    body = t.json()
    assert body["token"] == body["access_token"] and 0 < body["expires_in"] <= 3600
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", body["issued_at"])
    return c.request(method, url, headers={"Authorization": f"Bearer {body['token']}"})


def request(srv: Server, c: httpx.Client, kind: str, token: str, method: str,
            path: str) -> httpx.Response:
    url = srv.url + path
    secret = srv.tokens[token]
    if kind == "bearer":
        return c.request(method, url, headers={"Authorization": f"Bearer {secret}"})
    if kind == "basic":
        return c.request(method, url, headers={"Authorization": basic("anyone", secret)})
    if kind == "token-flow":
        return token_flow(c, method, url, secret)
    if kind == "none":
        return c.request(method, url)
    wrong = secret[:-4] + ("AAAA" if not secret.endswith("AAAA") else "BBBB")
    if kind == "wrong-bearer":
        return c.request(method, url, headers={"Authorization": f"Bearer {wrong}"})
    assert kind == "wrong-basic"
    return c.request(method, url, headers={"Authorization": basic("x", wrong)})


OPS = [("GET", "manifests/latest", Action.READ), ("HEAD", "manifests/latest", Action.READ),
       ("GET", "blob", Action.READ), ("PUT", "manifests/latest", Action.PUSH),
       ("POST", "admin", Action.ADMIN)]


def expected(token: str | None, repo: str, action: Action) -> int:
    if token is None:
        return 401
    allowed = CAN_PUSH.get(token, set()) if action is not Action.READ else CAN_READ[token]
    if repo not in allowed:
        return 403
    return 403 if MODEL_TIER[repo] > RANK[TOKENS[token][2]] else (
        201 if action is Action.PUSH else 200)


def path_for(repo: str, op: str) -> str:
    m = MODELS[repo]
    if op == "blob":
        return f"/v2/{repo}/blobs/{next(d for d, b in m.blobs.items() if b'PROTECTED' in b)}"
    if op == "admin":
        return f"/admin/pin/{repo}"
    return f"/v2/{repo}/{op}"


def assert_no_protected_bytes(r: httpx.Response) -> None:
    assert b"PROTECTED" not in r.content
    for m in MODELS.values():
        assert m.raw not in r.content or not r.content


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["bearer", "basic", "token-flow", "none", "wrong-bearer",
                                  "wrong-basic"])
def test_every_credential_kind_right_and_tier(server: Server, kind: str) -> None:
    checked = 0
    with httpx.Client(timeout=10) as c:
        for token in TOKENS:
            for repo, model in MODELS.items():
                for method, op, action in OPS:
                    r = request(server, c, kind, token, method, path_for(repo, op))
                    valid = kind in ("bearer", "basic", "token-flow")
                    want = expected(token if valid else None, repo, action)
                    assert r.status_code == want, (kind, token, repo, method, op, r.text)
                    if want in (401, 403):
                        assert_no_protected_bytes(r)
                    if want == 401 and kind != "token-flow":
                        ch = parse_challenge(r.headers["www-authenticate"])
                        assert ch["realm"] == f"{server.url}/token" and ch["service"] == "blobctl"
                        scope = "pull" if action is Action.READ else "pull,push"
                        assert ch["scope"] == f"repository:{repo}:{scope}"
                    if want == 200 and method == "GET" and op == "blob":
                        assert b"PROTECTED-" + repo.encode() in r.content
                    if want == 200 and method == "GET" and op.startswith("manifests"):
                        assert r.content == model.raw
                    checked += 1
            # /v2/: only credentials count
            r = request(server, c, kind, token, "GET", "/v2/")
            assert r.status_code == (200 if kind in ("bearer", "basic", "token-flow") else 401)
    assert checked == len(TOKENS) * len(MODELS) * len(OPS)


def test_token_endpoint_grants_only_what_the_token_has(server: Server) -> None:
    from registry_server.auth.signed import verify

    secret = server.policy._state.secret
    with httpx.Client(timeout=10) as c:
        r = c.get(f"{server.url}/token", params=[
            ("service", "blobctl"),
            ("scope", "repository:library/std:pull,push"),
            ("scope", "repository:team/tabled:pull repository:hf.co/org/m:*"),
            ("scope", "registry:catalog:*")],
            headers={"Authorization": basic("u", server.tokens["reader_std"])})
        assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
        tok = verify(secret, r.json()["token"])
        assert tok is not None and tok.subject == "reader_std"
        assert {(g.repository, g.actions) for g in tok.access} == {
            ("library/std", ("pull",)), ("team/tabled", ("pull",))}
        # Bearer with the API token works at /token too; bad credentials never fall back
        r = c.get(f"{server.url}/token",
                  headers={"Authorization": f"Bearer {server.tokens['pusher_std']}"},
                  params={"scope": "repository:library/lite:push"})
        tok = verify(secret, r.json()["token"])
        assert tok is not None and [(g.repository, g.actions) for g in tok.access] == [
            ("library/lite", ("push",))]
        for h in ({"Authorization": basic("x", "blobctl_nope")}, {"Authorization": "Digest x"},
                  {}):
            r = c.get(f"{server.url}/token", params={"scope": "repository:library/lite:pull"},
                      headers=h)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic ")
            assert "token" not in r.json()


def test_bearer_token_for_pull_is_asked_to_rescope_for_push(server: Server) -> None:
    with httpx.Client(timeout=10) as c:
        url = f"{server.url}/v2/library/lite/manifests/latest"
        auth = {"Authorization": basic("x", server.tokens["pusher_std"])}
        t = c.get(f"{server.url}/token", headers=auth,
                  params={"scope": "repository:library/lite:pull"}).json()["token"]
        assert c.get(url, headers={"Authorization": f"Bearer {t}"}).status_code == 200
        r = c.put(url, headers={"Authorization": f"Bearer {t}"})
        assert r.status_code == 401
        ch = parse_challenge(r.headers["www-authenticate"])
        assert ch["error"] == "insufficient_scope"
        assert ch["scope"] == "repository:library/lite:pull,push"
        assert token_flow(c, "PUT", url, server.tokens["pusher_std"]).status_code == 201
        # docker clients answer the insufficient_scope challenge with the new scope
        t2 = c.get(ch["realm"], headers=auth, params={"scope": ch["scope"]}).json()["token"]
        assert c.put(url, headers={"Authorization": f"Bearer {t2}"}).status_code == 201
        # a token for one repository does not open another
        other = f"{server.url}/v2/library/std/manifests/latest"
        r = c.get(other, headers={"Authorization": f"Bearer {t}"})
        assert r.status_code == 401 and b"PROTECTED" not in r.content


def test_tampered_and_foreign_bearer_tokens_are_401(server: Server) -> None:
    from registry_server.auth.signed import SignedToken, sign

    with httpx.Client(timeout=10) as c:
        url = f"{server.url}/v2/library/lite/manifests/latest"
        t = c.get(f"{server.url}/token", params={"scope": "repository:library/lite:pull"},
                  headers={"Authorization": basic("x", server.tokens["reader_pro"])}
                  ).json()["token"]
        assert c.get(url, headers={"Authorization": f"Bearer {t}"}).status_code == 200
        body, _, mac = t.rpartition(".")
        forged = sign(b"another secret, another server", SignedToken(
            "reader_pro", "", int(time.time()), int(time.time()) + 300))
        for bad in (body + "." + mac[::-1], body[:-2] + "." + mac, t + "x", forged,
                    t.replace("b1.", "b2.", 1)):
            r = c.get(url, headers={"Authorization": f"Bearer {bad}"})
            assert r.status_code == 401 and b"PROTECTED" not in r.content, bad


def test_realm_follows_the_host_header_only_when_it_is_plain(server: Server) -> None:
    with httpx.Client(timeout=10) as c:
        url = f"{server.url}/v2/library/lite/manifests/latest"
        r = c.get(url, headers={"Host": "registry.lan:5050"})
        assert parse_challenge(r.headers["www-authenticate"])["realm"] == \
            "http://registry.lan:5050/token"
        r = c.get(url, headers={"Host": "[::1]:5050"})
        assert parse_challenge(r.headers["www-authenticate"])["realm"] == "http://[::1]:5050/token"
        for evil in ('evil.com",service="x', "evil.com/path", "a b", "evil.com@x"):
            r = c.get(url, headers={"Host": evil})
            if r.status_code == 400:  # uvicorn/h11 refused the header itself
                continue
            header = r.headers["www-authenticate"]
            assert parse_challenge(header)["realm"] == "http://127.0.0.1/token", header
            assert header.count('"') == 6


def test_anonymous_rights_from_the_file(anon_server: Server) -> None:
    srv = anon_server
    with httpx.Client(timeout=10) as c:
        def get(path: str, **kw: object) -> httpx.Response:
            return c.get(srv.url + path, **kw)  # type: ignore[arg-type]

        assert get("/v2/library/lite/manifests/latest").content == MODELS["library/lite"].raw
        assert get("/v2/library/std/manifests/latest").status_code == 200  # anonymous tier
        for path in ("/v2/library/pro/manifests/latest", "/v2/team/tabled/manifests/latest",
                     "/v2/hf.co/org/m/manifests/latest", "/v2/"):
            r = get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer ")
            assert_no_protected_bytes(r)
        r = c.put(srv.url + "/v2/library/lite/manifests/latest")
        assert r.status_code == 401
        # the anonymous token flow: a token with the anonymous rights only
        assert token_flow(c, "GET", srv.url + "/v2/library/lite/manifests/latest",
                          None).status_code == 200
        assert token_flow(c, "GET", srv.url + "/v2/", None).status_code == 200
        r = token_flow(c, "GET", srv.url + "/v2/library/pro/manifests/latest", None)
        assert r.status_code == 401 and b"PROTECTED" not in r.content
        # with credentials the token's own rights count
        r = token_flow(c, "GET", srv.url + "/v2/library/pro/manifests/latest",
                       srv.tokens["reader_pro"])
        assert r.status_code == 200


def test_anonymous_token_request_without_anonymous_rights_is_401(server: Server) -> None:
    r = httpx.get(f"{server.url}/token", params={"scope": "repository:library/lite:pull"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == 'Basic realm="blobctl"'


@pytest.mark.timeout(60)
def test_live_reload_while_serving(tmp_path: Path) -> None:
    for srv in serve(tmp_path):
        url = f"{srv.url}/v2/library/lite/manifests/latest"
        with httpx.Client(timeout=10) as c:
            t0 = time.monotonic()
            new = add_token(srv.file, "late", read=["library/*"], push=[], tier="lite")
            while (r := c.get(url, headers={"Authorization": f"Bearer {new}"})).status_code != 200:
                assert r.status_code == 401 and time.monotonic() - t0 < 10
                time.sleep(0.02)
            picked_up = time.monotonic() - t0
            bearer = token_flow(c, "GET", url, new).request.headers["authorization"]
            assert c.get(url, headers={"Authorization": bearer}).status_code == 200
            t0 = time.monotonic()
            remove_token(srv.file, "late")
            while c.get(url, headers={"Authorization": f"Bearer {new}"}).status_code != 401:
                assert time.monotonic() - t0 < 10
                time.sleep(0.02)
            # the bearer tokens issued for it die with it
            r = c.get(url, headers={"Authorization": bearer})
            assert r.status_code == 401 and b"PROTECTED" not in r.content
            # re-adding the same name makes a new token: the old bearer stays dead
            add_token(srv.file, "late", read=["library/*"], push=[], tier="lite")
            time.sleep(1.2)
            assert c.get(url, headers={"Authorization": bearer}).status_code == 401
        assert picked_up < 5, picked_up
        print(f"new token accepted after {picked_up * 1000:.0f} ms")


def skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.timeout(180)
def test_skopeo_with_creds_through_the_token_flow(server: Server, tmp_path: Path) -> None:
    assert shutil.which("skopeo"), "skopeo is needed (.ci/run installs it)"
    netloc = server.url.removeprefix("http://")
    ref = f"docker://{netloc}/library/std:latest"
    p = skopeo("inspect", "--raw", "--tls-verify=false", "--creds",
               f"x:{server.tokens['reader_std']}", ref)
    assert p.returncode == 0, p.stderr
    assert p.stdout.encode() == MODELS["library/std"].raw
    out = tmp_path / "copy"
    p = skopeo("copy", "--src-tls-verify=false", "--src-creds",
               f"someone:{server.tokens['reader_std']}", ref, f"dir:{out}")
    assert p.returncode == 0, p.stderr
    for digest, data in MODELS["library/std"].blobs.items():
        assert (out / digest.removeprefix("sha256:")).read_bytes() == data
    for creds, why in ((["--creds", f"x:{server.tokens['reader_lite']}"], "under tier"),
                       (["--creds", "x:blobctl_wrong"], "wrong"),
                       ([], "none"),
                       (["--creds", f"x:{server.tokens['nobody']}"], "no right")):
        p = skopeo("inspect", "--raw", "--tls-verify=false", *creds, ref)
        assert p.returncode != 0, why
        assert re.search(r"denied|unauthorized|authentication required|401|403", p.stderr,
                         re.IGNORECASE), (why, p.stderr)
        assert "PROTECTED" not in p.stdout
