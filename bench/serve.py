"""``blobctl serve`` against nginx and the real docker-registry, in one run.

Usage: python bench/serve.py [--size-mib 1024] [--rounds 3] [--heads 200]
                             [--stacks zerocopy,h11,...] [--skip-pull]

Setup (all on 127.0.0.1): a store holding one model whose layer is SIZE MiB of random
bytes; ``blobctl serve`` on it (one process per server stack measured: ``zerocopy`` =
uvicorn's httptools protocol with our sendfile extension on the asyncio loop, ``h11`` =
uvicorn's default protocol, ``httptools``, ``httptools+uvloop``); Debian ``nginx`` serving
the very same blob file as a static file (``sendfile on``; config written to a temp dir);
the real registry (Debian ``docker-registry``) holding the same model (pushed with
``blobctl push``) behind nginx as a plain proxy (``proxy_http_version 1.1``,
``proxy_max_temp_file_size 0``, upstream keepalive; no rate limit). Peers, alternated each
round:

1. one whole-blob GET with ``curl -o /dev/null``: serve vs nginx static;
2. ``blobctl pull`` (16 connections, verified commit into a fresh store): from serve vs
   from nginx in front of docker-registry;
3. ``--heads`` concurrent manifest HEADs (one connection each, asyncio + httpx): p50/p99
   latency for serve and for docker-registry (direct).

Prints medians and the ratios the issue asks for (serve ÷ peer throughput, ≥ 0.8 and ≥ 0.7).
"""

from __future__ import annotations

import argparse
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
from bench.pull import timed  # noqa: E402
from tests.servers import DockerRegistry, free_port  # noqa: E402

NGINX_CONF = """
worker_processes 2;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream registry {{ server 127.0.0.1:{upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location = /blob {{ alias {blob}; default_type application/octet-stream; }}
        location / {{
            proxy_pass http://registry;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_max_temp_file_size 0;
        }}
    }}
}}
"""

MODEL = "library/big:1"
REPO = "ns/big"


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli", *args]


def make_store(store: Path, size_mib: int) -> str:
    """A store with MODEL: an OCI manifest over a SIZE MiB random layer; its digest."""
    from blobstore import Manifest, ModelName, Store

    st = Store(store)
    blob = store.parent / "layer.bin"
    with open(blob, "wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(1 << 20))
    digest, size = st.put_file(blob)
    blob.unlink()
    cfg = b'{"architecture":"amd64","os":"linux"}'
    cfg_digest = st.put_bytes(cfg)
    raw = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": str(cfg_digest), "size": len(cfg)},
        "layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": str(digest),
                    "size": size}]}, separators=(",", ":")).encode()
    st.put_manifest(ModelName.parse(MODEL), Manifest.decode(raw))
    st.close()
    return str(digest)


