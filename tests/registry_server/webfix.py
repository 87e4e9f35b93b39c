"""Fixtures for the web page tests: a real store filled by real pulls from a local
registry (FaultServer), the page served by uvicorn, and headless Debian chromium."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette

from blobstore import Store
from registry_client import PullOptions, pull
from registry_server import web
from registry_server.context import ServeOptions, ServerContext
from tests.servers import DOCKER_MANIFEST, FaultServer, running_asgi, sha

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
MODEL_MT = "application/vnd.ollama.image.model"


def model_manifest(config: bytes, layers: list[bytes],
                   annotations: dict[str, str] | None = None) -> bytes:
    doc: dict[str, Any] = {
        "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "digest": sha(config), "size": len(config)},
        "layers": [{"mediaType": MODEL_MT if i == 0 else "application/vnd.ollama.image.params",
                    "digest": sha(b), "size": len(b)} for i, b in enumerate(layers)]}
    if annotations:
        doc["annotations"] = annotations
    return json.dumps(doc, separators=(",", ":")).encode()


def serve_model(srv: FaultServer, repo: str, tag: str, layers: list[bytes],
                annotations: dict[str, str] | None = None) -> str:
    """Put a model on the registry; returns the name to pull it by."""
    config = json.dumps({"model_format": "gguf", "model_family": repo.rsplit("/", maxsplit=1)[-1]}).encode()
    srv.add_blob(config)
    for b in layers:
        srv.add_blob(b)
    raw = model_manifest(config, layers, annotations)
    srv.manifests[(repo, tag)] = (raw, DOCKER_MANIFEST)
    srv.manifests[(repo, sha(raw))] = (raw, DOCKER_MANIFEST)
    return f"{srv.netloc}/{repo}:{tag}"


@dataclass
class Fixture:
    store: Store
    ctx: ServerContext
    registry: FaultServer
    names: list[str]          # pulled, full names
    shared: bytes             # a layer two models share


def fill_store(root: Path, srv: FaultServer, count: int = 3, *,
               size: int = 150_000) -> tuple[Store, list[str], bytes]:
    """``count`` models pulled for real: sizes differ, two share a layer, one is
    ``standard`` tier by annotation."""
    store = Store(root)
    shared = os.urandom(size // 3)
    names = []
    for i in range(count):
        layers = [os.urandom(size * (i + 1))]
        if i < 2:
            layers.append(shared)
        ann = {"org.blobctl.tier": "standard"} if i == 1 else None
        names.append(serve_model(srv, f"lab/model{i}", "q4", layers, ann))
    for n in names:
        pull(n, store=store, options=PullOptions(insecure=True, auto_gc=False))
    return store, names, shared


@contextmanager
def page_server(ctx: ServerContext, **kw: Any) -> Iterator[str]:
    app = Starlette(routes=web.routes(ctx, **kw))
    try:
        with running_asgi(app) as url:
            yield url
    finally:
        web.close(ctx)


def make_ctx(store: Store, policy: Any = None) -> ServerContext:
    ctx = ServerContext(store=store, options=ServeOptions())
    if policy is not None:
        ctx.policy = policy
    return ctx


def need_browser() -> None:
    """In CI a missing browser fails the run (``.ci/run`` installs it); elsewhere skip."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("python selenium")
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"browser test needs {', '.join(missing)} (.ci/run installs them)")
        pytest.skip(f"browser test needs {', '.join(missing)} "
                    "(apt-get install chromium chromium-driver; pip install selenium)")


@contextmanager
def browser(*, javascript: bool = True, width: int = 1280, height: int = 1000) -> Iterator[Any]:
    """Headless Debian chromium driven by chromedriver; always quit."""
    need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              f"--window-size={width},{height}", "--disable-extensions"):
        opts.add_argument(a)
    if not javascript:
        opts.add_argument("--blink-settings=scriptEnabled=false")
        opts.add_experimental_option("prefs", {"profile.managed_default_content_settings"
                                               ".javascript": 2})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()


def wait_for(pred: Any, timeout: float = 20.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)
