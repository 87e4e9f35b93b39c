"""Helpers to build stores for GC tests through the public store API."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from blobstore.digest import Digest
from blobstore.manifest import CONFIG_DOCKER, LAYER_MODEL, Descriptor, build_manifest
from blobstore.name import ModelName
from blobstore.store import Store


def add_model(store: Store, ref: str, layers: list[bytes], *, config: bytes | None = None,
              used: float | None = None) -> ModelName:
    name = ModelName.parse(ref)
    descs = [Descriptor(mediaType=LAYER_MODEL, digest=store.put_bytes(b), size=len(b))
             for b in layers]
    cfg = config if config is not None else f'{{"model":"{ref}"}}'.encode()
    cdesc = Descriptor(mediaType=CONFIG_DOCKER, digest=store.put_bytes(cfg), size=len(cfg))
    store.put_manifest(name, build_manifest(cdesc, descs))
    if used is not None:
        store.record_use(name, when=used)
    return name


def blob_total(store: Store) -> int:
    return sum(st.st_size for d, _, st in store.iter_blob_files() if d is not None)


def assert_no_missing_blobs(store: Store) -> None:
    for e in store.list_models():
        assert e.manifest is not None, e.path
        missing = store.missing_blobs(e.manifest)
        assert not missing, f"{e.name} lost {missing}"


def digest_of(data: bytes) -> Digest:
    return Digest.of_bytes(data)


_HOLDER = """
import mmap, os, sys, time
f = open(sys.argv[1], "rb")
if sys.argv[2] == "map":
    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    f.close()                    # only the mapping keeps it in use
print("holding", flush=True)
time.sleep(120)
"""


@contextlib.contextmanager
def held(path: Path | str, how: str = "map") -> Iterator[subprocess.Popen[str]]:
    """Another process holds ``path`` (``map``: memory-mapped; ``open``: an open file)
    until the block ends."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path), how],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
        yield proc
    finally:
        proc.kill()
        proc.wait()
