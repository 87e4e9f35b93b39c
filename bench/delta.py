"""Delta updates of a synthetic GGUF: transferred share and time vs a full pull, in one run.

Usage: python bench/delta.py [--size-mib 1024] [--rate 20m] [--rounds 1] [--no-nginx]

Setup (all on 127.0.0.1): the real registry (Debian ``docker-registry``) behind Debian
``nginx`` with ``limit_rate`` per connection (as bench/pull.py) and an access log of the
bytes nginx sent per request (the registry-side count). A publisher store pushes v1 of a
GGUF-like model (header with a chat template, tensors of 8 MiB, no padding) with its chunk
index, and three v2 tags, each with its index:

* ``header``: the chat template grew by 7 bytes: every tensor shifted;
* ``tensors``: 5 % of the tensors changed;
* ``unrelated``: another file altogether (``unrelated-cold``: the same, with v1's index
  not made yet, so the decision chunks the first 64 MiB / eighth of v1 before giving up).

A client store holds v1 (its chunk index made once by ``blobctl index``: that time is the
chunking speed printed). Each round, for each scenario: ``blobctl pull`` of the v2 tag
into a fresh store (full pull) and into a copy of the client store (hardlinks: the delta
update). Printed: bytes nginx sent / blob size, and delta time / full time (medians).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import compile_checkout  # noqa: E402
from bench.pull import timed  # noqa: E402
from tests.servers import DockerRegistry, free_port  # noqa: E402

MiB = 1 << 20
TENSOR = 8 * MiB

NGINX_CONF = """
worker_processes 2;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format sent '$request_method $uri $status $bytes_sent';
    access_log {prefix}/access.log sent;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    upstream registry {{ server 127.0.0.1:{upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://registry;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_max_temp_file_size 0;
            limit_rate {rate};
        }}
    }}
}}
"""


def write_model(path: Path, n: int, *, template: str, seed: int,
                changed: set[int] | None = None) -> int:
    """A GGUF-like file of ``n`` tensors of 8 MiB (see tests/registry_client/deltamodels)."""
    tpl = template.encode()
    with open(path, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, n, 1) + struct.pack("<Q", 23)
                + b"tokenizer.chat_template" + struct.pack("<IQ", 8, len(tpl)) + tpl)
        for i in range(n):
            name = f"blk.{i}.weight".encode()
            f.write(struct.pack("<Q", len(name)) + name
                    + struct.pack("<IQIQ", 1, TENSOR, 0, i * TENSOR))
        for i in range(n):
            s = seed * 100_003 + i + (1_000_000 if changed and i in changed else 0)
            f.write(random.Random(s).randbytes(TENSOR))
    return path.stat().st_size


def cli(store: Path, *args: str) -> tuple[float, dict[str, object]]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    dt, _rss, out = timed([sys.executable, "-m", "cli", "--store", str(store), *args,
                           "--json"], env, cwd=ROOT)
    try:
        return dt, json.loads(out)
    except ValueError:  # JSON lines (progress, then the summary)
        lines = [x for x in out.splitlines() if x.strip()]
        return dt, json.loads(lines[-1]) if lines else {}


def import_model(store: Path, path: Path, ref: str) -> None:
    from blobstore.manifest import Manifest
    from blobstore.name import ModelName
    from blobstore.store import Store

    st = Store(store)
    d, size = st.put_file(path, mode="copy", unlink_source=False)
    cfg = json.dumps({"model_format": "gguf", "ref": ref}).encode()
    cd = st.put_bytes(cfg)
    doc = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                      "digest": str(cd), "size": len(cfg)},
           "layers": [{"mediaType": "application/vnd.ollama.image.model",
                       "digest": str(d), "size": size}]}
    st.put_manifest(ModelName.parse(ref),
                    Manifest.decode(json.dumps(doc, separators=(",", ":")).encode()))


class Nginx:
    def __init__(self, prefix: Path, upstream: int, rate: str) -> None:
        import httpx

        prefix.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = prefix / "access.log"
        conf = prefix / "nginx.conf"
        conf.write_text(NGINX_CONF.format(prefix=prefix, port=self.port, upstream=upstream,
                                          rate=rate))
        self.proc = subprocess.Popen(["nginx", "-p", str(prefix), "-c", str(conf)],
                                     stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                httpx.get(f"http://127.0.0.1:{self.port}/v2/", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("nginx did not start")

    def mark(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def blob_bytes(self, since: int) -> int:
        time.sleep(0.3)  # nginx writes the log line when the request ends
        with open(self.log, "rb") as f:
            f.seek(since)
            lines = f.read().decode().splitlines()
        return sum(int(x.split()[3]) for x in lines
                   if x.startswith("GET") and "/blobs/" in x.split()[1])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def chunking_speeds(mib: int = 256) -> None:
    """CPU GB/s per core of the chunkers on ``mib`` MiB of random bytes (the measurement
    behind the choice of pyfastcdc; ``fastcdc`` is measured only if it is installed)."""
    import resource

    import blake3
    import pyfastcdc

    from registry_client.delta.chunking import AVG, MAX, MIN

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    buf = os.urandom(mib * MiB)
    with tempfile.NamedTemporaryFile(dir=os.environ.get("TMPDIR")) as f:
        f.write(buf)
        f.flush()
        cdc = pyfastcdc.FastCDC(AVG, min_size=MIN, max_size=MAX)
        runs = [("pyfastcdc (buffer)", lambda: sum(1 for _ in cdc.cut_buf(buf))),
                ("pyfastcdc (file, mmap)", lambda: sum(1 for _ in cdc.cut_file(f.name))),
                ("blake3, one thread", lambda: len(blake3.blake3(buf).digest()))]
        try:
            from fastcdc import fastcdc_cy  # type: ignore[import-not-found]

            runs.append(("fastcdc 1.x (Cython)", lambda: sum(1 for _ in fastcdc_cy.fastcdc_cy(
                f.name, MIN, AVG + MIN, MAX, fat=False, hf=None))))
        except ImportError:
            pass
        for label, fn in runs:
            c0, t0 = cpu(), time.perf_counter()
            fn()
            dc, dt = cpu() - c0, time.perf_counter() - t0
            print(f"  {label:24s} {len(buf) / max(dc, 1e-9) / 1e9:5.2f} GB/s per core "
                  f"(wall {len(buf) / dt / 1e9:5.2f} GB/s)", flush=True)


FLOOR_SCRIPT = """
import hashlib, os, sys
src, dst = sys.argv[1], sys.argv[2]
h = hashlib.sha256()
buf = bytearray(8 << 20)
view = memoryview(buf)
with open(src, "rb", buffering=0) as f, open(dst, "wb", buffering=0) as g:
    while n := f.readinto(buf):
        g.write(view[:n])
        h.update(view[:n])
    os.fsync(g.fileno())
