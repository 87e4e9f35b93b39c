"""Moving models: blobctl against its peers, in one run, as ratios.

Usage: python bench/transfer.py [--size-mib 1024] [--rounds 1] [--only export,push,...]

One model with one random (incompressible, like quantised weights) layer of --size-mib,
with an OCI image manifest so skopeo can copy it. Each blobctl command is a whole process
(start-up included), timed against the peer doing the same work on the same bytes:

* export .tar      vs GNU ``tar cf`` of the same files
* export .tar.zst  vs ``zstd -T0 -3`` of the same tar (throughput on the same bytes)
* import .tar      vs ``tar xf`` + ``sha256sum`` of the members
* import --hf-cache (hardlink) vs ``sha256sum`` of the file
* push             vs ``skopeo copy oci:LAYOUT docker://…`` to the same docker-registry;
  then the same push again (nothing to send)

Peak RSS is sampled every 10 ms with psutil. ``os.sync()`` before every run. With
``--rounds N`` blobctl and its peer alternate, and the medians are compared (the bench
machine is shared: compare within one run, never across runs). The uptime load average is
printed first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import compile_checkout  # noqa: E402
from tests.servers import DockerRegistry  # noqa: E402

REF = "bench.example/ns/model:q4"
Run = tuple[float, int]  # seconds, peak RSS MiB


def timed(cmd: list[str], env: dict[str, str] | None = None,
          stdout: int | None = None) -> tuple[float, int]:
    """Run cmd; return (seconds, peak RSS in MiB)."""
    import psutil

    os.sync()
    with tempfile.TemporaryFile() as err_f:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=stdout if stdout is not None else subprocess.DEVNULL,
                             stderr=err_f, env=env)
        ps = psutil.Process(p.pid)
        peak = 0
        while p.poll() is None:
            with contextlib.suppress(psutil.Error):
                rss = ps.memory_info().rss
                for c in ps.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        rss += c.memory_info().rss
                peak = max(peak, rss)
            time.sleep(0.01)
        dt = time.perf_counter() - t0
        if p.returncode != 0:
            err_f.seek(0)
            raise RuntimeError(f"{cmd} failed: {err_f.read().decode()[-2000:]}")
    return dt, peak >> 20


def blobctl(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli", *args]


def make_model(store: Path, size: int) -> tuple[Path, str]:
    """A store with one OCI-manifest model; returns (layer file, layer hex)."""
    sys.path.insert(0, str(ROOT))
    import hashlib

    from blobstore.manifest import Manifest
    from blobstore.name import ModelName
    from blobstore.store import Store

    st = Store(store)
    tmp = store / "layer.tmp"
    h = hashlib.sha256()
    with open(tmp, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 8 << 20))
            f.write(block)
            h.update(block)
            left -= len(block)
    digest, n = st.put_file(tmp, mode="move")
    cfg = b'{"model_format":"gguf","bench":true}'
    cd = st.put_bytes(cfg)
    doc = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                      "digest": str(cd), "size": len(cfg)},
           "layers": [{"mediaType": "application/vnd.ollama.image.model",
                       "digest": str(digest), "size": n}]}
    st.put_manifest(ModelName.parse(REF),
                    Manifest.decode(json.dumps(doc, separators=(",", ":")).encode()))
    return st.blob_path(digest), digest.hex


def row(label: str, ours: tuple[float, int], peer: tuple[float, int], peer_name: str,
        target: str) -> dict[str, object]:
    ratio = ours[0] / peer[0] if peer[0] else float("inf")
    print(f"{label:<24} blobctl {ours[0]:7.2f} s {ours[1]:5d} MiB | {peer_name:<22} "
          f"{peer[0]:7.2f} s {peer[1]:5d} MiB | ratio {ratio:5.2f} (target {target})",
          flush=True)
    return {"what": label, "blobctl_s": round(ours[0], 3), "blobctl_rss_mib": ours[1],
            "peer": peer_name, "peer_s": round(peer[0], 3), "peer_rss_mib": peer[1],
            "ratio": round(ratio, 3), "target": target}


def best(runs: list[Run]) -> Run:
    return (statistics.median(r[0] for r in runs), max(r[1] for r in runs))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--only", default="export,zstd,import,adopt,push")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON at the end")
    a = ap.parse_args()
    compile_checkout(ROOT)
    only = set(a.only.split(","))
    size = a.size_mib << 20
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    results = []
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, "
          f"{a.size_mib} MiB layer, {a.rounds} round(s)", flush=True)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/tmp")) as tmpd:
        w = Path(tmpd)
        store = w / "store"
        layer, hexd = make_model(store, size)
        s = ["--store", str(store)]
        rel = [str(p.relative_to(store)) for p in sorted((store / "blobs").iterdir())]
        rel.append(str(Path("manifests", *REF.replace(":", "/").split("/"))))

        def pair(fa: Callable[[], Run], fb: Callable[[], Run]) -> tuple[Run, Run]:
            """Alternate the two, round by round (load on a shared machine moves)."""
            ra, rb = [], []
            for _ in range(a.rounds):
                ra.append(fa())
                rb.append(fb())
            return best(ra), best(rb)

        if "export" in only or "import" in only or "zstd" in only:
            def exp() -> tuple[float, int]:
                (w / "a.tar").unlink(missing_ok=True)
                return timed(blobctl("export", REF, "-o", str(w / "a.tar"), *s), env)

            def gnu() -> tuple[float, int]:
                (w / "peer.tar").unlink(missing_ok=True)
                return timed(["tar", "cf", str(w / "peer.tar"), "-C", str(store), *rel])

            results.append(row("export .tar", *pair(exp, gnu), "GNU tar cf", "<= 1.2"))
        if "zstd" in only:
            def expz() -> tuple[float, int]:
                (w / "a.tar.zst").unlink(missing_ok=True)
                return timed(blobctl("export", REF, "-o", str(w / "a.tar.zst"), *s), env)

            def zstd() -> tuple[float, int]:
                (w / "peer.tar.zst").unlink(missing_ok=True)
                return timed(["zstd", "-q", "-T0", "-3", str(w / "a.tar"), "-o",
                              str(w / "peer.tar.zst")])

            results.append(row("export .tar.zst", *pair(expz, zstd), "zstd -T0 -3",
                               "<= 1.11 (>= 0.9x throughput)"))
        if "import" in only:
            def imp() -> tuple[float, int]:
                shutil.rmtree(w / "imp", ignore_errors=True)
                return timed(blobctl("import", str(w / "a.tar"), "--store", str(w / "imp")),
                             env)

            def xsum() -> tuple[float, int]:
                shutil.rmtree(w / "x", ignore_errors=True)
                (w / "x").mkdir()
                t1 = timed(["tar", "xf", str(w / "a.tar"), "-C", str(w / "x")])
                files = sorted(str(p) for p in (w / "x/blobs/sha256").iterdir())
                t2 = timed(["sha256sum", *files])
                return t1[0] + t2[0], max(t1[1], t2[1])

            results.append(row("import .tar", *pair(imp, xsum),
                               "tar xf + sha256sum", "<= 1.2"))
        if "adopt" in only:
            cache = w / "hub"
            repo = cache / "models--org--repo"
            (repo / "blobs").mkdir(parents=True)
            (repo / "refs").mkdir()
            (repo / "refs/main").write_text("r" * 40)
            blob = repo / "blobs" / hexd
            # a real GGUF header is needed: write a tiny GGUF + pad? adoption reads the
            # GGUF metadata, so the bench file is a valid GGUF followed by random bytes
            from tests.helpers import make_gguf

            g = make_gguf(w / "head.gguf").read_bytes()
            with open(blob, "wb") as f, open(layer, "rb") as src:
                f.write(g)
                shutil.copyfileobj(src, f, 8 << 20)
            import hashlib

            h = hashlib.sha256()
            with open(blob, "rb") as f:
                while b := f.read(8 << 20):
                    h.update(b)
            real = repo / "blobs" / h.hexdigest()
            blob.rename(real)
            snap = repo / "snapshots" / ("r" * 40)
            snap.mkdir(parents=True)
            (snap / "repo-Q4_K_M.gguf").symlink_to(os.path.relpath(real, snap))

            def adopt() -> tuple[float, int]:
                shutil.rmtree(w / "ad", ignore_errors=True)
                return timed(blobctl("import", "--hf-cache", str(cache), "--store",
                                     str(w / "ad")), env)

            results.append(row("adopt HF cache (link)",
                               *pair(adopt, lambda: timed(["sha256sum", str(real)])),
                               "sha256sum", "<= 1.1"))
        if "push" in only:
            # Each tool pushes into a registry of its own, fresh every round: distribution
            # stores blobs once per registry, and skopeo's blob-info cache would mount a blob
            # it pushed before instead of sending it.
            lay = w / "layout"
            subprocess.run(blobctl("export", REF, "-o", f"{lay}/", *s), env=env, check=True,
                           stderr=subprocess.DEVNULL)
            n = iter(range(1000))
            skopeo_env = {**os.environ, "HOME": str(w / "skopeo-home")}

            def fresh_registry() -> DockerRegistry:
                return DockerRegistry(w / f"reg{next(n)}").start()

            def ours() -> Run:
                reg = fresh_registry()
                try:
                    return timed(blobctl("push", REF, f"{reg.netloc}/b/m", "--insecure",
                                         "--quiet", *s), env)
                finally:
                    reg.stop()
                    shutil.rmtree(reg.root, ignore_errors=True)

            def skopeo() -> Run:
                reg = fresh_registry()
                try:
                    return timed(["skopeo", "copy", "--dest-tls-verify=false", "-q",
                                  f"oci:{lay}:{REF}", f"docker://{reg.netloc}/p/m:q4"],
                                 skopeo_env)
                finally:
                    reg.stop()
                    shutil.rmtree(reg.root, ignore_errors=True)

            results.append(row("push", *pair(ours, skopeo), "skopeo copy", "<= 0.9"))
            reg = fresh_registry()
            try:
                subprocess.run(blobctl("push", REF, f"{reg.netloc}/b/again", "--insecure",
                                       "--quiet", *s), env=env, check=True)
                again = timed(blobctl("push", REF, f"{reg.netloc}/b/again", "--insecure",
                                      "--quiet", *s), env)
            finally:
                reg.stop()
            print(f"{'push again':<24} blobctl {again[0]:7.2f} s {again[1]:5d} MiB "
                  f"(target < 1 s)", flush=True)
            results.append({"what": "push again", "blobctl_s": round(again[0], 3),
                            "blobctl_rss_mib": again[1], "target": "< 1 s"})
    if a.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
