"""Pull from the real CNCF distribution registry (Debian docker-registry), kill a pull
mid-transfer and resume it, and pull the same model from two processes at once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from blobstore.digest import Digest
from blobstore.store import Store
from registry_client.pull import PullOptions, pull
from tests.blobstore.gcutil import assert_no_missing_blobs
from tests.cli.clirun import ROOT
from tests.helpers import make_gguf
from tests.registry_client.pagecache import page_cache_evictable
from tests.servers import OCI_MANIFEST, DockerRegistry, Fault, FaultServer, sha

MODEL = "application/vnd.ollama.image.model"
MiB = 1 << 20


def wait_for(path: Path, timeout: float = 20) -> None:
    """Wait until a running pull has created ``path`` (the test goes on either way and
    its own assertions say what is missing)."""
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_pull_from_real_registry_and_path_is_a_gguf(registry: DockerRegistry,
                                                     tmp_path: Path) -> None:
    gguf = make_gguf(tmp_path / "m.gguf", seed=7).read_bytes()
    raw = registry.push("team/tiny", "q8", b'{"model_format":"gguf","model_family":"llama"}',
                        [(MODEL, gguf), ("application/vnd.ollama.image.template", b"{{.Prompt}}")])
    store = Store(tmp_path / "s")
    r = pull(f"{registry.netloc}/team/tiny:q8", store=store,
             options=PullOptions(insecure=True, connections=4))
    assert r.blobs_fetched == 3
    entry = store.list_models()[0]
    assert entry.manifest is not None and entry.manifest.raw == raw  # bytes as received
    assert entry.manifest.digest == Digest.parse(sha(raw))
    path = store.resolve(entry.name).model_path
    assert path is not None and path.read_bytes() == gguf
    assert store.verify().ok


def test_big_blob_in_ranges_from_real_registry(registry: DockerRegistry, tmp_path: Path) -> None:
    data = os.urandom(24 * MiB)
    registry.push("team/big", "1", b'{"model_format":"gguf"}', [(MODEL, data)])
    store = Store(tmp_path / "s")
    r = pull(f"{registry.netloc}/team/big:1", store=store,
             options=PullOptions(insecure=True, connections=8, window_bytes=8 * MiB))
    assert r.bytes_read_back <= 256 * 1024  # hashed from the page cache (a few pages at most)
    assert store.blob_path(Digest.parse(sha(data))).read_bytes() == data


@pytest.mark.skipif(shutil.which("skopeo") is None and not os.environ.get("CI"),
                    reason="skopeo not installed")
def test_skopeo_sees_the_same_manifest_bytes(registry: DockerRegistry, tmp_path: Path) -> None:
    """An independent client (skopeo) reads the manifest whose bytes blobctl stored."""
    raw = registry.push("team/oci", "1", b'{"architecture":"amd64","os":"linux"}',
                        [(MODEL, b"GGUF" + os.urandom(1000))], media_type=OCI_MANIFEST,
                        config_type="application/vnd.oci.image.config.v1+json")
    store = Store(tmp_path / "s")
    pull(f"{registry.netloc}/team/oci:1", store=store, options=PullOptions(insecure=True))
    p = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                        f"docker://{registry.netloc}/team/oci:1"],
                       capture_output=True, check=True)
    assert p.stdout.rstrip(b"\n") == raw
    assert store.list_models()[0].manifest.raw == raw  # type: ignore[union-attr]


def journal_done_bytes(journal: Path) -> int:
    """Bytes the light checkpoints (spec/pull.md, "Resume") record as written."""
    import struct

    try:
        body = journal.read_bytes().partition(b"\n")[2]
    except OSError:
        return 0
    usable = len(body) - len(body) % 16
    return sum(e - s for s, e in struct.iter_unpack("<QQ", body[:usable]))


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=ROOT, env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_pull_then_resume_fetches_only_what_is_missing(tmp_path: Path) -> None:
    data = os.urandom(32 * MiB)
    with FaultServer() as srv:
        srv.add_model("library/k", "1", b'{"model_format":"gguf"}', [(MODEL, data)])
        # 2 connections fetch 8 MiB chunks; the last two crawl, so the pull is killed
        # with chunks 0 and 1 done and 2 and 3 in flight
        for start in (16 * MiB, 24 * MiB):
            srv.faults.append(Fault("slow", rate=300_000, only_range_start=start))
        store_dir = tmp_path / "s"
        proc = _cli("pull", f"{srv.netloc}/library/k:1", "--insecure", "--connections", "2",
                    "--chunk-size", "8M", "--json", "--store", str(store_dir))
        digest = Digest.parse(sha(data))
        journal = store_dir / ".blobctl" / "ingest" / digest.filename / "journal"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if journal_done_bytes(journal) >= 16 * MiB:
                break
            time.sleep(0.05)
        else:
            proc.kill()
            pytest.fail("the pull never recorded progress")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert proc.returncode == -signal.SIGKILL
        store = Store(store_dir)
        assert store.list_models() == [] and not store.has_blob(digest)
        done_bytes = journal_done_bytes(journal)
        assert 16 * MiB <= done_bytes < len(data)
        config_left = 0 if store.has_blob(Digest.parse(sha(b'{"model_format":"gguf"}'))) else 23
        srv.faults.clear()
        srv.wait_idle()  # the killed pull's responses have ended
        # as after a reboot: the written bytes are on disk, none in the page cache
        fd = os.open(journal.parent / "data", os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        sent_before = srv.blob_bytes_sent()
        again = _cli("pull", f"{srv.netloc}/library/k:1", "--insecure", "--json",
                     "--store", str(store_dir))
        out, err = again.communicate(timeout=60)
        assert again.returncode == 0, err
        summary = json.loads(out.strip().splitlines()[-1])
        fetched = srv.blob_bytes_sent() - sent_before
        # only the missing part came over the network; the done part was read back from
        # disk to be hashed (and only that: the hasher reads the rest from the page cache)
        assert fetched == len(data) - done_bytes + config_left
        assert summary["bytes_resumed"] == done_bytes
        assert summary["bytes_read_back"] <= done_bytes + 64 * 1024
        if page_cache_evictable(tmp_path):  # not on tmpfs, whose pages are the file
            assert summary["bytes_read_back"] >= done_bytes
        assert store.blob_path(digest).read_bytes() == data
        assert not (store_dir / ".blobctl" / "ingest" / digest.filename).exists()
        assert_no_missing_blobs(store)


def test_two_processes_pull_the_same_model(tmp_path: Path) -> None:
    data = os.urandom(16 * MiB)
    with FaultServer() as srv:
        srv.add_model("library/two", "1", b'{"model_format":"gguf"}', [(MODEL, data)])
        srv.default_rate = 4_000_000
        store_dir = tmp_path / "s"
        Store(store_dir)
        procs = [_cli("pull", f"{srv.netloc}/library/two:1", "--insecure", "--connections",
                      "4", "--json", "--store", str(store_dir)) for _ in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
        for p, (_, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0, err
        # the big blob crossed the network once: one process waited and reused it
        # (a few hundred KB may be sent twice where a slow range was split)
        big = [s for s in srv.log if sha(data) in s.path and s.method == "GET"]
        assert len(data) <= sum(s.sent for s in big) < 1.5 * len(data)
        summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
        assert sorted(x["blobs_from_other_process"] for x in summaries)[-1] >= 1
        store = Store(store_dir)
        assert store.blob_path(Digest.parse(sha(data))).read_bytes() == data
        assert len(store.list_models()) == 1


def test_lease_keeps_gc_off_a_running_pull(tmp_path: Path) -> None:
    """gc --grace 0 while a pull runs: the pull's blobs and ingest survive."""
    data = os.urandom(8 * MiB)
    with FaultServer() as srv:
        srv.add_model("library/g", "1", b'{"model_format":"gguf"}', [(MODEL, data)])
        srv.faults.append(Fault("slow", rate=1_000_000, times=100))
        store_dir = tmp_path / "s"
        proc = _cli("pull", f"{srv.netloc}/library/g:1", "--insecure", "--connections", "2",
                    "--store", str(store_dir))
        ingest = store_dir / ".blobctl" / "ingest" / Digest.parse(sha(data)).filename
        wait_for(ingest)
        gc = subprocess.run([sys.executable, "-m", "cli", "gc", "--grace", "0",
                             "--ingest-grace", "0", "--max-size", "0", "--json",
                             "--store", str(store_dir)], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert gc.returncode in (0, 10), gc.stderr
        assert ingest.exists()
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert_no_missing_blobs(Store(store_dir))


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("sig", "code", "line"), [
    (signal.SIGINT, 130, "error: interrupted"),
    # found from outside: SIGTERM (systemd, docker, `timeout`) killed the process with
    # no error line, its last checkpoint unwritten and its owner file left behind
    (signal.SIGTERM, 143, "error: terminated (SIGTERM)"),
    (signal.SIGHUP, 129, "error: terminated (SIGHUP)")])