print(h.hexdigest())
"""


def local_copy(src: Path, dst: Path) -> float:
    """Seconds for a new process to copy ``src`` to ``dst`` while hashing it (sha256), then
    fsync, in one thread: what writing a verified 1:1 copy of a blob costs on this disk
    with no network at all (a reference for the update's time, not a strict bound: the
    update overlaps hashing and writing on two threads)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", FLOOR_SCRIPT, str(src), str(dst)], check=True,
                   stdout=subprocess.DEVNULL)
    dt = time.perf_counter() - t0
    dst.unlink()
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rate", default="20m", help="nginx limit_rate per connection")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--no-nginx", action="store_true", help="pull from the registry directly")
    args = ap.parse_args()
    compile_checkout(ROOT)
    print(f"chunking speed, {256} MiB of random bytes:")
    chunking_speeds()
    n = max(4, args.size_mib * MiB // TENSOR)
    work = Path(tempfile.mkdtemp(prefix="blobctl-bench-delta-", dir=os.environ.get("TMPDIR")))
    reg = DockerRegistry(work / "registry").start()
    nginx = None if args.no_nginx else Nginx(work / "nginx", reg.port, args.rate)
    front = f"127.0.0.1:{nginx.port if nginx else reg.port}"
    try:
        files = work / "files"
        files.mkdir()
        size = write_model(files / "v1", n, template="{{ .Prompt }}", seed=1)
        write_model(files / "header", n, template="{{ .Prompt }}\n<eos>", seed=1)
        write_model(files / "tensors", n, template="{{ .Prompt }}", seed=1,
                    changed=set(random.Random(5).sample(range(n), max(1, n // 20))))
        write_model(files / "unrelated", n, template="{{ .Prompt }}", seed=2)
        pub = work / "pub"
        for tag in ("v1", "header", "tensors", "unrelated"):
            import_model(pub, files / tag, f"example.com/bench/m:{tag}")
            (files / tag).unlink()
            t0 = time.perf_counter()
            cli(pub, "push", f"example.com/bench/m:{tag}", f"{reg.netloc}/bench/m:{tag}",
                "--insecure", "-q")
            print(f"pushed {tag} with its index in {time.perf_counter() - t0:.1f} s",
                  flush=True)
        tpl = work / "client"
        cli(tpl, "pull", f"{front}/bench/m:v1", "--insecure", "-q")
        shutil.rmtree(tpl / ".blobctl" / "delta", ignore_errors=True)
        _dt, doc = cli(tpl, "index", f"{front}/bench/m:v1")
        chunk_s = float(doc["layers"][0]["seconds"])  # type: ignore[index]
        index_bytes = int(doc["layers"][0]["index_bytes"])  # type: ignore[index]
        print(f"blob {size / MiB:.0f} MiB; chunk index of v1 (FastCDC + blake3, from disk): "
              f"{chunk_s:.2f} s = {size / chunk_s / 1e9:.2f} GB/s; index {index_bytes} bytes "
              f"= {100 * index_bytes / size:.3f} % of the blob", flush=True)
        results: dict[str, dict[str, list[float]]] = {}
        for rnd in range(args.rounds):
            for label in ("header", "tensors", "unrelated", "unrelated-cold"):
                tag = label.removesuffix("-cold")
                ref = f"{front}/bench/m:{tag}"
                r = results.setdefault(label, {"full": [], "delta": [], "sent": [],
                                               "full_sent": [], "copy": []})
                full = work / "full"
                shutil.rmtree(full, ignore_errors=True)
                mark = nginx.mark() if nginx else 0
                dt_full, _ = cli(full, "pull", ref, "--insecure", "-q")
                r["full"].append(dt_full)
                if nginx:
                    r["full_sent"].append(nginx.blob_bytes(mark))
                shutil.rmtree(full, ignore_errors=True)
                upd = work / "upd"
                shutil.rmtree(upd, ignore_errors=True)
                shutil.copytree(tpl, upd, copy_function=os.link)
                if label.endswith("-cold"):  # v1's index not made yet: the decision chunks
                    shutil.rmtree(upd / ".blobctl" / "delta")
                mark = nginx.mark() if nginx else 0
                dt_delta, summary = cli(upd, "pull", ref, "--insecure", "-q")
                r["delta"].append(dt_delta)
                sent = nginx.blob_bytes(mark) if nginx else int(summary["bytes_fetched"])  # type: ignore[call-overload]
                r["sent"].append(sent)
                shutil.rmtree(upd, ignore_errors=True)
                v1_blob = max((tpl / "blobs").iterdir(), key=lambda b: b.stat().st_size)
                copy_s = local_copy(v1_blob, work / "copy.tmp")
                r["copy"].append(copy_s)
                print(f"round {rnd + 1} {label:14s}: full {dt_full:6.2f} s, update "
                      f"{dt_delta:6.2f} s (ratio {dt_delta / dt_full:.2f}), local copy "
                      f"{copy_s:5.2f} s ({copy_s / dt_full:.2f} x full), sent {sent} bytes = "
                      f"{100 * sent / size:.2f} %, reused {summary.get('bytes_reused')} "
                      f"bytes, delta blobs {summary.get('delta_blobs')}", flush=True)
        from registry_client.pull import PullOptions, estimate

        for label in ("unrelated", "unrelated-cold", "header"):
            upd = work / "upd"
            shutil.rmtree(upd, ignore_errors=True)
            shutil.copytree(tpl, upd, copy_function=os.link)
            if label.endswith("-cold"):
                shutil.rmtree(upd / ".blobctl" / "delta")
            t0 = time.perf_counter()
            e = estimate(f"{front}/bench/m:{label.removesuffix('-cold')}", store=upd,
                         options=PullOptions(insecure=True))
            dt = time.perf_counter() - t0
            shutil.rmtree(upd, ignore_errors=True)
            print(f"decision ({label}, manifest + referrers + index + compare, in-process): "
                  f"{dt:.3f} s -> {'delta' if e.delta_blobs else 'plain pull'}", flush=True)
        print(f"\nsummary ({args.rounds} round(s), {size / MiB:.0f} MiB, "
              f"{'nginx limit_rate ' + args.rate if nginx else 'registry directly'}):")
        for tag, r in results.items():
            f, d = statistics.median(r["full"]), statistics.median(r["delta"])
            s = statistics.median(r["sent"])
            fl = statistics.median(r["copy"])
            print(f"  {tag:14s} transferred {100 * s / size:7.2f} %   update {d:6.2f} s vs "
                  f"full pull {f:6.2f} s = {d / f:.2f} x   (one-thread local copy+sha256+fsync "
                  f"{fl:.2f} s = {fl / f:.2f} x)")
    finally:
        if nginx:
            nginx.stop()
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
