"""``import --move`` raced against a GC loop in another process: the user's only copy
is never lost (blobstore/importer.py, spec/gc.md)."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore.digest import Digest
from blobstore.errors import BlobctlError
from blobstore.importer import import_gguf
from blobstore.name import ModelName
from blobstore.store import Store
from tests.blobstore.gcutil import assert_no_missing_blobs
from tests.helpers import make_gguf

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 50

GC_LOOP = """
import sys, time
from pathlib import Path
from blobstore.errors import BlobctlError
from blobstore.gc import GCOptions, fork_is_safe, gc
from blobstore.store import Store

store = Store(sys.argv[1])
stop = Path(sys.argv[2])
runs = 0
while not stop.exists():
    # grace 0 for blobs and ingests, as 'blobctl gc --grace 0 --ingest-grace 0'; every
    # other run as a pull's auto-GC would (a cap no model needs to go for)
    cap = None if runs % 2 else 1 << 50
    try:
        gc(store, GCOptions(grace=0, ingest_grace=0, max_size=cap, lock_timeout=60,
                            fork=fork_is_safe()))
    except BlobctlError as exc:
        print(f"gc: {exc}", file=sys.stderr, flush=True)
    runs += 1
print(runs, flush=True)
"""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_not_lost(store: Store, name: ModelName, src: Path, want: str) -> str:
    """Where the bytes are now: "store", "source" (or both); fail if nowhere."""
    where = []
    if src.exists() and _sha(src) == want:
        where.append("source")
    if store.has_model(name):
        layer = store.get_manifest(name).model_layer()
        assert layer is not None and layer.digest == Digest("sha256", want)
        blob = store.layout.existing_blob(layer.digest)
        assert blob is not None, f"{name}: manifest written but its blob is gone"
        assert _sha(blob) == want
        where.append("store")
    assert where, f"the bytes of {src.name} are neither in the store nor at the source"
    return "+".join(where)


@pytest.mark.timeout(900)
@settings(max_examples=1, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**32 - 1))
def test_import_move_against_a_gc_loop_never_loses_the_source(seed: int) -> None:
    """50 moves: in this process (also of bytes the store holds as an unreferenced blob
    the GC loop is about to sweep), and by a ``blobctl import --move`` killed at a random
    instant. After each, the bytes are in the store or at the source path."""
    rng = random.Random(seed)
    kinds = ["move", "dedupe", "killed", "move"]
    rounds = [(kinds[i % len(kinds)], rng.uniform(-0.2, 0.3)) for i in range(ROUNDS)]
    tmp = Path(tempfile.mkdtemp(prefix="blobctl-move-"))
    stop = tmp / "stop"
    gc_proc: subprocess.Popen[str] | None = None
    try:
        big = make_gguf(tmp / "big.gguf", n_embd=1024, n_vocab=4096)  # 20 MiB
        store = Store(tmp / "s")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        gc_proc = subprocess.Popen([sys.executable, "-c", GC_LOOP, str(store.root), str(stop)],
                                   cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        outcomes: dict[str, int] = {}
        for i, (how, delay) in enumerate(rounds):
            src = tmp / f"model-{i}.gguf"
            shutil.copyfile(big, src)
            with open(src, "ab") as f:  # a tail of its own: a digest of its own
                f.write(f"round {i}".encode())
            os.utime(src, (1000, 1000))  # an old file, as a user's download would be
            want = _sha(src)
            name = ModelName.parse(f"moved/m{i}")
            if how == "dedupe":
                # the very bytes are in the store already, as an unreferenced blob the
                # GC loop is about to sweep
                twin = ModelName.parse(f"twin/m{i}")
                import_gguf(store, src, twin, mode="copy")
                store.remove_model(twin)
                store.put_file(src, mode="copy")
            if how == "killed":
                p = subprocess.Popen(
                    [sys.executable, "-m", "cli", "--store", str(store.root), "import",
                     str(src), "--name", str(name), "--move"],
                    cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.3 + delay)  # interpreter start-up, then somewhere in the work
                p.send_signal(signal.SIGKILL)
                p.wait(30)
            else:
                try:
                    import_gguf(store, src, name, mode="move")
                except BlobctlError as exc:  # allowed, as long as the bytes are kept
                    outcomes[f"error {type(exc).__name__}"] = (
                        outcomes.get(f"error {type(exc).__name__}", 0) + 1)
                else:
                    assert not src.exists()
            where = _check_not_lost(store, name, src, want)
            outcomes[f"{how}: {where}"] = outcomes.get(f"{how}: {where}", 0) + 1
        stop.touch()
        out, err = gc_proc.communicate(timeout=120)
        assert gc_proc.returncode == 0, err
        assert int(out.strip()) >= 5, "the GC loop hardly ran"
        assert "Traceback" not in err, err
        assert_no_missing_blobs(store)
        print(outcomes)
    finally:
        stop.touch()
        if gc_proc is not None and gc_proc.poll() is None:
            gc_proc.kill()
            gc_proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