def test_ctrl_c_mid_pull_exits_130_and_keeps_resume_state(
        tmp_path: Path, sig: int, code: int, line: str) -> None:
    data = os.urandom(16 * MiB)
    with FaultServer() as srv:
        srv.add_model("library/int", "1", b'{"model_format":"gguf"}', [(MODEL, data)])
        srv.default_rate = 1_000_000
        store_dir = tmp_path / "s"
        proc = _cli("pull", f"{srv.netloc}/library/int:1", "--insecure", "--connections", "16",
                    "--store", str(store_dir))
        digest = Digest.parse(sha(data))
        ingest = store_dir / ".blobctl" / "ingest" / digest.filename
        wait_for(ingest / "state.json")
        time.sleep(0.5)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == code, err
        assert [x for x in err.splitlines() if x.startswith("error: ")] == [line]
        assert not (ingest / "owner").exists()  # let go of, for the next pull at once
        # the connections broken off on purpose are no retries (found from outside: one
        # "warning: retry" per range in flight)
        assert [x for x in err.splitlines() if "retry" in x] == [], err
        assert "Traceback" not in err
        assert (ingest / "state.json").exists() and (ingest / "data").exists()
        assert Store(store_dir).list_models() == []
        srv.default_rate = 0
        again = _cli("pull", f"{srv.netloc}/library/int:1", "--insecure",
                     "--store", str(store_dir))
        _, err = again.communicate(timeout=60)
        assert again.returncode == 0, err
        assert Store(store_dir).blob_path(digest).read_bytes() == data


