"""Time `blobctl gc --max-size` (plan + apply) and `blobctl list` on a large store.

Usage: python bench/gc.py [--blobs 100000] [--manifests 20000] [--runs 3]

The store is synthetic: 20 000 manifests (compact registry JSON), each naming a unique
config, a unique model blob and 3 blobs from a shared pool; the rest of the 100 000 blobs
are unreferenced. GC is timed on a fresh store ("cold": the manifest index is empty, every
manifest is read) and on one listed before ("warm"). Blobs are sparse files
(``truncate``) of 1 MB-4 GB apparent size, so the cap arithmetic is realistic while the
disk stays nearly empty. Blob names are valid
digests but contents are not hashed by GC, so they are not real hashes. All files are
older than the 1 h grace period. Each gc run gets a freshly built store; times
are wall-clock for the whole `blobctl` process (start-up included).

The peer is coreutils: ``xargs rm`` of exactly the files the gc removed, ``find -empty
-delete`` of the emptied folders and a ``sync``, on another fresh copy of the store: the
bare cost of the removals, with no scan, plan, re-check or crash safety.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
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

OLD = time.time() - 7 * 86400


def build(root: Path, n_blobs: int, n_manifests: int, seed: int = 1) -> int:
    rng = random.Random(seed)
    blobs = root / "blobs"
    blobs.mkdir(parents=True)
    digests: list[tuple[str, int]] = []
    for i in range(n_blobs):
        h = hashlib.sha256(i.to_bytes(8, "little")).hexdigest()
        size = rng.randint(1 << 20, 4 << 30)
        p = blobs / f"sha256-{h}"
        with open(p, "wb") as f:
            f.truncate(size)
        os.utime(p, (OLD - 60 * 86400, OLD))  # atime older than any manifest
        digests.append((f"sha256:{h}", size))
    pool_start = 2 * n_manifests
    pool = digests[pool_start:pool_start + max(1, n_manifests // 4)]
    for i in range(n_manifests):
        cfg, model = digests[2 * i], digests[2 * i + 1]
        layers = [{"mediaType": "application/vnd.ollama.image.model",
                   "digest": model[0], "size": model[1]}]
        for d, s in rng.sample(pool, 3):
            layers.append({"mediaType": "application/vnd.ollama.image.template",
                           "digest": d, "size": s})
        doc = {"schemaVersion": 2,
               "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
               "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                          "digest": cfg[0], "size": cfg[1]},
               "layers": layers}
        p = root / "manifests" / "registry.ollama.ai" / f"ns{i % 100}" / f"m{i}" / "latest"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(json.dumps(doc, separators=(",", ":")).encode())
        t = OLD - rng.randint(0, 86400 * 30)  # varied "last use" via manifest mtime
        os.utime(p, (t, t))
    # Flush to disk, as a real store's files are: ext4 allocates blocks for new files
    # lazily, and unlinking a file that never got a block skips the block-freeing work
    # a real manifest's removal costs.
    os.sync()
    return sum(s for _, s in digests)


def referenced_bytes(root: Path) -> int:
    seen: dict[str, int] = {}
    for p in (root / "manifests").rglob("*"):
        if p.is_file():
            doc = json.loads(p.read_bytes())
            for d in [doc["config"], *doc["layers"]]:
                seen[d["digest"]] = d["size"]
    return sum(seen.values())


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    dt = time.perf_counter() - t0
    if p.returncode not in (0, 10):
        raise SystemExit(f"{cmd} failed ({p.returncode}): {p.stderr}")
    return dt, p.stdout


def rm_floor(root: Path, report: dict[str, object]) -> float:
    """Time coreutils removing exactly what a gc removed: the evicted manifests, then
    their emptied folders, then the blobs, then ``sync`` (gc fsyncs its changes). No
    planning, no re-checks, no crash safety: the floor of the work itself."""
    manifests = []
    for name in report["removed_models"]:  # type: ignore[attr-defined]
        host_path, _, tag = str(name).rpartition(":")
        manifests.append(str(root / "manifests" / host_path / tag))
    blobs = [str(root / "blobs" / d.replace(":", "-", 1))
             for d in report["removed_blobs"]]  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    for paths in (manifests, blobs):
        subprocess.run(["xargs", "-0", "rm", "-f", "--"], input="\0".join(paths).encode(),
                       check=True)
        if paths is manifests:
            subprocess.run(["find", str(root / "manifests"), "-mindepth", "1", "-type", "d",
                            "-empty", "-delete"], check=True)
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blobs", type=int, default=100_000)
    ap.add_argument("--manifests", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    compile_checkout(ROOT)
    blobctl = [sys.executable, "-m", "cli"]
    with tempfile.TemporaryDirectory() as tmp:
        pristine = Path(tmp) / "pristine"
        t0 = time.perf_counter()
        total = build(pristine, args.blobs, args.manifests)
        print(f"built {args.blobs} blobs / {args.manifests} manifests "
              f"({total / 1e12:.1f} TB apparent) in {time.perf_counter() - t0:.1f}s")
        env = dict(os.environ, BLOBCTL_STORE=str(pristine))
        floor = statistics.median(run([sys.executable, "-c", "pass"], env)[0]
                                  for _ in range(5))
        time.sleep(2.5)  # let the newest manifests leave the index's racy window
        cold_list = run([*blobctl, "list"], env)[0]  # fills the manifest index
        list_times = [run([*blobctl, "list"], env)[0] for _ in range(args.runs)]
        json_times = [run([*blobctl, "list", "--json"], env)[0] for _ in range(args.runs)]
        gc_times: dict[str, list[float]] = {"cold": [], "warm": []}
        rm_times: list[float] = []
        reports = []
        cap = referenced_bytes(pristine) // 2  # unreferenced blobs go, then LRU models
        for run_no in range(args.runs):
            for mode in ("cold", "warm"):
                # rebuild rather than copy: copying would fill sparse files with real zeros
                work = Path(tmp) / f"work{run_no}{mode}"
                build(work, args.blobs, args.manifests)
                env_w = dict(os.environ, BLOBCTL_STORE=str(work))
                time.sleep(2.5)  # both modes: let the file system settle after the build
                if mode == "warm":  # a store that has been listed before: index filled
                    run([*blobctl, "list"], env_w)
                dt, out = run([*blobctl, "gc", "--max-size", str(cap), "--json"], env_w)
                gc_times[mode].append(dt)
                reports.append(json.loads(out))
                shutil.rmtree(work)
            # the peer: coreutils rm removing exactly the files this gc removed
            work = Path(tmp) / f"work{run_no}rm"
            build(work, args.blobs, args.manifests)
            time.sleep(2.5)
            rm_times.append(rm_floor(work, reports[-1]))
            shutil.rmtree(work)
    r = reports[-1]
    rm_median = statistics.median(rm_times)
    print(f"python -c pass (floor)      {floor:6.3f} s")
    print(f"blobctl list (first, index cold) {cold_list:6.3f} s")
    print(f"blobctl list (index warm)   {statistics.median(list_times):6.3f} s  "
          f"(runs: {', '.join(f'{t:.3f}' for t in list_times)})")
    print(f"blobctl list --json (warm)  {statistics.median(json_times):6.3f} s")
    print(f"peer: rm + rmdir + sync of the same files {rm_median:6.3f} s  "
          f"(runs: {', '.join(f'{t:.3f}' for t in rm_times)})")
    for mode, times in gc_times.items():
        print(f"blobctl gc --max-size {cap / 1e12:.1f}TB, index {mode}: "
              f"{statistics.median(times):6.3f} s  (runs: {', '.join(f'{t:.3f}' for t in times)})"
              f"  = {statistics.median(times) / rm_median:.2f}x the rm peer")
    print(f"  last run: plan {r['plan_seconds']:.3f} s, apply {r['apply_seconds']:.3f} s")
    print(f"  evicted {len(r['removed_models'])} models, removed {len(r['removed_blobs'])} "
          f"blobs, cap met: {r['cap_met']}, {r['total_bytes_after'] / 1e12:.2f} TB left")


if __name__ == "__main__":
    main()
