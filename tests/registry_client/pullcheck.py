"""Shared pieces of the searching pull tests: models pushed to the real registry, store
invariants checked straight from the files, a hard time bound with a stack dump, and a
bounded ``blobctl`` subprocess.

The invariants read the store's files directly (not through ``Store``), so a bug in the
store's own bookkeeping cannot hide a bad blob: every file under ``blobs/`` must be named
``sha256-<hex>`` and hash to that name; a model's manifest file exists only after a
successful pull and then holds exactly the registry's bytes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.servers import DOCKER_MANIFEST, DockerRegistry, make_manifest

ROOT = Path(__file__).resolve().parents[2]
MODEL = "application/vnd.ollama.image.model"
PARAMS = "application/vnd.ollama.image.params"
KiB = 1 << 10
MiB = 1 << 20
_POOL = random.Random(20261129).randbytes(8 * MiB + 4096)
_BLOB_NAME = re.compile(r"^sha256-[0-9a-f]{64}$")
_seq = itertools.count(1)
_clients: dict[str, httpx.Client] = {}


def random_bytes(size: int, salt: int) -> bytes:
    """``size`` random bytes (up to 8 MiB), different for each ``salt``."""
    off = (salt * 7919) % 4096
    assert size + off <= len(_POOL)
    return _POOL[off:off + size]


@dataclass
class PushedModel:
    repo: str
    tag: str
    raw: bytes                         # the manifest bytes the registry serves
    blobs: dict[str, bytes] = field(default_factory=dict)  # "<hex>" -> content

    @property
    def path_match(self) -> str:
        """A substring of every blob path of this model (to count and fault only it)."""
        return f"/v2/{self.repo}/blobs/"

    @property
    def total(self) -> int:
        return sum(len(b) for b in self.blobs.values())

    def ref(self, netloc: str) -> str:
        return f"{netloc}/{self.repo}:{self.tag}"

    def manifest_file(self, store: Path, netloc: str) -> Path:
        ns, name = self.repo.split("/")
        return store / "manifests" / netloc / ns / name / self.tag


def push_model(registry: DockerRegistry, layer_sizes: list[int]) -> PushedModel:
    """Push config + layers of random bytes to a new repository of the real registry.

    Like ``DockerRegistry.push`` (POST an upload, PUT the bytes with the digest), but over
    one kept-alive client and without the HEAD probes: it runs once per example.
    """
    n = next(_seq)
    repo = f"fault/m{os.getpid()}x{n}"
    config = json.dumps({"model_format": "gguf", "model_family": "llama", "n": n}).encode()
    layers = [(MODEL if i == 0 else PARAMS, random_bytes(size, n * 16 + i))
              for i, size in enumerate(layer_sizes)]
    client = _clients.get(registry.url)
    if client is None:
        client = _clients[registry.url] = httpx.Client(base_url=registry.url, timeout=60)
    blobs: dict[str, bytes] = {}
    for data in [config, *(b for _, b in layers)]:
        hexd = hashlib.sha256(data).hexdigest()
        if hexd in blobs:
            continue
        r = client.post(f"/v2/{repo}/blobs/uploads/")
        assert r.status_code == 202, (r.status_code, r.text)
        loc = httpx.URL(registry.url).join(r.headers["Location"])
        r = client.put(loc.copy_merge_params({"digest": f"sha256:{hexd}"}), content=data,
                       headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 201, (r.status_code, r.text)
        blobs[hexd] = data
    raw = make_manifest(config, layers)
    r = client.put(f"/v2/{repo}/manifests/t", content=raw,
                   headers={"Content-Type": DOCKER_MANIFEST})
    assert r.status_code == 201, (r.status_code, r.text)
    return PushedModel(repo, "t", raw, blobs)


# ---------------------------------------------------------------------- invariants
def blob_files(store: Path) -> dict[str, Path]:
    d = store / "blobs"
    return {p.name: p for p in d.iterdir()} if d.is_dir() else {}


def assert_blobs_honest(store: Path) -> None:
    """Every file under ``blobs/`` is named sha256-<hex> and hashes to that name."""
    for name, p in blob_files(store).items():
        assert _BLOB_NAME.match(name), f"unexpected file in blobs/: {name}"
        h = hashlib.sha256(p.read_bytes()).hexdigest()
        assert h == name.removeprefix("sha256-"), f"blob {name} holds bytes hashing to {h}"


def assert_pulled(store: Path, model: PushedModel, netloc: str, *,
                  ingest_clean: bool = True) -> None:
    """After a success: every blob present and right, the manifest is the registry's,
    and (``ingest_clean``) no ingest folder is left for the model's blobs."""
    assert_blobs_honest(store)
    files = blob_files(store)
    for hexd in model.blobs:
        assert f"sha256-{hexd}" in files, f"blob {hexd[:12]} missing after a successful pull"
    mf = model.manifest_file(store, netloc)
    assert mf.is_file(), "no manifest after a successful pull"
    assert mf.read_bytes() == model.raw, "manifest bytes differ from the registry's"
    ingest = store / ".blobctl" / "ingest"
    left = [p.name for p in ingest.iterdir()] if ingest.is_dir() and ingest_clean else []
    assert not [x for x in left if x.removeprefix("sha256-") in model.blobs], (
        f"ingest folders left after a successful pull: {left}")


