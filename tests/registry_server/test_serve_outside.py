"""Found from outside, through a real `blobctl serve` process: a store on a read-only
mount served no blob (every GET a text/plain 500, since the blob's lease could not be
written); some error responses lacked `Docker-Distribution-API-Version`; byte counters in
/metrics kept 6 digits; a mistyped read-only `--store` served an empty registry."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from blobstore.store import Store
from tests.blobstore.gcutil import add_model, digest_of
from tests.cli.clirun import ROOT
from tests.cli.test_full_disk_cli import _read_only_view
from tests.registry_server.conftest import cli_env, start_serve

LAYER = os.urandom(1_234_567)  # not a round number of bytes


@pytest.mark.timeout(120)
def test_a_store_on_a_read_only_mount_is_served(tmp_path: Path) -> None:
    store = Store(tmp_path / "src" / "s")
    add_model(store, "library/tiny:1", [LAYER])
    store.close()
    d = digest_of(LAYER)
    with _read_only_view(tmp_path / "src", tmp_path / "ro") as ro:
        sp = start_serve(ro / "s", "--push", log_dir=tmp_path / "logs")
        try:
            with httpx.Client(base_url=sp.url, timeout=30) as c:
                r = c.get(f"/v2/library/tiny/blobs/{d}")
                assert r.status_code == 200 and r.content == LAYER, r.text
                r = c.get(f"/v2/library/tiny/blobs/{d}", headers={"Range": "bytes=5-9"})
                assert r.status_code == 206 and r.content == LAYER[5:10]
                # a write is an OCI error with a JSON body, not a bare 500
                r = c.post("/v2/library/tiny/blobs/uploads/")
                assert r.status_code >= 400
                assert r.headers["content-type"].startswith("application/json"), r.text
                assert r.json()["errors"][0]["code"]
                assert r.headers["docker-distribution-api-version"] == "registry/2.0"
        finally:
            sp.stop()
        assert "serving without blob leases" in sp.log()


@pytest.mark.timeout(120)
def test_every_v2_error_carries_the_api_version_and_metrics_are_exact(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    add_model(store, "library/tiny:1", [LAYER])
    sp = start_serve(store.root, log_dir=tmp_path / "logs")
    try:
        with httpx.Client(base_url=sp.url, timeout=30) as c:
            for path in ("/v2/library/tiny/manifests/sha256:zz",
                         "/v2/library/tiny/manifests/bad%20tag",
                         "/v2/library/tiny/referrers/sha256:zz",
                         "/v2/library/tiny/foo", "/v2/library/tiny/blobs/uploads/x"):
                r = c.get(path)
                assert r.status_code >= 400, path
                assert r.headers.get("docker-distribution-api-version") == "registry/2.0", (
                    path, r.status_code, dict(r.headers))
            for _ in range(3):
                assert c.get(f"/v2/library/tiny/blobs/{digest_of(LAYER)}").status_code == 200
            text = c.get("/metrics").text
        served = [x for x in text.splitlines()
                  if x.startswith("blobctl_bytes_served_total ")]
        assert served == [f"blobctl_bytes_served_total {3 * len(LAYER)}"], served
    finally:
        sp.stop()


def test_a_read_only_serve_of_a_store_that_is_not_there_is_exit_3(tmp_path: Path) -> None:
    typo = tmp_path / "no-such-store"
    r = subprocess.run([sys.executable, "-m", "cli", "--store", str(typo), "serve",
                        "--listen", "127.0.0.1:0"], capture_output=True, text=True,
                       env=cli_env(), cwd=ROOT, timeout=60)
    assert r.returncode == 3, r.stderr
    assert r.stderr.startswith(f"error: no store at {typo}"), r.stderr
    assert not typo.exists()
