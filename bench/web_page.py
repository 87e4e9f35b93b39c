"""Time the web page of ``blobctl serve`` (``GET /`` and its JSON twins) for N models.

Usage: python bench/web_page.py [--models 10,100,1000] [--runs 5]

The store is real but small-bodied: each model has its own config and model blob
(1-4 KiB of random bytes) and shares one params blob with every other model, written
through ``Store.put_bytes``/``put_manifest``. Half the models are older than GC's grace
period and a cap is set, so the page's GC plan has work to do. The page is served by
uvicorn on loopback (``tests/servers.running_asgi``) and fetched with httpx; the figure
is the median wall time of ``--runs`` requests after one warm-up request.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
from starlette.applications import Starlette

from blobstore import Manifest, ModelName, Store
from registry_server import web
from registry_server.context import ServeOptions, ServerContext
from tests.servers import running_asgi


def build(root: Path, n: int) -> Store:
    store = Store(root)
    shared = store.put_bytes(os.urandom(2048))
    old = time.time() - 7200
    for i in range(n):
        cfg_data = json.dumps({"model_format": "gguf", "i": i}).encode()
        cfg = store.put_bytes(cfg_data)
        blob = os.urandom(1024 * (1 + i % 4))
        model = store.put_bytes(blob)
        doc = {"schemaVersion": 2,
               "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
               "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                          "digest": str(cfg), "size": len(cfg_data)},
               "layers": [{"mediaType": "application/vnd.ollama.image.model",
                           "digest": str(model), "size": len(blob)},
                          {"mediaType": "application/vnd.ollama.image.params",
                           "digest": str(shared), "size": 2048}]}
        raw = json.dumps(doc, separators=(",", ":")).encode()
        name = ModelName.parse(f"lab/model{i:05d}:q4")
        path = store.put_manifest(name, Manifest.decode(raw))
        if i % 2 == 0:
            os.utime(path, (old, old))
            store.record_use(name, old + i)
    total = store.disk_usage().total_bytes
    store.set_config("max-size", str(total * 9 // 10))
    return store


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="10,100,1000")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    print(f"{'models':>7} {'GET / ms':>9} {'models JSON ms':>15} {'usage JSON ms':>14} "
          f"{'page KB':>8}")
    for n in (int(x) for x in args.models.split(",")):
        with tempfile.TemporaryDirectory() as d:
            store = build(Path(d) / "store", n)
            ctx = ServerContext(store=store, options=ServeOptions())
            with running_asgi(Starlette(routes=web.routes(ctx))) as url, \
                    httpx.Client(base_url=url, timeout=120) as c:
                row = []
                size = 0
                for path in ("/", "/ui/api/models", "/ui/api/usage"):
                    c.get(path).raise_for_status()
                    times = []
                    for _ in range(args.runs):
                        t0 = time.perf_counter()
                        r = c.get(path)
                        times.append(time.perf_counter() - t0)
                        r.raise_for_status()
                    if path == "/":
                        size = len(r.content)
                        assert r.text.count('data-name="') == n
                    row.append(statistics.median(times) * 1000)
            web.close(ctx)
        print(f"{n:>7} {row[0]:>9.0f} {row[1]:>15.0f} {row[2]:>14.0f} {size / 1024:>8.0f}")


if __name__ == "__main__":
    main()