@pytest.mark.timeout(120)
def test_a_model_of_many_small_layers_costs_two_fsyncs_a_blob(
        registry: DockerRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model of many small layers (an OCI image, a split model): each blob costs its
    commit's two fsyncs (the file, then ``blobs/``) and nothing more. A pull of 300 layers
    of 1 KB used to spend about 12 a blob (lease rewrites, the ingest's first state,
    checkpoints of blobs not started yet) and took 7-11 s here. The sizes straddle the
    engine's batch (512 KiB: no journal at or below it) and one blob takes several
    chunks."""
    import random

    rnd = random.Random(8)
    sizes = [1, 100, 4096, 512 * 1024, 512 * 1024 + 1, 3 * MiB + 5,
             *(rnd.randint(1, 20_000) for _ in range(34))]
    layers = [(MODEL if i == 0 else "application/vnd.ollama.image.params", os.urandom(n))
              for i, n in enumerate(sizes)]
    registry.push("team/many", "1", b'{"model_format":"gguf"}', layers)
    calls: list[str] = []

    def counting(name: str) -> Callable[[int], None]:
        real: Callable[[int], None] = getattr(os, name)

        def counted(fd: int) -> None:
            calls.append(name)
            real(fd)

        return counted

    for name in ("fsync", "fdatasync"):
        monkeypatch.setattr(os, name, counting(name))
    store = Store(tmp_path / "s")
    r = pull(f"{registry.netloc}/team/many:1", store=store,
             options=PullOptions(insecure=True, connections=8, chunk_size=1 * MiB))
    monkeypatch.undo()
    blobs = len(sizes) + 1  # and the config
    assert r.blobs_fetched == blobs
    for _, data in layers:
        assert store.blob_path(Digest.parse(sha(data))).read_bytes() == data
    assert list(store.layout.ingest.iterdir()) == []
    # two per blob, the manifest's own (file and folder), and room for a timer checkpoint
    # (3) of each of the two journaled blobs on a slow machine; 373 before
    assert len(calls) <= 2 * blobs + 8, (len(calls), blobs)
    assert store.verify().ok


def test_a_size_the_registry_disputes_fails_before_any_byte(server: FaultServer,
                                                             tmp_path: Path) -> None:
    """The manifest says one size, the registry's HEAD another: the pull stops before
    fetching any blob, with both sizes in the error (the HEADs of a model of many layers
    go out several at a time; the mismatch is found among them)."""
    from registry_client.errors import ProtocolError
    from tests.servers import DOCKER_MANIFEST, make_manifest

    n = 150
    layers = [("application/vnd.ollama.image.params", os.urandom(1000 + i)) for i in range(n)]
    config = b'{"model_format":"gguf"}'
    server.add_model("team/lies", "1", config, layers)
    doc = json.loads(make_manifest(config, layers))
    doc["layers"][0]["size"] += 1
    server.manifests[("team/lies", "1")] = (json.dumps(doc).encode(), DOCKER_MANIFEST)
    t0 = time.monotonic()
    with pytest.raises(ProtocolError) as err:
        pull(f"{server.netloc}/team/lies:1", store=Store(tmp_path / "s"),
             options=PullOptions(insecure=True))
    took = time.monotonic() - t0
    assert "registry reports 1000 bytes" in str(err.value)
    assert "the manifest says 1001" in str(err.value)
    time.sleep(0.3)  # (HEADs in flight when it failed finish meanwhile)
    gets = [s for s in server.log if s.method == "GET" and "/blobs/" in s.path]
    assert gets == []
    heads = [s for s in server.log if s.method == "HEAD"]
    # the first failure stops the rest: no HEAD is sent after it (one of the first few)
    assert 1 < len(heads) < n // 2, (len(heads), took)


@pytest.mark.timeout(120)
def test_small_layers_reuse_connections(registry: DockerRegistry, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The size-check HEAD and the one GET of each small blob go over kept-alive
    connections: a response whose end was never seen used to be closed with its
    connection, two new connections a blob (a TLS handshake each on a real registry)."""
    import socket

    layers = [("application/vnd.ollama.image.params", os.urandom(500 + i)) for i in range(40)]
    registry.push("team/keepalive", "1", b'{"model_format":"gguf"}', layers)
    opened: list[object] = []
    real = socket.create_connection

    def counted(*args: object, **kw: object) -> socket.socket:
        opened.append(args[0])
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "create_connection", counted)
    store = Store(tmp_path / "s")
    r = pull(f"{registry.netloc}/team/keepalive:1", store=store,
             options=PullOptions(insecure=True, connections=4))
    monkeypatch.undo()
    assert r.blobs_fetched == 41
    # at most: 8 for the HEADs, 4 workers' httpx and range-reader connections, the manifest
    assert len(opened) <= 18, len(opened)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("damage", ["short", "long", "empty", "legacy-short"])
