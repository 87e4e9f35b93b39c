"""Upload ids from the URL (spec/serve.md, "Uploads"): only the exact form the ingest
writer makes is ever looked up; a hostile id is refused before any lease or file work,
and a session is used only by its own caller on its own repository (in memory or
re-opened after a restart), without touching the folder otherwise."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from blobstore import Store
from blobstore.digest import Digest
from registry_server.auth import add_token, load_policy
from tests.registry_server.conftest import serving

pytestmark = pytest.mark.timeout(300)
MiB = 1 << 20

hostile = hs.one_of(
    hs.text(min_size=0, max_size=40).map(lambda t: "up-" + t),
    hs.sampled_from(["up-\x00x", "up-%00x", "up-..", "up-%2e%2e", "up-" + "a" * 5000,
                     "up-" + "0" * 23, "up-" + "0" * 25, "up-" + "A" * 24,
                     "up-" + "é" * 24, "up-" + "0" * 23 + "\n", "UP-" + "0" * 24]),
    hs.binary(min_size=1, max_size=30).map(lambda b: "up-" + b.decode("latin-1")),
)


def _entries(store: Store) -> tuple[list[str], list[str]]:
    lay = store.layout
    ingest = sorted(os.listdir(lay.ingest)) if lay.ingest.exists() else []
    leases = sorted(os.listdir(lay.leases)) if lay.leases.exists() else []
    return ingest, leases


def test_hostile_upload_ids_are_refused_without_io(tmp_path: Path) -> None:
    """One server for every example: a refused id must change nothing, so the store
    stays as it was for the next one (a leak shows as a changed listing at once)."""
    store = Store(tmp_path / "s")
    before = _entries(store)
    with serving(store, push=True) as (url, _), httpx.Client(base_url=url, timeout=30) as c:

        @settings(max_examples=150, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(sid=hostile, method=hs.sampled_from(["GET", "HEAD", "PATCH", "PUT", "DELETE"]))
        def one(sid: str, method: str) -> None:
            path = "/v2/ns/r/blobs/uploads/" + quote(sid, safe="")
            r = c.request(method, path, content=b"x" if method in ("PATCH", "PUT") else None)
            assert r.status_code in (400, 404, 405), (sid, r.status_code, r.text)
            assert _entries(store) == before  # no lease file, no ingest folder

        one()


def test_a_wellformed_unknown_id_is_404_without_a_lease(tmp_path: Path) -> None:
    """Not even a lease taken and released: the kernel sees no file made in leases/."""
    from tests.blobstore.test_ingest_takeover import _Inotify

    store = Store(tmp_path / "s")
    store.layout.leases.mkdir(parents=True, exist_ok=True)
    watch = _Inotify(store.layout.leases, _Inotify.IN_CREATE | _Inotify.IN_MOVED_TO)
    try:
        with serving(store, push=True) as (url, _), \
                httpx.Client(base_url=url, timeout=30) as c:
            watch.owner_events(None)
            for _ in range(5):
                r = c.get("/v2/ns/r/blobs/uploads/up-" + secrets.token_hex(12))
                assert r.status_code == 404
                assert r.json()["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
            assert watch.owner_events(None) == 0
    finally:
        watch.close()


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int, int]]:
    out = {}
    for p in sorted(folder.iterdir()):
        st = p.stat()
        out[p.name] = (p.read_bytes(), st.st_mtime_ns, st.st_ino)
    return out


@pytest.mark.parametrize("restart", [False, True])
def test_another_caller_or_repository_cannot_touch_a_session(tmp_path: Path,
                                                            restart: bool) -> None:
    store = Store(tmp_path / "s")
    auth = tmp_path / "auth.toml"
    alice = add_token(auth, "alice", read=["**"], push=["team/*"], tier="lite")
    mallory = add_token(auth, "mallory", read=["**"], push=["team/*"], tier="lite")
    blob = os.urandom(2 * MiB + 5)

    def client(url: str, tok: str) -> httpx.Client:
        return httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {tok}"})

    with serving(store, push=True, policy=load_policy(auth)) as (url, _), \
            client(url, alice) as a:
        loc = a.post("/v2/team/r/blobs/uploads/").headers["Location"]
        assert a.patch(loc, content=blob[:MiB],
                       headers={"Content-Range": f"0-{MiB - 1}"}).status_code == 202
        sid = loc.rsplit("/", 1)[1]
        folder = store.layout.ingest / sid

        def attempts(url: str) -> None:
            before = _snapshot(folder)
            with client(url, mallory) as m, client(url, alice) as a2:
                for who, where in ((m, loc), (a2, loc.replace("/team/r/", "/team/other/")),
                                   (m, loc.replace("/team/r/", "/team/other/"))):
                    for method in ("GET", "PATCH", "PUT", "DELETE"):
                        r = who.request(method, where, content=b"evil" * 100
                                        if method in ("PATCH", "PUT") else None,
                                        params={"digest": str(Digest.of_bytes(b"evil"))}
                                        if method == "PUT" else None)
                        assert r.status_code == 404, (method, where, r.text)
            if restart:  # nothing was claimed, truncated, re-hashed or checkpointed
                assert _snapshot(folder) == before
            else:
                assert {k: v[0] for k, v in _snapshot(folder).items()} == \
                    {k: v[0] for k, v in before.items()}

        if not restart:
            attempts(url)
            finish(a, loc, blob)
    if restart:
        with serving(store, push=True, policy=load_policy(auth)) as (url, _):
            attempts(url)
            with client(url, alice) as a:
                finish(a, loc, blob)
    assert store.blob_path(Digest.of_bytes(blob)).read_bytes() == blob


def finish(a: httpx.Client, loc: str, blob: bytes) -> None:
    r = a.get(loc)
    assert r.status_code == 204 and r.headers["Range"] == f"0-{MiB - 1}", r.text
    r = a.put(loc, params={"digest": str(Digest.of_bytes(blob))}, content=blob[MiB:],
              headers={"Content-Range": f"{MiB}-{len(blob) - 1}"})
    assert r.status_code == 201, r.text
