"""GC beside a running ``ollama pull`` (spec/gc.md, "Never deleted"). Ollama downloads
every layer of a model (finished ones renamed to ``blobs/sha256-<hex>``, the rest still
``-partial``) and writes the manifest only once it has verified them all
(server/images.go PullModel): until then its finished layers are unreferenced. Found from
outside: a pull running longer than the grace lost its finished layers to ``gc`` (and to
the automatic GC after a blobctl pull), while GC kept its ``-partial`` files, and the
pull then failed. While any Ollama download is live, no unreferenced blob goes; models
are still evicted under a cap."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore.digest import Digest
from blobstore.errors import CapNotMet
from blobstore.gc import GCOptions, GCReport, gc
from blobstore.store import Store
from tests.blobstore.gcutil import add_model, held

GRACE = 3600.0
NOW = time.time() + 2 * GRACE  # every file made now is older than the grace then


def _run(store: Store, opts: GCOptions, hook: object = None) -> GCReport:
    try:
        return gc(store, opts, now=NOW, hook=hook)  # type: ignore[arg-type]
    except CapNotMet as exc:  # (a cap of 0 is not met while anything is kept)
        report = getattr(exc, "report", None)
        assert isinstance(report, GCReport)
        return report


@pytest.mark.timeout(120)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ages=st.lists(st.sampled_from(["old", "young"]), max_size=3),
       live=st.sampled_from(["none", "stale", "data open", "data young", "part young",
                             "starts during gc"]),
       cap=st.booleans())
def test_no_unreferenced_blob_goes_while_ollama_downloads(ages: list[str], live: str,
                                                         cap: bool) -> None:
    root = Path(tempfile.mkdtemp(prefix="blobctl-olp-"))
    store = Store(root / "s")
    try:
        model = add_model(store, "team/old:1", [b"GGUF old weights"])
        blobs = store.layout.blobs
        layers = []
        for i, age in enumerate(ages):  # the pull's finished layers
            data = f"layer {i}".encode()
            path = blobs / Digest.of_bytes(data).filename
            path.write_bytes(data)
            if age == "young":
                os.utime(path, (NOW - 60, NOW - 60))
            layers.append(path)
        data_file = blobs / f"{Digest.of_bytes(b'big layer').filename}-partial"
        part = data_file.with_name(data_file.name + "-0")

        def start_download() -> None:
            data_file.write_bytes(b"\0" * 4096)
            part.write_text('{"N":0,"Offset":0,"Size":4096,"Completed":0}')
            if live in ("data young", "starts during gc"):
                os.utime(data_file, (NOW - 60, NOW - 60))
            if live == "part young":
                os.utime(part, (NOW - 60, NOW - 60))

        if live not in ("none", "starts during gc"):
            start_download()

        def hook(step: str) -> None:  # right after the plan, before any blob goes
            if step == "intent-written" and live == "starts during gc" and not part.exists():
                start_download()

        opts = GCOptions(grace=GRACE, ingest_grace=GRACE, max_size=0 if cap else None)
        with held(data_file, "open") if live == "data open" else contextlib.nullcontext():
            r = _run(store, opts, hook)
        downloading = live not in ("none", "stale")
        old = [p for p, age in zip(layers, ages, strict=True) if age == "old"]
        for p, age in zip(layers, ages, strict=True):
            assert p.exists() == (downloading or age == "young"), (p.name, age, r.to_json())
        kept = r.to_json()["kept_for_ollama"]
        if downloading and (old or live != "starts during gc"):
            # (one that starts after the plan is seen by the re-check of the orphans:
            # with none to remove, nothing is looked at again)
            assert isinstance(kept, dict), r.to_json()
            assert kept["blobs"] == len(old)
            assert kept["bytes"] == sum(p.stat().st_size for p in old)
            assert "Ollama download is running" in kept["reason"]
            assert data_file.exists() and part.exists()
        elif not downloading:
            assert kept is None, r.to_json()
            assert not data_file.exists() and not part.exists()  # stale: gone
        # a referenced model is still evicted under a cap (its blobs with it)
        assert (str(model) in r.removed_models) == cap
        assert store.has_model(model) != cap
    finally:
        store.close()
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def _ollama_process(folder: Path) -> Iterator[int]:
    """A process named ``ollama`` (a copy of ``sleep``), as an Ollama server shows."""
    import subprocess

    exe = folder / "ollama"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", exe)
    proc = subprocess.Popen([str(exe), "120"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.timeout(120)
@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(old=st.integers(1, 3), young=st.booleans(), running=st.booleans())
def test_between_layers_and_while_verifying_no_partial_is_there(
        tmp_path_factory: pytest.TempPathFactory, old: int, young: bool,
        running: bool) -> None:
    """Between two layers, and while Ollama verifies all layers before it writes the
    manifest, no ``-partial`` file is there: a layer the pull finished just now (younger
    than the grace) with an Ollama process running keeps every unreferenced blob (found
    from outside: the pull's older layers went, and Ollama failed after the download).
    No Ollama process: GC as ever (the young one stays by the grace alone)."""
    root = tmp_path_factory.mktemp("olv")
    store = Store(root / "s")
    now = time.time()
    layers = []
    for i in range(old):
        d = store.put_bytes(f"finished long ago {i}".encode())
        os.utime(store.layout.blob(d), (now - 3 * GRACE, now - 3 * GRACE))
        layers.append(d)
    fresh = store.put_bytes(b"finished just now") if young else None
    with (_ollama_process(root) if running else contextlib.nullcontext()):
        report = gc(store, GCOptions(grace=GRACE), now=now)
    kept = all(store.has_blob(d) for d in layers)
    assert kept == (young and running), report
    if fresh is not None:
        assert store.has_blob(fresh)
    if young and running:
        assert report.ollama_download and "ollama[" in report.ollama_download



@pytest.mark.timeout(60)
@pytest.mark.parametrize("running", [False, True])
def test_a_guessed_ollama_pull_evicts_no_model_for_the_cap(tmp_path: Path,
                                                           running: bool) -> None:
    """A young unreferenced blob with an Ollama process running is only a guess that a
    pull runs (an interrupted blobctl pull leaves one too): the old orphans stay, and no
    model is evicted in their place; the cap waits (found by review: a model used a
    minute ago was evicted while 360 KB of garbage stayed)."""
    store = Store(tmp_path / "s")
    now = time.time()
    model = add_model(store, "team/used:1", [b"GGUF used" * 1000])
    store.record_use(model, now - 60)
    old = store.put_bytes(b"garbage" * 50_000)
    for p in store.layout.blobs.iterdir():
        os.utime(p, (now - 5 * GRACE, now - 5 * GRACE))
    store.put_bytes(b"a layer just finished")
    with (_ollama_process(tmp_path) if running else contextlib.nullcontext()):
        report = _run_at(store, GCOptions(grace=GRACE, max_size=20_000), now)
    assert [e.name for e in store.list_models()] == [model]
    assert store.has_blob(old) == running
    assert report.cap_met == (not running)
    if running:
        assert "no model is evicted" in (report.cap_reason or "")


def _run_at(store: Store, opts: GCOptions, now: float) -> GCReport:
    try:
        return gc(store, opts, now=now)
    except CapNotMet as exc:
        report = getattr(exc, "report", None)
        assert isinstance(report, GCReport)
        return report
