"""Pull against the fault-injecting server: every fault ends in a correct blob or a clear
error, never a corrupt blob under a digest name or a manifest with missing blobs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from blobstore.errors import BlobctlError, DigestMismatch
from blobstore.store import Store
from registry_client.errors import (
    AuthError,
    ProtocolError,
    RateLimited,
    RemoteNotFound,
    TransferError,
    UnsupportedManifest,
)
from registry_client.pull import PullOptions, pull
from registry_client.retry import RetryPolicy
from tests.blobstore.gcutil import assert_no_missing_blobs
from tests.servers import Fault, FaultServer, sha

MODEL = "application/vnd.ollama.image.model"
FAST = RetryPolicy(attempts=5, base_delay=0.01, max_delay=0.3)
MiB = 1 << 20


def opts(**kw: object) -> PullOptions:
    base: dict[str, object] = {"insecure": True, "connections": 6, "retry": FAST,
                               "stall_timeout": 2.0, "window_bytes": 8 * MiB}
    base.update(kw)
    return PullOptions(**base)  # type: ignore[arg-type]


def setup_model(srv: FaultServer, size: int = 6 * MiB, seed: int = 1) -> tuple[str, bytes]:
    data = (seed.to_bytes(4, "little") + os.urandom(64)) * (size // 68) + b"x" * (size % 68)
    srv.add_model("library/m", "q4", b'{"model_format":"gguf"}',
                  [(MODEL, data), ("application/vnd.ollama.image.params", b'{"a":1}')])
    return f"{srv.netloc}/library/m:q4", data


def assert_intact(store: Store, data: bytes) -> None:
    p = store.layout.blob(__import__("blobstore").Digest.parse(sha(data)))
    assert p.read_bytes() == data
    assert store.verify().ok
    assert_no_missing_blobs(store)


def assert_nothing_bad(store: Store) -> None:
    """After a failure: no manifest, and every blob present is what its name says."""
    assert store.list_models() == []
    assert store.verify().ok


def test_plain_pull_and_dedupe(server: FaultServer, store: Store) -> None:
    ref, data = setup_model(server)
    r = pull(ref, store=store, options=opts())
    assert r.blobs_fetched == 3 and r.bytes_fetched == len(data) + 7 + 23
    assert r.bytes_read_back <= 256 * 1024  # hashed from the page cache (a few pages at most)
    assert_intact(store, data)
    entry = store.list_models()[0]
    assert entry.manifest is not None
    assert entry.manifest.raw == server.manifests[("library/m", "q4")][0]
    assert entry.last_used is not None
    before = server.blob_bytes_sent()
    r2 = pull(ref, store=store, options=opts())  # everything present: nothing fetched
    assert r2.blobs_fetched == 0 and r2.blobs_present == 3
    assert server.blob_bytes_sent() == before


@pytest.mark.parametrize("fault", [
    Fault("reset", after=300_000, times=3),
    Fault("truncate", after=100_000, times=2),
    Fault("status", status=503, retry_after="0", times=3),
    Fault("status", status=429, retry_after="1", times=1),
    Fault("status", status=500, times=2),
    Fault("stall", after=50_000, seconds=4.0, times=1),
])
def test_transient_faults_recover(server: FaultServer, store: Store, fault: Fault) -> None:
    ref, data = setup_model(server)
    server.faults.append(fault)
    pull(ref, store=store, options=opts())
    assert fault.times == 0  # the fault really happened
    assert_intact(store, data)


def test_ignored_range_falls_back_to_one_stream(server: FaultServer, store: Store) -> None:
    ref, data = setup_model(server)
    server.faults.append(Fault("ignore_range", times=1000))
    pull(ref, store=store, options=opts())
    assert_intact(store, data)


def test_corrupt_body_never_gets_the_digest_name(server: FaultServer, store: Store) -> None:
    ref, data = setup_model(server)
    server.faults.append(Fault("corrupt", after=1000, times=1000))
    with pytest.raises(DigestMismatch) as exc:
        pull(ref, store=store, options=opts())
    assert sha(data) in exc.value.message and "/blobs/" in exc.value.message
    assert_nothing_bad(store)
    bad = store.layout.ingest / __import__("blobstore").Digest.parse(sha(data)).filename
    assert not bad.exists()  # the bad ingest was dropped (other blobs' stay resumable)


def test_wrong_content_range_fails_the_range(server: FaultServer, store: Store) -> None:
    ref, _ = setup_model(server)
    server.faults.append(Fault("wrong_range", times=1000))
    with pytest.raises(ProtocolError, match="Content-Range"):
        pull(ref, store=store, options=opts())
    assert_nothing_bad(store)


def test_persistent_failure_is_a_clear_error(server: FaultServer, store: Store) -> None:
    ref, _ = setup_model(server)
    server.faults.append(Fault("reset", after=0, times=10_000))
    with pytest.raises(TransferError):
        pull(ref, store=store, options=opts())
    assert_nothing_bad(store)


def test_rate_limited_to_the_end(server: FaultServer, store: Store) -> None:
    ref, _ = setup_model(server)
    server.faults.append(Fault("status", match="/manifests/", status=429, retry_after="0",
                               times=100))
    with pytest.raises(RateLimited):
        pull(ref, store=store, options=opts())


def test_unknown_model(server: FaultServer, store: Store) -> None:
    setup_model(server)
    with pytest.raises(RemoteNotFound) as exc:
        pull(f"{server.netloc}/library/nope:1", store=store, options=opts())
    assert "not found" in exc.value.message


def test_stall_without_retries_left(server: FaultServer, store: Store) -> None:
    ref, _data = setup_model(server, size=2 * MiB)
    server.faults.append(Fault("stall", after=10_000, seconds=3.0, times=100))
    with pytest.raises(BlobctlError):
        pull(ref, store=store, options=opts(retry=RetryPolicy(attempts=2, base_delay=0.01),
                                            stall_timeout=1.0))
    assert_nothing_bad(store)


def test_bearer_token_and_cross_host_redirect(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Blobs redirect to a CDN on another host: it must never see Authorization."""
    with FaultServer(token="s3cret", basic=("user", "pw")) as origin, \
            FaultServer(host="127.0.0.2") as cdn:
        ref, data = setup_model(origin)
        cdn.blobs = dict(origin.blobs)
        origin.faults.append(Fault("redirect", target=cdn.url, times=10_000))
        home = tmp_path / "home"
        (home / ".docker").mkdir(parents=True)
        import base64
        import json
        auth = base64.b64encode(b"user:pw").decode()
        (home / ".docker" / "config.json").write_text(
            json.dumps({"auths": {origin.netloc: {"auth": auth}}}))
        monkeypatch.setenv("DOCKER_CONFIG", str(home / ".docker"))
        store = Store(tmp_path / "s")
        pull(ref, store=store, options=opts())
        assert_intact(store, data)
        assert cdn.log and all("Authorization" not in s.headers and
                               "authorization" not in s.headers for s in cdn.log)
        served_with_token = [s for s in origin.log if s.path.startswith("/v2/library")
                             and s.headers.get("Authorization") == "Bearer s3cret"]
        assert served_with_token
        assert any(s.path.startswith("/token?") for s in origin.log)


