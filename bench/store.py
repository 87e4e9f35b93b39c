"""Time `blobctl --help` and `blobctl list` on a synthetic store of N models.

Usage: python bench/store.py [--models 1000] [--runs 7]

Each model gets its own manifest (registry-style compact JSON), a small config blob and a
model blob; every 10 models share one template blob, as real stores share layers. Times are
wall-clock for a whole `blobctl` process (start-up included), median of --runs, compared in
the same run with `python -c pass` (the interpreter's own start-up) as the floor.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import compile_checkout  # noqa: E402


def put(blobs: Path, data: bytes) -> dict[str, object]:
    h = hashlib.sha256(data).hexdigest()
    p = blobs / f"sha256-{h}"
    if not p.exists():
        p.write_bytes(data)
    return {"digest": f"sha256:{h}", "size": len(data)}


def make_store(root: Path, n: int) -> None:
    blobs = root / "blobs"
    blobs.mkdir(parents=True)
    for i in range(n):
        cfg = put(blobs, json.dumps({"model_format": "gguf", "i": i}).encode())
        model = put(blobs, b"GGUF" + i.to_bytes(8, "little") * 8)
        tmpl = put(blobs, f"template {i // 10}".encode())
        doc = {"schemaVersion": 2,
               "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
               "config": {"mediaType": "application/vnd.docker.container.image.v1+json", **cfg},
               "layers": [{"mediaType": "application/vnd.ollama.image.model", **model},
                          {"mediaType": "application/vnd.ollama.image.template", **tmpl}]}
        p = root / "manifests" / "registry.ollama.ai" / f"ns{i % 50}" / f"model{i}" / "latest"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(json.dumps(doc, separators=(",", ":")).encode())


def timed(cmd: list[str], runs: int, env: dict[str, str]) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    compile_checkout(ROOT)
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "store"
        make_store(root, args.models)
        env["BLOBCTL_STORE"] = str(root)
        blobctl = [sys.executable, "-m", "cli"]
        floor = timed([sys.executable, "-c", "pass"], args.runs, env)
        help_t = timed([*blobctl, "--help"], args.runs, env)
        list_t = timed([*blobctl, "list"], args.runs, env)
        json_t = timed([*blobctl, "list", "--json"], args.runs, env)
    print(f"models: {args.models}, runs: {args.runs} (median wall-clock per process)")
    print(f"python -c pass        {floor * 1000:7.1f} ms   (interpreter start-up floor)")
    print(f"blobctl --help        {help_t * 1000:7.1f} ms   ({help_t / floor:.2f}x the floor)")
    print(f"blobctl list          {list_t * 1000:7.1f} ms   ({list_t / floor:.2f}x the floor)")
    print(f"blobctl list --json   {json_t * 1000:7.1f} ms   ({json_t / floor:.2f}x the floor)")


if __name__ == "__main__":
    main()
