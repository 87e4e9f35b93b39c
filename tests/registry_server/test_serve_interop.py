"""``blobctl serve`` as a real process, read and written by independent clients: skopeo
(inspect, copy out to an OCI layout, copy in with --push), ``blobctl pull``, and the real
docker-registry as a pull-through cache with serve as its upstream."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from blobstore import ModelName, Store
from tests.registry_server.conftest import ROOT, add_model, cli_env, start_serve
from tests.servers import DockerRegistry, free_port, sha

pytestmark = [pytest.mark.timeout(300)]


@pytest.fixture(autouse=True)
def _needs_skopeo() -> None:
    """skopeo is the independent client here: in CI a missing one fails the run (``.ci/run``
    installs it), elsewhere the tests skip (as tests/servers.py running_registry does)."""
    if shutil.which("skopeo") is None:
        if os.environ.get("CI"):
            pytest.fail("skopeo is not installed (.ci/run installs it)")
        pytest.skip("skopeo not installed")


def _needs_docker_registry() -> None:
    if not DockerRegistry.available():
        if os.environ.get("CI"):
            pytest.fail("docker-registry is not installed (.ci/run installs it)")
        pytest.skip("docker-registry not installed")


def blobctl(store: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", "--store", str(store), *args],
                          capture_output=True, text=True, env=cli_env(), cwd=ROOT,
                          timeout=timeout)


def skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=120)


def test_skopeo_and_blobctl_pull_read_what_serve_serves(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    layers = [os.urandom(300_000), os.urandom(5000)]
    raw = add_model(store, "ns/repo:v1", layers)  # OCI manifest (skopeo copies those)
    hf_raw = add_model(store, "hf.co/org/model:q4", [os.urandom(1000)])
    sp = start_serve(store.root, log_dir=tmp_path / "logs")
    try:
        r = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{sp.netloc}/ns/repo:v1")
        assert r.returncode == 0, r.stderr
        assert r.stdout.encode() == raw
        r = skopeo("inspect", "--tls-verify=false", f"docker://{sp.netloc}/ns/repo:v1")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["Digest"] == sha(raw)
        r = skopeo("inspect", "--raw", "--tls-verify=false",
                   f"docker://{sp.netloc}/hf.co/org/model:q4")
        assert r.returncode == 0, r.stderr
        assert r.stdout.encode() == hf_raw
        out = tmp_path / "oci"
        r = skopeo("copy", "--src-tls-verify=false", f"docker://{sp.netloc}/ns/repo:v1",
                   f"oci:{out}:v1")
        assert r.returncode == 0, r.stderr
        index = json.loads((out / "index.json").read_text())
        assert index["manifests"][0]["digest"] == sha(raw)
        assert (out / "blobs" / "sha256" / sha(raw).split(":")[1]).read_bytes() == raw
        for b in layers:
            assert (out / "blobs" / "sha256" / sha(b).split(":")[1]).read_bytes() == b
        # blobctl pull over plain http (--insecure), into another store
        other = tmp_path / "pulled"
        r = blobctl(other, "pull", f"{sp.netloc}/ns/repo:v1", "--insecure", "--json")
        assert r.returncode == 0, r.stderr
        got = Store(other).get_manifest(ModelName.parse(f"{sp.netloc}/ns/repo:v1"))
        assert got.raw == raw
        for b in layers:
            assert Store(other).blob_path(got.layers[layers.index(b)].digest).read_bytes() == b
    finally:
        assert sp.stop() == 0
    log = sp.log()
    assert " GET /v2/ns/repo/manifests/v1 200 " in log  # the access log, one line each


def test_skopeo_copy_into_serve_push_shows_in_list(tmp_path: Path) -> None:
    src = Store(tmp_path / "src")
    layers = [os.urandom(2_500_000), os.urandom(1000)]
    raw = add_model(src, "ns/orig:1", layers)
    layout = tmp_path / "layout"
    srv_src = start_serve(src.root, log_dir=tmp_path / "logs")
    try:
        r = skopeo("copy", "--src-tls-verify=false", f"docker://{srv_src.netloc}/ns/orig:1",
                   f"oci:{layout}:1")
        assert r.returncode == 0, r.stderr
    finally:
        srv_src.stop()
    dest = Store(tmp_path / "dest")
    sp = start_serve(dest.root, "--push", log_dir=tmp_path / "logs")
    try:
        assert sp.startup["push"] is True
        r = skopeo("copy", "--dest-tls-verify=false", f"oci:{layout}:1",
                   f"docker://{sp.netloc}/team/pushed:v2")
        assert r.returncode == 0, r.stderr
        r = skopeo("inspect", "--raw", "--tls-verify=false",
                   f"docker://{sp.netloc}/team/pushed:v2")
        assert r.stdout.encode() == raw  # the same bytes came through two copies
    finally:
        assert sp.stop() == 0
    r = blobctl(dest.root, "list", "--json")
    assert r.returncode == 0, r.stderr
    names = [m["name"] for m in json.loads(r.stdout)]
    assert any("team/pushed:v2" in n for n in names), names
    m = dest.get_manifest(ModelName.parse("team/pushed:v2"))
    assert m.raw == raw
    for b in layers:
        assert dest.blob_path(m.layers[layers.index(b)].digest).read_bytes() == b


def test_docker_registry_pull_through_cache_with_serve_upstream(tmp_path: Path) -> None:
    _needs_docker_registry()
    store = Store(tmp_path / "store")
    layers = [os.urandom(400_000)]
    raw = add_model(store, "ns/fleet:1", layers, oci=False)  # Ollama-style Docker v2 manifest
    sp = start_serve(store.root, log_dir=tmp_path / "logs")
    reg = DockerRegistry(tmp_path / "cache")
    try:
        # the docker-registry config with a proxy section, written as DockerRegistry writes
        # its own (same keys) plus proxy.remoteurl
        reg.port = free_port()
        (reg.root / "data").mkdir(parents=True, exist_ok=True)
        cfg = reg.root / "config.yml"
        cfg.write_text(
            "version: 0.1\n"
            "log:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {reg.root / 'data'}\n"
            f"http:\n  addr: 127.0.0.1:{reg.port}\n"
            f"proxy:\n  remoteurl: {sp.url}\n")
        log = reg.root / "registry.log"
        with log.open("ab") as err:
            reg.proc = subprocess.Popen(["docker-registry", "serve", str(cfg)],
                                        stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{reg.url}/v2/", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        pulled = tmp_path / "pulled"
        r = blobctl(pulled, "pull", f"{reg.netloc}/ns/fleet:1", "--insecure", "--json")
        assert r.returncode == 0, r.stderr + log.read_text()[-2000:]
        got = Store(pulled).get_manifest(ModelName.parse(f"{reg.netloc}/ns/fleet:1"))
        assert got.raw == raw
        assert Store(pulled).blob_path(got.layers[0].digest).read_bytes() == layers[0]
    finally:
        reg.stop()
        sp.stop()
    assert f" GET /v2/ns/fleet/blobs/{sha(layers[0])} 200 " in sp.log()  # came from serve