def test_wrong_credentials_are_an_auth_error(tmp_path: Path) -> None:
    with FaultServer(token="t", basic=("user", "pw")) as origin:
        ref, _ = setup_model(origin)
        with pytest.raises(AuthError) as exc:
            pull(ref, store=Store(tmp_path / "s"), options=opts())
        assert exc.value.hint


def test_index_selects_platform_or_fails(server: FaultServer, store: Store) -> None:
    import json
    import platform as pf
    _ref, data = setup_model(server)
    raw, media = server.manifests[("library/m", "q4")]
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(pf.machine(), pf.machine())
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": [{"mediaType": media, "digest": sha(raw), "size": len(raw),
                                       "platform": {"os": "linux", "architecture": arch}}]}).encode()
    server.manifests[("library/m", "multi")] = (index, "application/vnd.oci.image.index.v1+json")
    pull(f"{server.netloc}/library/m:multi", store=store, options=opts())
    assert_intact(store, data)
    other = index.replace(f'"architecture": "{arch}"'.encode(), b'"architecture": "s390x"')
    server.manifests[("library/m", "other")] = (other, "application/vnd.oci.image.index.v1+json")
    with pytest.raises(UnsupportedManifest, match="s390x"):
        pull(f"{server.netloc}/library/m:other", store=store, options=opts())


def test_manifest_with_hostile_descriptor_is_refused(server: FaultServer, store: Store) -> None:
    bad = (b'{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",'
           b'"config":{"mediaType":"x","digest":"sha256:../../etc/passwd","size":1},"layers":[]}')
    server.manifests[("library/bad", "1")] = (bad, "application/vnd.docker.distribution.manifest.v2+json")
    with pytest.raises(UnsupportedManifest):
        pull(f"{server.netloc}/library/bad:1", store=store, options=opts())
    assert list(store.layout.blobs.iterdir()) == []