class Serve:
    def __init__(self, store: Path, stack: str) -> None:
        self.proc = subprocess.Popen(
            cli("--store", str(store), "serve", "--listen", "127.0.0.1:0", "--json"),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=dict(env(), BLOBCTL_SERVE_STACK=stack), cwd=ROOT)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"serve ({stack}) did not start")
        self.url = json.loads(line)["url"]
        import psutil

        self.ps = psutil.Process(self.proc.pid)
        self.netloc = self.url.removeprefix("http://")

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Nginx:
    def __init__(self, prefix: Path, upstream: int, blob: Path) -> None:
        import httpx

        self.port = free_port()
        prefix.mkdir(parents=True, exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(NGINX_CONF.format(prefix=prefix, port=self.port, upstream=upstream,
                                          blob=blob))
        self.proc = subprocess.Popen(["nginx", "-p", str(prefix), "-c", str(conf)],
                                     stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        for _ in range(100):
            try:
                httpx.get(self.url + "/v2/", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("nginx did not start")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def curl_get(url: str, size: int) -> float:
    dt, _, out = timed(["curl", "-sSf", "-o", "/dev/null", "-w", "%{size_download}", url])
    if int(out) != size:
        raise RuntimeError(f"curl got {out} bytes of {size}")
    return dt


def pull(ref: str, work: Path) -> float:
    store = work / "pulled"
    shutil.rmtree(store, ignore_errors=True)
    dt, _, _ = timed(cli("pull", ref, "--insecure", "--json", "--connections", "16",
                         "--store", str(store)), env(), cwd=ROOT)
    shutil.rmtree(store, ignore_errors=True)
    return dt


def heads(url: str, n: int) -> tuple[float, float]:
    """p50/p99 seconds of ``n`` concurrent manifest HEADs: one ``curl --parallel`` (a C
    client, so the figure is the server's, not a Python client's), each on its own
    connection, ``time_total`` per transfer; one warm-up batch first."""
    cfg = "".join(f'url = "{url}"\noutput = "/dev/null"\n' for _ in range(n))
    cmd = ["curl", "-sS", "--parallel", "--parallel-immediate", "--parallel-max", str(n),
           "-I", "-H", "Accept: application/vnd.oci.image.manifest.v1+json",
           "-w", "%{http_code} %{time_total}\n", "-K", "-"]
    for _ in range(2):
        out = subprocess.run(cmd, input=cfg, capture_output=True, text=True, check=True).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()]
    if len(rows) != n or any(code != "200" for code, _ in rows):
        raise RuntimeError(f"HEADs failed: {out[-500:]}")
    lat = sorted(float(t) for _, t in rows)
    return statistics.median(lat), lat[min(n - 1, int(0.99 * n))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--heads", type=int, default=200)
    ap.add_argument("--stacks", default="zerocopy,h11")
    ap.add_argument("--skip-pull", action="store_true")
    args = ap.parse_args()
    compile_checkout(ROOT)
    size = args.size_mib << 20
    stacks = args.stacks.split(",")
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    work.chmod(0o755)  # nginx workers (another user when run as root) read the blob
    servers: dict[str, Serve] = {}
    reg = ngx = None
    try:
        digest = make_store(work / "store", args.size_mib)
        blob_file = work / "store" / "blobs" / digest.replace(":", "-")
        reg = DockerRegistry(work / "registry").start()
        subprocess.run(cli("--store", str(work / "store"), "push", MODEL,
                           f"{reg.netloc}/{REPO}:1", "--insecure", "--quiet"),
                       check=True, env=env(), cwd=ROOT, stdout=subprocess.DEVNULL)
        ngx = Nginx(work / "nginx", reg.port, blob_file)
        for s in stacks:
            servers[s] = Serve(work / "store", s)
        res: dict[str, list[float]] = {}
        cpu: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for s, srv in servers.items():
                c0 = srv.cpu()
                res.setdefault(f"curl serve[{s}]", []).append(
                    curl_get(f"{srv.url}/v2/library/big/blobs/{digest}", size))
                cpu.setdefault(s, []).append(srv.cpu() - c0)
            res.setdefault("curl nginx", []).append(curl_get(f"{ngx.url}/blob", size))
            if not args.skip_pull:
                first = servers[stacks[0]]
                res.setdefault(f"pull serve[{stacks[0]}]", []).append(
                    pull(f"{first.netloc}/{MODEL}", work))
                res.setdefault("pull nginx+docker-registry", []).append(
                    pull(f"127.0.0.1:{ngx.port}/{REPO}:1", work))
        lat: dict[str, tuple[float, float]] = {}
        for s, srv in servers.items():
            lat[f"serve[{s}]"] = heads(f"{srv.url}/v2/library/big/manifests/1", args.heads)
        lat["docker-registry"] = heads(f"{reg.url}/v2/{REPO}/manifests/1", args.heads)

        print(f"\n{args.size_mib} MiB blob, {args.rounds} rounds (median seconds, MB/s)")
        med = {k: statistics.median(v) for k, v in res.items()}
        for k, v in med.items():
            print(f"  {k:36s} {v:7.3f} s  {size / v / 1e6:8.0f} MB/s")
        for s in stacks:
            print(f"  server CPU per whole-blob GET, serve[{s}]: "
                  f"{statistics.median(cpu[s]):.3f} s")
        print("ratios (serve throughput ÷ peer):")
        for s in stacks:
            print(f"  curl serve[{s}] / nginx static: "
                  f"{med['curl nginx'] / med[f'curl serve[{s}]']:.2f}  (target >= 0.8)")
        if not args.skip_pull:
            print(f"  pull serve[{stacks[0]}] / nginx+docker-registry: "
                  f"{med['pull nginx+docker-registry'] / med[f'pull serve[{stacks[0]}]']:.2f}"
                  "  (target >= 0.7)")
        print(f"{args.heads} concurrent manifest HEADs (p50 / p99 ms):")
        for k, (p50, p99) in lat.items():
            print(f"  {k:36s} {p50 * 1000:7.1f} / {p99 * 1000:7.1f}")
        ours = lat[f"serve[{stacks[0]}]"][1]
        print(f"  p99 serve[{stacks[0]}] / docker-registry: "
              f"{ours / lat['docker-registry'][1]:.2f}")
    finally:
        for srv in servers.values():
            srv.stop()
        if ngx is not None:
            ngx.stop()
        if reg is not None:
            reg.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
