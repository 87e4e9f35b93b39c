"""A cold pull through the mirror vs a direct pull from the upstream, in one run.

Usage: python bench/mirror.py [--size-mib 256] [--rounds 3] [--rate 20m] [--via serve|library]

Setup (all on 127.0.0.1): the real registry (Debian ``docker-registry``) holds a model whose
layer is SIZE MiB of random bytes, behind Debian ``nginx`` with ``limit_rate`` per
connection (``bench/pull.py``'s front: what a registry on the internet looks like). Peers,
alternated each round, each into a fresh store:

* **direct**: ``blobctl pull NGINX/bench/mirror:1`` (16 connections);
* **mirror** (``--via serve``, the issue's figure): ``blobctl serve --upstream
  http://NGINX --insecure-upstream`` on a fresh (cold) store, then ``blobctl pull
  SERVE/bench/mirror:1`` against it, timed from the client's start to its end (the
  serve process is started before the clock starts);
* **mirror** (``--via library``, where the routes are not built yet): the mirror
  (``registry_server.mirror.UpstreamMirror``) called in-process as the routes call it, the
  manifest and then every blob stream consumed by a client that writes the bytes to a
  file and hashes them (what a one-stream client does).

Prints medians and the ratio mirror ÷ direct (target ≤ 1.2). :func:`measure` is the
function ``bench/serve.py`` can call.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import compile_checkout  # noqa: E402
from bench.pull import Nginx, parse_rate, run_blobctl  # noqa: E402
from tests.servers import DockerRegistry, sha  # noqa: E402

REPO, TAG = "bench/mirror", "1"


def _serve(store: Path, upstream: str, root: Path) -> tuple[subprocess.Popen[bytes], str]:
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--listen", "127.0.0.1:0",
                             "--upstream", upstream, "--insecure-upstream", "--json",
                             "--store", str(store)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env, cwd=root)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        raise RuntimeError("blobctl serve did not start (are the routes and --upstream "
                           "wired in this checkout?)")
    url = json.loads(line)["url"]
    return proc, url.removeprefix("http://").rstrip("/")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_serve_mirror(upstream: str, work: Path, root: Path = ROOT) -> dict[str, float]:
    """Cold pull through ``blobctl serve --upstream``; seconds of the client's pull."""
    served = work / "served"
    shutil.rmtree(served, ignore_errors=True)
    proc, netloc = _serve(served, upstream, root)
    try:
        result = run_blobctl(f"{netloc}/{REPO}:{TAG}", work, "16", root=root)
    finally:
        _stop(proc)
    return result


def run_library_mirror(upstream: str, work: Path) -> dict[str, float]:
    """Cold fetch through ``UpstreamMirror`` in-process; a client writes and hashes."""
    from blobstore.digest import Digest
    from blobstore.manifest import Manifest
    from blobstore.name import ModelName
    from blobstore.store import Store
    from registry_server.mirror import UpstreamMirror, parse_upstream

    served = work / "served"
    shutil.rmtree(served, ignore_errors=True)
    host, url = parse_upstream(upstream, insecure=True)
    mirror = UpstreamMirror(Store(served), {host: url}, insecure=True)
    name = ModelName(host, *REPO.split("/"), TAG)
    out = work / "client.bin"

    async def client() -> None:
        got = await mirror.manifest(name, TAG)
        assert got is not None
        for desc in Manifest.decode(got.body).descriptors:
            blob = await mirror.blob(name, desc.digest)
            assert blob is not None
            h = hashlib.sha256()
            with open(out, "wb") as f:
                async for block in blob[1]:
                    f.write(block)
                    h.update(block)
            assert Digest(desc.digest.algorithm, h.hexdigest()) == desc.digest

    os.sync()
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    asyncio.run(client())
    dt = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    mirror.wait_idle(120)
    mirror.close()
    out.unlink(missing_ok=True)
    return {"seconds": dt, "cpu": cpu, "rss_kib": 0, "read_back": 0}


def measure(size_mib: int = 256, rounds: int = 3, rate: str = "20m", via: str = "serve",
            root: Path = ROOT) -> dict[str, list[dict[str, float]]]:
    """Time direct pulls and cold mirror pulls (alternated); the runs per peer."""
    size = size_mib << 20
    results: dict[str, list[dict[str, float]]] = {"direct": [], f"mirror-{via}": []}
    with tempfile.TemporaryDirectory(prefix="blobctl-bench-mirror-") as tmp:
        work = Path(tmp)
        reg = DockerRegistry(work / "registry").start()
        try:
            data = os.urandom(size)
            digest = sha(data)
            reg.push(REPO, TAG, b'{"model_format":"gguf"}',
                     [("application/vnd.ollama.image.model", data)])
            del data
            ngx = Nginx(work / "nginx", reg.port, parse_rate(rate), False)
            try:
                base = f"127.0.0.1:{ngx.port}"
                for r in range(rounds):
                    print(f"round {r + 1}/{rounds}", flush=True)
                    results["direct"].append(run_blobctl(f"{base}/{REPO}:{TAG}", work, "16",
                                                         root=root))
                    if via == "serve":
                        results["mirror-serve"].append(
                            run_serve_mirror(f"http://{base}", work, root))
                    else:
                        results["mirror-library"].append(
                            run_library_mirror(f"http://{base}", work))
            finally:
                ngx.stop()
            del digest
        finally:
            reg.stop()
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", default="20m", help="nginx limit_rate per connection")
    ap.add_argument("--via", choices=("serve", "library"), default="serve")
    ap.add_argument("--root", type=Path, default=ROOT,
                    help="the checkout whose blobctl runs (serve and pull)")
    args = ap.parse_args()
    compile_checkout(args.root)
    results = measure(args.size_mib, args.rounds, args.rate, args.via, args.root)
    mb = (args.size_mib << 20) / 1e6
    print(f"\n{args.size_mib} MiB layer, nginx limit_rate {args.rate} per connection, "
          f"median of {args.rounds} rounds; {os.cpu_count()} cores")
    med = {k: statistics.median(x["seconds"] for x in v) for k, v in results.items() if v}
    for key, secs in med.items():
        runs = ", ".join(f"{x['seconds']:.2f}" for x in results[key])
        print(f"{key:16} {secs:7.2f} s  {mb / secs:7.1f} MB/s  runs: {runs}")
    mirror = next(k for k in med if k.startswith("mirror"))
    print(f"cold mirror / direct: {med[mirror] / med['direct']:.2f}x (target <= 1.2)")


if __name__ == "__main__":
    main()
