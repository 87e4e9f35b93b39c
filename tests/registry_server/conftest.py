"""Fixtures for the server tests: stores with models, the app in a thread (uvicorn) and
``blobctl serve`` as a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from starlette.applications import Starlette

from blobstore import Manifest, ModelName, Store
from registry_server.app import close_app, create_app
from registry_server.context import OpenAccess, Policy, ServeOptions, ServerContext
from tests.servers import DOCKER_MANIFEST, OCI_MANIFEST, make_manifest, running_asgi

ROOT = Path(__file__).resolve().parents[2]
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MODEL_LAYER = "application/vnd.ollama.image.model"


def add_model(store: Store, name: str, layers: list[bytes], *, config: bytes | None = None,
              oci: bool = True, extra: dict[str, object] | None = None) -> bytes:
    """Put blobs and a manifest for ``name``; return the manifest bytes. ``extra`` adds
    top-level manifest fields (annotations, subject, artifactType)."""
    config = config if config is not None else b'{"architecture":"amd64","os":"linux"}'
    store.put_bytes(config)
    for b in layers:
        store.put_bytes(b)
    raw = make_manifest(config, [(MODEL_LAYER, b) for b in layers],
                        **({"media_type": OCI_MANIFEST, "config_type": OCI_CONFIG}
                           if oci else {"media_type": DOCKER_MANIFEST}))
    if extra:
        doc = json.loads(raw)
        doc.update(extra)
        raw = json.dumps(doc, separators=(",", ":")).encode()
    store.put_manifest(ModelName.parse(name), Manifest.decode(raw))
    return raw


APPS: dict[int, Starlette] = {}  # the app serving a context (for tests that tune it)


@contextmanager
def serving(store: Store, *, push: bool = False,
            policy: Policy | None = None) -> Iterator[tuple[str, ServerContext]]:
    """The app over ``store`` under uvicorn in a thread: (base URL, context)."""
    ctx = ServerContext(store, ServeOptions(push=push), policy=policy or OpenAccess())
    app = create_app(ctx, access_log=False)
    APPS[id(ctx)] = app
    try:
        with running_asgi(app) as url:
            yield url, ctx
    finally:
        APPS.pop(id(ctx), None)
        close_app(app)


@dataclass
class ServeProc:
    proc: subprocess.Popen[bytes]
    url: str
    startup: dict[str, object]
    stderr_path: Path

    @property
    def netloc(self) -> str:
        return self.url.removeprefix("http://")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def cli_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return env


def start_serve(store: Path, *args: str, log_dir: Path,
                env: dict[str, str] | None = None,
                preexec_fn: Callable[[], None] | None = None) -> ServeProc:
    """``python -m cli serve --listen 127.0.0.1:0 --json ARGS`` with its startup line read
    (``preexec_fn`` runs in the child before it starts: e.g. a low descriptor limit)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    err = log_dir / f"serve-{len(list(log_dir.iterdir()))}.log"
    with err.open("wb") as ef:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "--store", str(store), "serve", "--listen",
             "127.0.0.1:0", "--json", *args],
            stdout=subprocess.PIPE, stderr=ef, env={**cli_env(), **(env or {})}, cwd=ROOT,
            preexec_fn=preexec_fn)  # noqa: PLW1509 (tests pass setrlimit only: no locks)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        raise RuntimeError(f"serve did not start: {err.read_text()}")
    doc = json.loads(line)
    return ServeProc(proc, str(doc["url"]), doc, err)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


@pytest.fixture
def serve_proc(tmp_path: Path, store: Store) -> Iterator[ServeProc]:
    sp = start_serve(store.root, log_dir=tmp_path / "logs")
    try:
        yield sp
    finally:
        if sp.proc.poll() is None:
            sp.stop()
