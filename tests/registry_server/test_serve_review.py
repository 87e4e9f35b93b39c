"""Regression tests for the review of ``blobctl serve`` (tier bypass by manifest PUT,
mirrored blobs under --auth, the mirrored manifest's tier, the auth file's secret, push of
an image index, upload session limits)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from blobstore import Digest, Store, StoreBusy
from registry_server.app import close_app, create_app
from registry_server.auth import add_token, load_policy
from registry_server.auth.authfile import AuthFileError
from registry_server.context import Action, ServeOptions, ServerContext
from registry_server.mirror import mirror_for
from registry_server.streams import StreamLeases
from tests.registry_server.conftest import APPS, ROOT, add_model, cli_env, serving, start_serve
from tests.servers import free_port, running_asgi

TIER = "org.blobctl.tier"


@pytest.mark.timeout(120)
def test_lite_pusher_cannot_lend_professional_layers_a_lite_manifest(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    layer = b"PROFESSIONAL-WEIGHTS" * 1000
    raw = add_model(store, "team/big:latest", [layer],
                    extra={"annotations": {TIER: "professional"}})
    doc = json.loads(raw)
    ld = doc["layers"][0]["digest"]
    auth = tmp_path / "auth.toml"
    tok = add_token(auth, "alice", read=[], push=["team/*"], tier="lite")
    with serving(store, push=True, policy=load_policy(auth)) as (url, _ctx):
        c = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {tok}"})
        assert c.get(f"/v2/team/big/blobs/{ld}").status_code == 403
        mine = dict(doc, annotations={TIER: "lite"})
        r = c.put("/v2/team/big/manifests/mine", content=json.dumps(mine).encode(),
                  headers={"Content-Type": doc["mediaType"]})
        assert r.status_code == 403, r.text
        assert r.json()["errors"][0]["code"] == "DENIED"
        r = c.get(f"/v2/team/big/blobs/{ld}")
        assert r.status_code == 403 and layer not in r.content
        assert c.get("/v2/team/big/manifests/mine").status_code == 404
        # a layer the caller pushes itself in this session is fine
        own = os.urandom(5000)
        od = "sha256:" + hashlib.sha256(own).hexdigest()
        r = c.post(f"/v2/team/big/blobs/uploads/?digest={od}", content=own)
        assert r.status_code == 201, r.text
        mine["layers"] = [dict(doc["layers"][0], digest=od, size=len(own))]
        cfg = doc["config"]["digest"]  # the config is referenced by a professional manifest
        r = c.put("/v2/team/big/manifests/mine", content=json.dumps(mine).encode(),
                  headers={"Content-Type": doc["mediaType"]})
        assert r.status_code == 403 and cfg in r.text
        # another caller's upload does not count as this one's
        tok2 = add_token(auth, "carol", read=[], push=["team/*"], tier="lite")
        c2 = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {tok2}"})
        _ctx_policy = _ctx.policy
        assert hasattr(_ctx_policy, "refresh")
        _ctx_policy.refresh()
        own_cfg = b'{"architecture":"amd64","os":"linux","mine":1}'
        ocd = "sha256:" + hashlib.sha256(own_cfg).hexdigest()
        assert c2.post(f"/v2/team/big/blobs/uploads/?digest={ocd}",
                       content=own_cfg).status_code == 201
        mine["config"] = dict(doc["config"], digest=ocd, size=len(own_cfg))
        r = c.put("/v2/team/big/manifests/mine", content=json.dumps(mine).encode(),
                  headers={"Content-Type": doc["mediaType"]})
        assert r.status_code == 400 and r.json()["errors"][0]["code"] == "MANIFEST_BLOB_UNKNOWN"
        r = c2.put("/v2/team/big/manifests/mine", content=json.dumps(mine).encode(),
                   headers={"Content-Type": doc["mediaType"]})
        assert r.status_code == 400  # the layer is alice's upload, not carol's
        assert c.post(f"/v2/team/big/blobs/uploads/?digest={ocd}",
                      content=own_cfg).status_code == 201
        r = c.put("/v2/team/big/manifests/mine", content=json.dumps(mine).encode(),
                  headers={"Content-Type": doc["mediaType"]})
        assert r.status_code == 201, r.text


@pytest.mark.timeout(120)
def test_tier_table_is_a_floor_the_annotation_cannot_lower(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    layer = os.urandom(4000)
    raw = add_model(store, "team/floor:latest", [layer], extra={"annotations": {TIER: "lite"}})
    ld = json.loads(raw)["layers"][0]["digest"]
    raw2 = add_model(store, "team/raised:latest", [os.urandom(4000)],
                     extra={"annotations": {TIER: "professional"}})
    ld2 = json.loads(raw2)["layers"][0]["digest"]
    auth = tmp_path / "auth.toml"
    tok = add_token(auth, "lee", read=["**"], push=[], tier="standard")
    auth.write_text(auth.read_text() + '\n[tiers]\n"team/floor" = "professional"\n'
                    '"team/**" = "standard"\n')
    policy = load_policy(auth)
    assert policy.tier_of("team/floor", {TIER: "lite"}) == "professional"
    assert policy.tier_of("team/other", {TIER: "lite"}) == "standard"
    assert policy.tier_of("team/other", {TIER: "professional"}) == "professional"
    with serving(store, policy=policy) as (url, _ctx):
        c = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {tok}"})
        assert c.get("/v2/team/floor/manifests/latest").status_code == 403
        assert c.get(f"/v2/team/floor/blobs/{ld}").status_code == 403
        assert c.get("/v2/team/raised/manifests/latest").status_code == 403
        assert c.get(f"/v2/team/raised/blobs/{ld2}").status_code == 403


@contextmanager
def mirrored_server(tmp_path: Path, up: Store, tier: str) -> Iterator[tuple[httpx.Client,
                                                                          ServerContext]]:
    """A server with --auth and --upstream mirror.test -> a server over ``up``; a client
    with a read-all token of ``tier``."""
    auth = tmp_path / "auth.toml"
    tok = add_token(auth, "bob", read=["**"], push=[], tier=tier)
    with serving(up) as (upurl, _):
        down = Store(tmp_path / "down")
        ctx = ServerContext(down, ServeOptions(upstreams={"mirror.test": upurl},
                                               insecure_upstream=True),
                            policy=load_policy(auth))
        ctx.mirror = mirror_for(ctx)
        app = create_app(ctx, access_log=False)
        try:
            with running_asgi(app) as url, httpx.Client(
                    base_url=url, headers={"Authorization": f"Bearer {tok}"},
                    timeout=60) as c:
                yield c, ctx
        finally:
            close_app(app)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("by", ["digest", "tag"])
def test_mirrored_blobs_are_served_under_auth(tmp_path: Path, by: str) -> None:
    up = Store(tmp_path / "up")
    layer = os.urandom(3 << 20)
    raw = add_model(up, "ns/m:latest", [layer])
    doc = json.loads(raw)
    mdig = "sha256:" + hashlib.sha256(raw).hexdigest()
    ref = mdig if by == "digest" else "latest"
    with mirrored_server(tmp_path, up, "lite") as (c, ctx):
        ld = doc["layers"][0]["digest"]
        # nothing served yet: the blob is unknown to the repository
        assert c.get(f"/v2/mirror.test/ns/m/blobs/{ld}").status_code == 404
        r = c.get(f"/v2/mirror.test/ns/m/manifests/{ref}")
        assert r.status_code == 200 and r.content == raw
        r = c.get(f"/v2/mirror.test/ns/m/blobs/{ld}")  # before the pull lands
        assert r.status_code == 200, r.text[:200]
        assert r.content == layer
        cd = doc["config"]["digest"]
        assert c.head(f"/v2/mirror.test/ns/m/blobs/{cd}").status_code == 200
        assert ctx.mirror is not None and ctx.mirror.wait_idle(60)
        r = c.get(f"/v2/mirror.test/ns/m/blobs/{ld}")  # after
        assert r.status_code == 200 and r.content == layer
        # another repository does not get them
        assert c.get(f"/v2/mirror.test/ns/other/blobs/{ld}").status_code == 404


@pytest.mark.timeout(120)
def test_mirrored_manifest_tier_is_its_own_annotation(tmp_path: Path) -> None:
    up = Store(tmp_path / "up")
    layer = os.urandom(300_000)
    raw = add_model(up, "ns/m:latest", [layer],
                    extra={"annotations": {TIER: "professional"}})
    mdig = "sha256:" + hashlib.sha256(raw).hexdigest()
    ld = json.loads(raw)["layers"][0]["digest"]
    with mirrored_server(tmp_path, up, "lite") as (c, ctx):
        r = c.get(f"/v2/mirror.test/ns/m/manifests/{mdig}")
        assert r.status_code == 403 and raw not in r.content
        r = c.get(f"/v2/mirror.test/ns/m/blobs/{ld}")
        assert r.status_code in (403, 404) and layer not in r.content
        assert ctx.mirror is not None and ctx.mirror.wait_idle(60)
        r = c.get(f"/v2/mirror.test/ns/m/blobs/{ld}")
        assert r.status_code in (403, 404) and layer not in r.content


BAD_SECRETS = ["abcdefghijklmnopq", "x" * 40 + "!", "", "QUJD" * 8, "a==b" * 12]


@pytest.mark.parametrize("bad", BAD_SECRETS)
def test_auth_file_secret_must_be_base64url_of_32_bytes(tmp_path: Path, bad: str) -> None:
    auth = tmp_path / "auth.toml"
    add_token(auth, "bob", read=["**"], push=[], tier="lite")
    good = load_policy(auth)
    assert len(good._state.secret) >= 32
    text = re.sub(r'secret = ".*"', f'secret = "{bad}"', auth.read_text())
    bad_file = tmp_path / "bad.toml"
    bad_file.write_text(text)
    os.chmod(bad_file, 0o600)
    with pytest.raises(AuthFileError):
        load_policy(bad_file)
    # at startup: exit 4 with one error line
    r = subprocess.run([sys.executable, "-m", "cli", "--store", str(tmp_path / "s"), "serve",
                        "--listen", "127.0.0.1:0", "--auth", str(bad_file)],
                       capture_output=True, env=cli_env(), cwd=ROOT, timeout=60)
    assert r.returncode == 4, r.stderr
    assert b"secret" in r.stderr


@pytest.mark.timeout(60)
def test_live_reload_of_a_bad_secret_keeps_the_last_good_policy(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    auth = tmp_path / "a.toml"
    tok = add_token(auth, "bob", read=["**"], push=[], tier="lite")
    pol = load_policy(auth)
    key = pol._state.secret
    new = re.sub(r'secret = ".*"', 'secret = "abcdefghijklmnopq"', auth.read_text())
    p2 = tmp_path / "b.toml"
    p2.write_text(new)
    os.chmod(p2, 0o600)
    os.replace(p2, auth)
    with caplog.at_level(logging.WARNING, logger="blobctl.serve.auth"):
        for _ in range(3):
            pol.refresh()
            d = pol.authorize({"authorization": f"Bearer {tok}"}, "library/x", Action.READ,
                              None)
            assert d.status == 200
    assert pol._state.secret == key
    warnings = [r for r in caplog.records if "not reloaded" in r.getMessage()]
    assert len(warnings) == 1 and "secret" in warnings[0].getMessage()


@pytest.mark.timeout(300)
def test_cli_push_with_chunk_index_to_serve_then_pull(tmp_path: Path) -> None:
    """A layer >= 8 MiB makes push send a chunk index with ``subject``: serve answers
    ``OCI-Subject`` so push needs no referrers tag (no refused image index, no warning);
    the artifact is not listed as a model; a second store pulls the model back."""
    src = Store(tmp_path / "src")
    layer = os.urandom(9 << 20)
    raw = add_model(src, "ns/big:1", [layer])
    sp = start_serve(tmp_path / "dst", "--push", log_dir=tmp_path / "logs")
    try:
        r = subprocess.run([sys.executable, "-m", "cli", "--store", str(tmp_path / "src"),
                            "push", "ns/big:1", f"{sp.netloc}/ns/big:1", "--insecure"],
                           capture_output=True, env=cli_env(), cwd=ROOT, timeout=240)
        assert r.returncode == 0, r.stderr
        assert b"warning" not in r.stderr.lower() and b"refused" not in r.stderr, r.stderr
        tags = httpx.get(f"{sp.url}/v2/ns/big/tags/list").json()["tags"]
        assert "1" in tags
        subject = "sha256:" + hashlib.sha256(raw).hexdigest()
        refs = httpx.get(f"{sp.url}/v2/ns/big/referrers/{subject}").json()["manifests"]
        assert len(refs) == 1  # the chunk index, found through the referrers API
        assert f"sha256-{subject.removeprefix('sha256:')}" not in tags  # no referrers tag
        models = httpx.get(f"{sp.url}/ui/api/models").json()["models"]
        assert [m["name"] for m in models] == ["registry.ollama.ai/ns/big:1"], models
        r = subprocess.run([sys.executable, "-m", "cli", "--store", str(tmp_path / "again"),
                            "pull", f"{sp.netloc}/ns/big:1", "--insecure"],
                           capture_output=True, env=cli_env(), cwd=ROOT, timeout=240)
        assert r.returncode == 0, r.stderr
        again = Store(tmp_path / "again")
        ld = Digest.parse(json.loads(raw)["layers"][0]["digest"])
        assert again.has_blob(ld)
        with open(again.layout.existing_blob(ld) or "", "rb") as f:
            assert f.read() == layer
    finally:
        sp.stop()
    assert "Traceback" not in sp.log()


@pytest.mark.timeout(120)
def test_upload_sessions_are_capped_globally_and_per_caller(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    auth = tmp_path / "auth.toml"
    ta = add_token(auth, "alice", read=[], push=["team/*"], tier="lite")
    tb = add_token(auth, "bob", read=[], push=["team/*"], tier="lite")
    with serving(store, push=True, policy=load_policy(auth)) as (url, ctx):
        uploads = APPS[id(ctx)].state.oci.uploads
        uploads.max_sessions, uploads.max_per_subject = 5, 3
        a = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ta}"})
        b = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {tb}"})
        got = [a.post("/v2/team/x/blobs/uploads/") for _ in range(4)]
        assert [r.status_code for r in got] == [202, 202, 202, 429]
        assert got[3].json()["errors"][0]["code"] == "TOOMANYREQUESTS"
        got = [b.post("/v2/team/x/blobs/uploads/") for _ in range(3)]
        assert [r.status_code for r in got] == [202, 202, 429]  # 5 in all
        assert len(uploads.sessions) == 5
        assert b.delete(got[0].headers["Location"]).status_code == 204
        assert a.post("/v2/team/x/blobs/uploads/").status_code == 429  # alice still has 3
        assert b.post("/v2/team/x/blobs/uploads/").status_code == 202


@pytest.mark.timeout(60)
def test_idle_upload_sessions_are_reaped_on_a_timer(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    with serving(store, push=True) as (url, ctx):
        uploads = APPS[id(ctx)].state.oci.uploads
        uploads.idle_timeout = 0.5
        c = httpx.Client(base_url=url)
        r = c.post("/v2/ns/x/blobs/uploads/")
        assert r.status_code == 202
        loc = r.headers["Location"]
        assert c.patch(loc, content=b"x" * 1000).status_code == 202
        assert list(store.layout.ingest.glob("up-*"))
        deadline = time.monotonic() + 30
        # no other request: the timer alone reaps it (the session leaves the table first,
        # its files go right after, in a thread: wait for both)
        while ((uploads.sessions or list(store.layout.ingest.glob("up-*")))
               and time.monotonic() < deadline):
            time.sleep(0.1)
        assert not uploads.sessions
        assert not list(store.layout.ingest.glob("up-*"))
        assert c.get(loc).status_code == 404


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["patch", "put", "monolithic"])
def test_a_failed_upload_write_drops_the_session_and_its_temp_file(
        tmp_path: Path, how: str) -> None:
    """A file-size limit on the server process makes its writes fail (EFBIG) as a full
    disk would: an OCI error, the session gone, no temp file."""
    log = (tmp_path / "serve.log").open("wb")
    limited = ("import os, resource, sys; n = 1 << 20; "
               "resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); "
               "os.execv(sys.executable, [sys.executable, '-m', 'cli', *sys.argv[1:]])")
    proc = subprocess.Popen(
        [sys.executable, "-c", limited, "--store", str(tmp_path / "store"), "serve",
         "--listen", "127.0.0.1:0", "--json", "--push"],
        stdout=subprocess.PIPE, stderr=log, env=cli_env(), cwd=ROOT)
    try:
        assert proc.stdout is not None
        url = json.loads(proc.stdout.readline())["url"]
        body = os.urandom(3 << 20)
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        with httpx.Client(base_url=url, timeout=60) as c:
            if how == "monolithic":
                r = c.post(f"/v2/ns/x/blobs/uploads/?digest={digest}", content=body)
                loc = None
            else:
                loc = c.post("/v2/ns/x/blobs/uploads/").headers["Location"]
                r = (c.patch(loc, content=body) if how == "patch"
                     else c.put(loc, params={"digest": digest}, content=body))
            assert r.status_code == 500, r.text
            assert r.json()["errors"][0]["code"] == "UNKNOWN"
            if loc is not None:
                assert c.get(loc).status_code == 404
            assert c.head(f"/v2/ns/x/blobs/{digest}").status_code == 404
            assert not list((tmp_path / "store").rglob("*.tmp"))
            assert not list((tmp_path / "store" / ".blobctl" / "ingest").glob("up-*"))
            m = c.get("/metrics").text
            assert "blobctl_upload_sessions 0" in m
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def _hold_store_lock(store: Store) -> tuple[threading.Thread, threading.Event]:
    """A thread holding the store lock, as a GC apply does, until the event is set."""
    held, free = threading.Event(), threading.Event()

    def gc_apply() -> None:
        with store.lock():
            held.set()
            free.wait(60)

    gc, _ = _in_thread(gc_apply)
    assert held.wait(30)
    return gc, free


@pytest.mark.timeout(120)
def test_stream_leases_do_not_wait_behind_the_store_lock_for_other_digests(
        tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    leases = StreamLeases(store, lock_timeout=60)
    d0, d1, d2 = (Digest.of_bytes(bytes([i])) for i in range(3))
    leases.acquire(d0)
    gc, free = _hold_store_lock(store)
    t1, r1 = _in_thread(lambda: leases.acquire(d1))   # waits for the store lock
    time.sleep(0.3)
    t3, r3 = _in_thread(lambda: leases.acquire(d1))   # joins the pending lease
    t0 = time.monotonic()
    leases.acquire(d0)  # a digest already leased, and its release: no wait for the GC
    leases.release(d0)
    leases.release(d0)
    t2, r2 = _in_thread(lambda: leases.acquire(d2))  # a new digest waits, by itself
    assert time.monotonic() - t0 < 10
    time.sleep(0.3)
    assert not r1 and not r2 and not r3
    free.set()
    for t in (t1, t2, t3, gc):
        t.join(60)
    assert r1 == [None] and r2 == [None] and r3 == [None]
    assert leases.active == 3
    assert len(list(store.layout.leases.iterdir())) == 2  # one file per digest
    for d in (d1, d1, d2):
        leases.release(d)
    assert leases.active == 0 and not list(store.layout.leases.iterdir())


@pytest.mark.timeout(120)
def test_stream_lease_wait_is_bounded_and_leaves_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    leases = StreamLeases(store, lock_timeout=0.5)
    d = Digest.of_bytes(b"x")
    gc, free = _hold_store_lock(store)
    t1, r1 = _in_thread(lambda: leases.acquire(d))
    time.sleep(0.1)
    t2, r2 = _in_thread(lambda: leases.acquire(d))
    t1.join(30)
    t2.join(30)
    assert isinstance(r1[0], StoreBusy) and isinstance(r2[0], StoreBusy)
    assert leases.active == 0 and not list(store.layout.leases.iterdir())
    free.set()
    gc.join(30)
    leases.acquire(d)  # the table holds nothing stale
    assert leases.active == 1
    leases.release(d)
    assert not list(store.layout.leases.iterdir())


@pytest.mark.timeout(180)
def test_upstream_failure_on_a_manifest_is_an_oci_502(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    ctx = ServerContext(Store(tmp_path / "down"),
                        ServeOptions(upstreams={"mirror.test": f"http://127.0.0.1:{port}"},
                                     insecure_upstream=True))
    ctx.mirror = mirror_for(ctx)
    app = create_app(ctx, access_log=False)
    try:
        with running_asgi(app) as url, httpx.Client(base_url=url, timeout=150) as c:
            r = c.get("/v2/mirror.test/ns/m/manifests/latest")
            assert r.status_code == 502, r.text
            assert r.json()["errors"][0]["code"] == "UNAVAILABLE"
            assert "Retry-After" in r.headers
    finally:
        close_app(app)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sent", [10, 30])
def test_chunked_patch_longer_or_shorter_than_its_content_range_is_400(
        tmp_path: Path, sent: int) -> None:
    store = Store(tmp_path / "store")
    with serving(store, push=True) as (url, _ctx):
        c = httpx.Client(base_url=url)
        loc = c.post("/v2/ns/x/blobs/uploads/").headers["Location"]

        def chunked() -> Iterator[bytes]:  # no Content-Length: the length shows at the end
            yield b"a" * sent

        r = c.patch(loc, content=chunked(), headers={"Content-Range": "0-19"})
        assert r.status_code == 400, r.text
        assert r.json()["errors"][0]["code"] == "BLOB_UPLOAD_INVALID"
        assert c.get(loc).status_code == 404
        assert not list(store.layout.ingest.glob("up-*"))
        # the right length is accepted
        loc = c.post("/v2/ns/x/blobs/uploads/").headers["Location"]
        r = c.patch(loc, content=iter([b"b" * 20]), headers={"Content-Range": "0-19"})
        assert r.status_code == 202 and r.headers["Range"] == "0-19"