def test_a_blob_of_the_wrong_size_in_the_store_is_fetched_again(
        registry: DockerRegistry, tmp_path: Path, damage: str) -> None:
    """Found from outside: a file cut short at a blob's name was taken for the blob, so
    the pull wrote a manifest of a broken model, and so did every later pull ('verify'
    says: pull again). A file whose size is not the manifest's is fetched again, and the
    verified download replaces it."""
    data = os.urandom(3 * MiB + 17)
    registry.push("team/damaged", "1", b'{"model_format":"gguf"}', [(MODEL, data)])
    d = Digest.parse(sha(data))
    store = Store(tmp_path / "s")
    store.layout.blobs.mkdir(parents=True, exist_ok=True)
    bad = {"short": data[:1000], "long": data + b"x", "empty": b"",
           "legacy-short": data[:-1]}[damage]
    target = store.layout.legacy_blob(d) if damage.startswith("legacy") else store.layout.blob(d)
    target.write_bytes(bad)
    for _ in range(2):  # and a second pull finds the model whole
        r = pull(f"{registry.netloc}/team/damaged:1", store=store,
                 options=PullOptions(insecure=True, connections=4))
        assert store.blob_path(d).read_bytes() == data
        assert store.resolve(r.name).model_path == store.blob_path(d)
    assert r.blobs_fetched == 0  # the second pull: nothing to fetch
    assert not store.layout.legacy_blob(d).exists()  # a proven-wrong old copy goes
    assert store.verify().ok
