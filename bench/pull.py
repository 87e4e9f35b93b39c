"""Pull a 1 GiB blob: blobctl vs aria2c -x16 (+ sha256) vs curl (+ sha256), in one run.

Usage: python bench/pull.py [--size-mib 1024] [--rounds 3] [--rate 20m] [--skip-curl]

Setup (all on 127.0.0.1): the real registry (Debian ``docker-registry``) holds a model
whose layer is SIZE MiB of random bytes, behind Debian ``nginx`` with ``limit_rate`` per
connection (``proxy_http_version 1.1``, ``proxy_max_temp_file_size 0`` so ranged requests
stream, and upstream keepalive as any proxy or CDN in front of a registry would have).
Peers, alternated each round:

* ``blobctl pull`` (download + verified commit into a fresh store);
* ``aria2c -x16 -s16 -k1M`` of the blob URL, then a sha256 of the file (hashlib, 1 MiB
  reads) and a compare: what "download + verify" costs with aria2c;
* ``curl`` of the blob URL, then the same sha256.

A straggler scenario repeats blobctl and aria2c with nginx serving any request that starts
at byte 0 at 1/20 of the rate (one connection far slower).

Before every timed run the page cache's dirty data is flushed (``sync``), so no tool pays
for the previous one's writeback. Printed per tool: median seconds, MB/s, ratio to aria2c,
its own CPU and the servers' (registry and nginx, from ``/proc``, during its runs) per
GiB, peak RSS (sampled with psutil) and bytes read back from the downloaded file for
verification (blobctl reports what its hasher read from storage, not the page cache;
the peers' separate hash pass reads the whole file, counted whole).
"""

from __future__ import annotations

import argparse
import contextlib
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
from tests.servers import DockerRegistry, free_port, sha  # noqa: E402

NGINX_CONF = """
worker_processes 2;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    map $http_range $slow {{ default 0; "~^bytes=0-" {straggler}; }}
    upstream registry {{ server 127.0.0.1:{upstream};{keepalive} }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://registry;
            proxy_http_version 1.1;
            {connection_header}
            proxy_max_temp_file_size 0;
            proxy_buffering on;
            set $limit_rate {rate};
            if ($slow) {{ set $limit_rate {slow_rate}; }}
        }}
    }}
}}
"""


def parse_rate(text: str) -> int:
    mult = {"k": 1024, "m": 1024**2}.get(text[-1].lower(), 1)
    return int(text.rstrip("kKmM")) * mult


class Nginx:
    def __init__(self, prefix: Path, upstream: int, rate: int, straggler: bool,
                 keepalive: bool = True) -> None:
        self.prefix = prefix
        self.port = free_port()
        prefix.mkdir(parents=True, exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(NGINX_CONF.format(prefix=prefix, port=self.port, upstream=upstream,
                                          rate=rate, slow_rate=max(1, rate // 20),
                                          straggler=1 if straggler else 0,
                                          keepalive=" keepalive 64;" if keepalive else "",
                                          connection_header='proxy_set_header Connection "";'
                                          if keepalive else ""))
        self.proc = subprocess.Popen(["nginx", "-p", str(prefix), "-c", str(conf)],
                                     stderr=subprocess.PIPE)
        for _ in range(100):
            try:
                import httpx
                httpx.get(f"http://127.0.0.1:{self.port}/v2/", timeout=1)
                return
            except Exception:
                time.sleep(0.05)
        raise RuntimeError("nginx did not start")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


LAST_CPU = [0.0]  # user + sys seconds of the last timed() child
LAST_SERVER_CPU = [0.0]  # user + sys seconds the servers spent during it
SERVER_PIDS: list[int] = []  # the registry's and nginx's processes (master and workers)


def server_cpu() -> float:
    """User + sys seconds the server processes have used so far: on a machine whose cores
    the servers share with the client, a client's request pattern costs wall time there."""
    import psutil

    total = 0.0
    for pid in SERVER_PIDS:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


def serve_with(*procs: subprocess.Popen[bytes] | None) -> None:
    """Count these processes and their children as the servers from now on."""
    import psutil

    SERVER_PIDS.clear()
    for p in procs:
        if p is not None:
            SERVER_PIDS.append(p.pid)
            with contextlib.suppress(psutil.Error):
                SERVER_PIDS.extend(c.pid for c in psutil.Process(p.pid).children(True))


def timed(cmd: list[str], env: dict[str, str] | None = None,
          cwd: Path | None = None) -> tuple[float, int, str]:
    """Run cmd; return (seconds, peak RSS in KiB, stdout); its CPU goes to LAST_CPU.

    RSS is sampled every 10 ms with psutil (wait4's ru_maxrss would include this bench
    process's own high-water mark, which a child inherits across fork and exec); CPU
    (user + sys) comes from wait4's rusage of the child.
    """
    import psutil

    os.sync()  # start every run with no writeback left over from the previous tool
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        s0 = server_cpu()
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, env=env, cwd=cwd)
        ps = psutil.Process(p.pid)
        peak = 0
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            with contextlib.suppress(psutil.Error):
                peak = max(peak, ps.memory_info().rss)
            time.sleep(0.01)
        dt = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        LAST_CPU[0] = usage.ru_utime + usage.ru_stime
        LAST_SERVER_CPU[0] = server_cpu() - s0
        out_f.seek(0)
        err_f.seek(0)
        if p.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed: {err_f.read().decode()[-2000:]}")
        return dt, peak // 1024, out_f.read().decode()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return "sha256:" + h.hexdigest()


def run_blobctl(ref: str, work: Path, connections: str, reader: str = "",
                root: Path = ROOT) -> dict[str, float]:
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(root), BLOBCTL_RANGE_READER=reader)
    dt, rss, out = timed([sys.executable, "-m", "cli", "pull", ref, "--insecure", "--json",
                          "--connections", connections, "--store", str(store)], env, cwd=root)
    summary = json.loads(out.strip().splitlines()[-1])
    return {"seconds": dt, "rss_kib": rss, "read_back": summary["bytes_read_back"],
            "cpu": LAST_CPU[0], "server_cpu": LAST_SERVER_CPU[0]}


