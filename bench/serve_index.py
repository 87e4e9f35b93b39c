"""How long ``blobctl serve`` takes to build a chunk index on demand, against chunking the
same blob directly, in one run.

Usage: python bench/serve_index.py [--size-mib 256]

A store holds one model whose layer is SIZE MiB of random bytes; ``blobctl serve`` (a real
process, default stack) on it. Measured, wall clock:

1. ``chunk_file`` of the layer in this process (the chunker alone; the file is in the
   page cache, as it is for serve);
2. the first ``GET /v2/<repo>/referrers/<digest>`` (the server builds the index);
3. a second one (kept: no build);
4. the same again with a new serve process (the index cache is dropped before each run).

Prints the times, the chunking speeds and the server's own ``index_build_seconds``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from blobstore import Digest, Store  # noqa: E402
from registry_client.delta import chunk_file  # noqa: E402
from tests.registry_server.conftest import add_model, start_serve  # noqa: E402


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(f"blobctl_{name}_total "):
            return float(line.split()[1])
    return 0.0


CLIENT = httpx.Client(timeout=300)  # one client: a new one per request costs ~20 ms


def timed_referrers(url: str, digest: str) -> float:
    t0 = time.perf_counter()
    r = CLIENT.get(f"{url}/v2/library/big/referrers/{digest}")
    dt = time.perf_counter() - t0
    assert r.status_code == 200 and len(r.json()["manifests"]) == 1, r.text
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=256)
    args = ap.parse_args()
    size = args.size_mib << 20
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-index-"))
    try:
        st = Store(tmp / "store")
        layer = os.urandom(size)
        raw = add_model(st, "library/big:v1", [layer])
        blob = Digest.of_bytes(layer)
        del layer
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        t0 = time.perf_counter()
        idx = chunk_file(st.blob_path(blob), blob)
        direct = time.perf_counter() - t0
        assert idx is not None
        mb = size / 1e6
        print(f"layer {args.size_mib} MiB, {len(idx)} chunks, index {len(idx.encode())} bytes")
        print(f"chunk_file directly:        {direct:.3f} s ({mb / direct:.0f} MB/s)")
        for run in ("serve, run 1", "serve, run 2"):
            shutil.rmtree(st.layout.state_dir / "delta", ignore_errors=True)
            sp = start_serve(st.root, log_dir=tmp / "logs")
            try:
                CLIENT.get(f"{sp.url}/v2/")  # connected before the clock starts
                first = timed_referrers(sp.url, digest)
                second = timed_referrers(sp.url, digest)
                built = metric(sp.url, "index_build_seconds")
                print(f"{run}: first referrers {first:.3f} s ({mb / first:.0f} MB/s; "
                      f"server build {built:.3f} s), second {second * 1000:.1f} ms, "
                      f"builds {metric(sp.url, 'index_builds'):.0f}")
            finally:
                sp.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
