"""Pull an image of many small layers: blobctl vs skopeo, in one run.

Usage: python bench/layers.py [--layers 300] [--size 1000] [--rounds 5] [--baseline DIR]

Setup (127.0.0.1): the real registry (Debian ``docker-registry``) holds an OCI image of
LAYERS layers of SIZE random bytes each (``application/vnd.oci.image.layer.v1.tar``; a
split model or a container image of many small layers). Peers, alternated each round,
each into a fresh folder:

* ``blobctl pull`` (HEADs, download, verified commit of every blob into a store);
* ``skopeo copy docker://… dir:…`` (download and digest check of every blob into a
  folder; skopeo is the independent OCI client the tests use);
* with ``--baseline``, ``blobctl pull`` of another checkout (a git worktree of the
  previous version).

Before every timed run the page cache's dirty data is flushed (``sync``). Printed per
tool: median wall seconds of the rounds (first included), its CPU (user + sys) and the
ratio to skopeo.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import compile_checkout  # noqa: E402
from tests.servers import OCI_MANIFEST, DockerRegistry  # noqa: E402

LAYER = "application/vnd.oci.image.layer.v1.tar"
CONFIG = "application/vnd.oci.image.config.v1+json"


def timed(cmd: list[str], *, cwd: Path | None = None,
          env: dict[str, str] | None = None) -> tuple[float, float]:
    """Wall and CPU seconds (user + sys of the command and its children) of one run."""
    subprocess.run(["sync"], check=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=300)
    ap.add_argument("--size", type=int, default=1000, help="bytes per layer")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--baseline", default="",
                    help="a checkout of another blobctl version to time in the same rounds")
    args = ap.parse_args()
    if shutil.which("skopeo") is None:
        raise SystemExit("skopeo is not installed (apt-get install -y skopeo)")
    checkouts = [("blobctl", ROOT)]
    if args.baseline:
        checkouts.append(("baseline", Path(args.baseline).resolve()))
    for _, root in checkouts:
        compile_checkout(root)
    work = Path(tempfile.mkdtemp(prefix="blobctl-bench-layers-"))
    reg = DockerRegistry(work / "registry").start()
    try:
        layers = [(LAYER, os.urandom(args.size)) for _ in range(args.layers)]
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": []}}).encode()
        reg.push("bench/layers", "1", config, layers, media_type=OCI_MANIFEST,
                 config_type=CONFIG)
        ref = f"{reg.netloc}/bench/layers:1"
        times: dict[str, list[tuple[float, float]]] = {}
        for r in range(args.rounds):
            for name, root in checkouts:
                dest = work / f"store-{name}"
                shutil.rmtree(dest, ignore_errors=True)
                env = {**os.environ, "PYTHONPATH": str(root)}
                times.setdefault(name, []).append(timed(
                    [sys.executable, "-m", "cli", "pull", ref, "--insecure", "--quiet",
                     "--store", str(dest)], cwd=root, env=env))
                got = len(list((dest / "blobs").iterdir()))
                if got != args.layers + 1:
                    raise SystemExit(f"{name}: {got} blobs, expected {args.layers + 1}")
            dest = work / "skopeo"
            shutil.rmtree(dest, ignore_errors=True)
            times.setdefault("skopeo", []).append(timed(
                ["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{ref}",
                 f"dir:{dest}"]))
            print(f"round {r + 1}: " + ", ".join(
                f"{k} {v[-1][0]:.2f} s" for k, v in times.items()), flush=True)
    finally:
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)
    peer = statistics.median(w for w, _ in times["skopeo"])
    print(f"\n{args.layers} layers of {args.size} bytes, median of {args.rounds} rounds "
          "(first included), 127.0.0.1, docker-registry")
    print(f"{'tool':<10} {'wall s':>7} {'cpu s':>7} {'/ skopeo':>9}")
    for name, runs in times.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        print(f"{name:<10} {wall:7.2f} {cpu:7.2f} {wall / peer:8.2f}x")


if __name__ == "__main__":
    main()