def assert_failed_cleanly(store: Path, model: PushedModel, netloc: str) -> None:
    """After a failure: no manifest for the model, and no blob that lies about its name."""
    assert not model.manifest_file(store, netloc).exists(), "manifest written by a failed pull"
    assert_blobs_honest(store)


# ---------------------------------------------------------------------- time bounds
def thread_stacks() -> str:
    """Every thread's stack, identical stacks grouped (16 idle workers read as one)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    groups: dict[str, list[str]] = {}
    for ident, frame in sys._current_frames().items():
        stack = "".join(traceback.format_stack(frame))
        groups.setdefault(stack, []).append(names.get(ident, str(ident)))
    return "\n".join(f"--- {len(who)} thread(s): {', '.join(sorted(who)[:6])}\n{stack}"
                     for stack, who in groups.items())


def run_bounded(fn: Callable[[], Any], bound: float, what: str) -> tuple[Any, BaseException | None]:
    """Run ``fn`` in a worker thread for at most ``bound`` seconds.

    Returns (result, None) or (None, the exception it raised). A call still running after
    the bound is a test failure (a hang: AssertionError) that shows every thread's stack. The worker is a
    daemon thread on purpose: a hung pull is left behind (it cannot be stopped from
    outside) and must never keep the test session from exiting.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=target, name="pull-under-test", daemon=True)
    t.start()
    t.join(bound)
    if t.is_alive():
        # an AssertionError (not pytest.fail(pytrace=False)) keeps hypothesis' notes: the
        # falsifying example is printed with it
        raise AssertionError(f"HANG: {what} still running after {bound:g} s\n"
                             f"{thread_stacks()}")
    return box.get("result"), box.get("error")


def cli(*args: str, module: str = "cli", env: dict[str, str] | None = None,
        ) -> subprocess.Popen[str]:
    """Start a real ``python -m cli`` process (or another ``module`` of the worktree), with
    faulthandler on: SIGABRT makes it dump every thread's stack."""
    full = {**os.environ, **(env or {}), "PYTHONFAULTHANDLER": "1"}
    full["PYTHONPATH"] = str(ROOT) + os.pathsep + full.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=full, cwd=ROOT)


def finish(proc: subprocess.Popen[str], timeout: float, what: str) -> tuple[int, str, str]:
    """Wait for ``proc`` at most ``timeout`` s; a process still running is a HANG failure
    (its threads' stacks, dumped by faulthandler on SIGABRT, go into the message)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        raise AssertionError(f"HANG: {what} still running after {timeout:g} s\n"
                             f"stderr (faulthandler dump):\n{err[-12000:]}") from None
    return proc.returncode, out, err