CURL_RANGES = """
set -e
n={n}; size={size}; step=$(( (size + n - 1) / n ))
for i in $(seq 0 $((n - 1))); do
  a=$((i * step)); b=$((a + step - 1)); [ $b -ge {size} ] && b=$(({size} - 1))
  curl -sSf -r $a-$b -o /dev/null "{url}" &
done
wait
"""


def run_curl_ranges(url: str, size: int, n: int) -> dict[str, float]:
    """The practical wire limit: n parallel curl ranges into /dev/null, no hashing."""
    dt, rss, _ = timed(["bash", "-c", CURL_RANGES.format(n=n, size=size, url=url)])
    return {"seconds": dt, "rss_kib": rss, "read_back": 0, "cpu": LAST_CPU[0],
            "server_cpu": LAST_SERVER_CPU[0]}


def run_peer(cmd: list[str], target: Path, digest: str) -> dict[str, float]:
    target.unlink(missing_ok=True)
    t0 = time.perf_counter()
    _, rss, _ = timed(cmd)
    ok = sha256_file(target) == digest
    dt = time.perf_counter() - t0
    if not ok:
        raise RuntimeError(f"{cmd[0]} produced a wrong file")
    size = target.stat().st_size
    target.unlink()
    return {"seconds": dt, "rss_kib": rss, "read_back": size, "cpu": LAST_CPU[0],
            "server_cpu": LAST_SERVER_CPU[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rate", default="20m", help="nginx limit_rate per connection")
    ap.add_argument("--connections", default="auto")
    ap.add_argument("--skip-curl", action="store_true")
    ap.add_argument("--baseline", default="",
                    help="a checkout of another blobctl version to time in the same rounds "
                         "(e.g. a git worktree of the previous release)")
    ap.add_argument("--baseline-connections", default="16")
    ap.add_argument("--httpx", action="store_true",
                    help="also time blobctl with httpx for range bodies (no RangeReader)")
    ap.add_argument("--scenarios", default="plain,straggler,nokeepalive",
                    help="plain (upstream keepalive), straggler, nokeepalive")
    ap.add_argument("--also-connections", default="",
                    help="extra blobctl --connections values to time in the same rounds")
    args = ap.parse_args()
    compile_checkout(ROOT)
    if args.baseline:
        compile_checkout(Path(args.baseline))
    rate = parse_rate(args.rate)
    size = args.size_mib << 20
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="blobctl-bench-") as tmp:
        work = Path(tmp)
        reg = DockerRegistry(work / "registry").start()
        try:
            print(f"generating and pushing a {args.size_mib} MiB layer …", flush=True)
            data = os.urandom(size)
            digest = sha(data)
            reg.push("bench/model", "1", b'{"model_format":"gguf"}',
                     [("application/vnd.ollama.image.model", data)])
            del data
            extra = [x for x in args.also_connections.split(",") if x]
            for scenario in args.scenarios.split(","):
                ngx = Nginx(work / f"nginx-{scenario}", reg.port, rate, scenario == "straggler",
                            keepalive=scenario != "nokeepalive")
                try:
                    serve_with(reg.proc, ngx.proc)
                    base = f"127.0.0.1:{ngx.port}"
                    url = f"http://{base}/v2/bench/model/blobs/{digest}"
                    out = work / "peer.bin"
                    for r in range(args.rounds):
                        print(f"{scenario} round {r + 1}/{args.rounds}", flush=True)
                        results.setdefault(f"blobctl/{scenario}", []).append(
                            run_blobctl(f"{base}/bench/model:1", work, args.connections))
                        for c in extra:
                            results.setdefault(f"blobctl-c{c}/{scenario}", []).append(
                                run_blobctl(f"{base}/bench/model:1", work, c))
                        if args.baseline:
                            results.setdefault(f"baseline/{scenario}", []).append(
                                run_blobctl(f"{base}/bench/model:1", work,
                                            args.baseline_connections,
                                            root=Path(args.baseline)))
                        if args.httpx:
                            results.setdefault(f"blobctl-httpx/{scenario}", []).append(
                                run_blobctl(f"{base}/bench/model:1", work, args.connections,
                                            "httpx"))
                        results.setdefault(f"aria2c/{scenario}", []).append(run_peer(
                            ["aria2c", "-q", "-x16", "-s16", "-k1M", "--allow-overwrite=true",
                             "--auto-file-renaming=false", "-d", str(work), "-o", out.name, url],
                            out, digest))
                        if scenario != "straggler":
                            results.setdefault(f"curl32/{scenario}", []).append(
                                run_curl_ranges(url, size, 32))
                        if scenario == "plain" and not args.skip_curl and r == 0:
                            results.setdefault("curl/plain", []).append(run_peer(
                                ["curl", "-sSf", "-o", str(out), url], out, digest))
                finally:
                    ngx.stop()
        finally:
            reg.stop()
    mb = size / 1e6
    print(f"\n{args.size_mib} MiB blob, nginx limit_rate {args.rate} per connection, "
          f"blobctl --connections {args.connections}, median of {args.rounds} rounds "
          f"(curl: 1 round); machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    print(f"{'tool/scenario':24} {'seconds':>8} {'runs':>22} {'MB/s':>7} {'vs aria2c':>9} "
          f"{'vs curl32':>9} {'CPU s/GiB':>9} {'servers':>8} {'peak RSS':>9} {'read back':>10}")
    gib = size / 2**30
    for key, runs in results.items():
        secs = statistics.median(x["seconds"] for x in runs)
        _tool, scenario = key.split("/")
        ref = statistics.median(x["seconds"] for x in results[f"aria2c/{scenario}"])
        c32 = results.get(f"curl32/{scenario}")
        vs32 = f"{secs / statistics.median(x['seconds'] for x in c32):8.2f}x" if c32 else ""
        cpu = statistics.median(x["cpu"] for x in runs) / gib
        srv = statistics.median(x["server_cpu"] for x in runs) / gib
        spread = "-".join(f"{x:.2f}" for x in (min(x["seconds"] for x in runs),
                                                 max(x["seconds"] for x in runs)))
        rss = max(x["rss_kib"] for x in runs) / 1024
        back = max(x["read_back"] for x in runs)
        print(f"{key:24} {secs:8.2f} {spread:>22} {mb / secs:7.1f} {secs / ref:8.2f}x "
              f"{vs32:>9} {cpu:9.2f} {srv:8.2f} {rss:7.0f}MiB {back / 2**20:8.1f}MiB")
    if "blobctl/plain" in results and "blobctl/straggler" in results:
        plain = statistics.median(x["seconds"] for x in results["blobctl/plain"])
        strag = statistics.median(x["seconds"] for x in results["blobctl/straggler"])
        print(f"blobctl straggler / plain: {strag / plain:.2f}x")


if __name__ == "__main__":
    main()
