"""A lease that names many digests costs O(change) per update, not O(lease) (found from
outside: an archive import of one model of 8,000 tiny layers took 121-151 s, each blob
rewriting the lease file with every digest so far), and a reader still never sees a
digest unleased once its ``add()`` returned."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest

from blobstore.digest import Digest
from blobstore.layout import Layout
from blobstore.lease import SEGMENT_DIGESTS, Lease, live_leases
from tests.cli.clirun import run
from tests.costs import counting

MT = "application/vnd.docker.distribution.manifest.v2+json"


def _one_model_of(root: Path, n: int) -> None:
    """A store with one model, ``many``, of ``n`` tiny layers."""
    (root / "blobs").mkdir(parents=True)

    def put(data: bytes, media: str) -> dict[str, object]:
        h = hashlib.sha256(data).hexdigest()
        (root / "blobs" / f"sha256-{h}").write_bytes(data)
        return {"digest": f"sha256:{h}", "size": len(data), "mediaType": media}

    layers = [put(f"L{i}-{n}".encode(), "application/vnd.ollama.image.model")
              for i in range(n)]
    cfg = put(b'{"model_format":"gguf"}', "application/vnd.docker.container.image.v1+json")
    d = root / "manifests/registry.ollama.ai/library/many"
    d.mkdir(parents=True)
    (d / "latest").write_text(json.dumps({"schemaVersion": 2, "mediaType": MT,
                                          "config": cfg, "layers": layers}))


def _lease_bytes_of_import(tmp: Path, n: int) -> int:
    src, dst, tar = tmp / f"s{n}", tmp / f"d{n}", tmp / f"a{n}.tar"
    _one_model_of(src, n)
    r = run("export", "many", "-o", str(tar), "--store", str(src))
    assert r.code == 0, r.err
    with counting() as c:
        r = run("import", str(tar), "--store", str(dst))
    assert r.code == 0, r.err
    assert len(os.listdir(dst / "blobs")) == n + 1
    assert not os.listdir(dst / ".blobctl/leases")  # every file of the lease went
    return c[("bytes", os.path.normpath(dst / ".blobctl/leases"))]


@pytest.mark.timeout(120)
def test_importing_4x_the_blobs_writes_about_4x_the_lease_bytes(tmp_path: Path) -> None:
    small = _lease_bytes_of_import(tmp_path, 150)
    big = _lease_bytes_of_import(tmp_path, 600)
    assert small > 0
    # linear: 4x; what the old lease wrote (every digest at each blob's update): ~16x
    assert big / small < 6, (small, big)


@pytest.mark.timeout(60)
def test_a_reader_sees_every_digest_whose_add_returned(tmp_path: Path) -> None:
    """While one thread adds digests (one at a time and in batches, across several
    sealed files) and another adds and discards ingest keys, readers in other threads
    find every digest whose ``add()`` had returned before they began."""
    layout = Layout(tmp_path)
    total = SEGMENT_DIGESTS * 3 + 17
    digests = [Digest.of_bytes(str(i).encode()) for i in range(total)]
    returned = [0]
    stop = threading.Event()
    errors: list[str] = []

    def read() -> None:
        while not stop.is_set():
            n = returned[0]
            seen: set[Digest] = set()
            for info in live_leases(layout):
                seen |= info.digests
            missing = [d for d in digests[:n] if d not in seen]
            if missing:
                errors.append(f"{len(missing)} of {n} unleased, e.g. {missing[0]}")
                return

    def churn(lease: Lease) -> None:
        i = 0
        while not stop.is_set():
            lease.add(ingests={f"k{i}"})
            lease.discard(ingests={f"k{i}"})
            i += 1

    with Lease(layout, "test") as lease:
        threads = [threading.Thread(target=read) for _ in range(2)]
        threads.append(threading.Thread(target=churn, args=(lease,)))
        for t in threads:
            t.start()
        i = 0
        while i < total:
            step = 1 if i % 3 else 40
            lease.add(digests=set(digests[i:i + step]))
            i = min(i + step, total)
            returned[0] = i
        stop.set()
        for t in threads:
            t.join()
        assert not errors, errors
        files = list(layout.leases.iterdir())
        assert 2 <= len(files) <= total // SEGMENT_DIGESTS + 1
        assert set().union(*(i.digests for i in live_leases(layout))) == set(digests)
    assert not list(layout.leases.iterdir())