def test_straggler_is_stolen_from(server: FaultServer, store: Store) -> None:
    """One very slow stream must not hold the pull: idle workers split its range."""
    ref, data = setup_model(server, size=8 * MiB)
    # the first ranged request is served at 200 KB/s: alone it would take ~7 s
    server.faults.append(Fault("slow", rate=200_000, only_range_start=0, times=1))
    import time
    t0 = time.monotonic()
    pull(ref, store=store, options=opts(connections=4))
    assert time.monotonic() - t0 < 5.0
    assert_intact(store, data)


def test_basic_auth_challenge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import base64
    import json
    with FaultServer(basic=("user", "pw"), basic_only=True) as srv:
        ref, data = setup_model(srv)
        store = Store(tmp_path / "s")
        with pytest.raises(AuthError):  # no credentials yet
            pull(ref, store=store, options=opts())
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "config.json").write_text(json.dumps(
            {"auths": {srv.netloc: {"auth": base64.b64encode(b"user:pw").decode()}}}))
        monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "d"))
        pull(ref, store=store, options=opts())
        assert_intact(store, data)


def test_head_size_disagreeing_with_manifest_is_refused(server: FaultServer, store: Store) -> None:
    import json
    _ref, _data = setup_model(server)
    raw, media = server.manifests[("library/m", "q4")]
    doc = json.loads(raw)
    doc["layers"][0]["size"] += 1  # the manifest lies about the size
    bad = json.dumps(doc).encode()
    server.manifests[("library/m", "liar")] = (bad, media)
    with pytest.raises(ProtocolError, match="reports"):
        pull(f"{server.netloc}/library/m:liar", store=store, options=opts())
    assert_nothing_bad(store)


@pytest.mark.parametrize("status", [404, 405])
def test_registry_refusing_head_still_works(server: FaultServer, store: Store,
                                            status: int) -> None:
    """HEAD on blobs answers an error while GET works: HEAD is only a cross-check."""
    ref, data = setup_model(server)
    server.faults.append(Fault("head", status=status, times=10))
    pull(ref, store=store, options=opts())
    assert server.faults[-1].times < 10  # HEAD really was refused
    assert_intact(store, data)


# The four cases an outside check found hanging the old engine (bytes of the last block
# written before a body error were never accounted, so the chunk never completed).
@pytest.mark.timeout(60)
@pytest.mark.parametrize("fault", [
    Fault("reset", after=64 * 1024, times=3),
    Fault("reset", after=1 * MiB, times=10_000),
    Fault("truncate", after=100_000, times=3),
    Fault("stall", after=512 * 1024, seconds=600.0, times=1),
], ids=["rst-64k-first-3", "rst-every-1m", "fin-100k-first-3", "stall-512k"])
def test_body_errors_mid_range_never_hang(server: FaultServer, store: Store,
                                         fault: Fault) -> None:
    ref, data = setup_model(server, size=12 * MiB)
    server.faults.append(fault)
    pull(ref, store=store, options=opts(connections=16, stall_timeout=1.0,
                                        window_bytes=64 * MiB))
    assert_intact(store, data)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("cap", "size", "chunk"), [(MiB + 12345, 24 * MiB, 4 * MiB),
                                                   (32 * 1024, 2 * MiB, MiB // 2)])
def test_a_server_that_caps_each_response_is_no_failure(
        server: FaultServer, store: Store, caplog: pytest.LogCaptureFixture,
        cap: int, size: int, chunk: int) -> None:
    """Every ranged response covers at most ``cap`` bytes of the chunks asked for
    (with a ``Content-Range`` that says so): the rest is asked for again at once, with no
    retry and no backoff (here with a 0.5 s base), each byte sent once (one connection:
    nothing to steal to). Before, each such response counted as a failed try, and caps
    under 64 KiB (too little progress to reset the count) failed the pull."""
    server.max_range = cap
    ref, data = setup_model(server, size=size)
    slow_backoff = RetryPolicy(attempts=3, base_delay=0.5, max_delay=2.0)
    with caplog.at_level(logging.WARNING, logger="blobctl"):
        r = pull(ref, store=store, options=opts(chunk_size=chunk, retry=slow_backoff,
                                                connections=1))
    assert not [m for m in caplog.messages if "retry" in m], caplog.messages[:3]
    assert_intact(store, data)
    gets = [s for s in server.log if "/blobs/" in s.path and s.method == "GET"]
    assert len(gets) >= size // cap  # the cap was in force
    assert r.bytes_fetched == len(data) + 7 + 23
    assert server.blob_bytes_sent() == len(data) + 7 + 23
