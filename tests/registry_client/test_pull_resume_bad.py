"""Resumed bytes that do not verify (an earlier run met a corrupting server) are fetched
again from scratch, once, in the same pull: the user never has to run it twice."""

from __future__ import annotations

import pytest

from blobstore.errors import DigestMismatch
from blobstore.store import Store
from registry_client.pull import pull
from tests.registry_client.test_pull_faults import assert_intact, opts, setup_model
from tests.registry_client.test_pull_resume import CHUNK, leave_ingest, leave_ranges
from tests.servers import Fault, FaultServer


@pytest.mark.timeout(60)
def test_bad_resumed_bytes_are_refetched(server: FaultServer, store: Store) -> None:
    ref, data = setup_model(server, size=16 * CHUNK)
    bad = bytearray(data)
    bad[5] ^= 0xFF  # chunk 0 on disk is wrong, its journal record says done
    leave_ingest(store, bytes(bad), [0, 1, 2], durable=False)
    r = pull(ref, store=store, options=opts(chunk_size=CHUNK))
    assert_intact(store, data)
    assert r.bytes_resumed == 0  # the second, fresh run's figure


def test_fresh_bytes_that_do_not_verify_fail(server: FaultServer, store: Store) -> None:
    ref, _data = setup_model(server, size=16 * CHUNK)
    server.faults.append(Fault("corrupt", after=10, times=10_000))
    with pytest.raises(DigestMismatch):
        pull(ref, store=store, options=opts(chunk_size=CHUNK))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("connections", [1, 4])
def test_bad_resumed_bytes_of_a_one_chunk_blob_are_refetched(server: FaultServer, store: Store,
                                                             connections: int) -> None:
    """A blob of one chunk is hashed and committed by the worker that fetched its last
    bytes: resumed bytes in it that do not verify make that worker start the blob over
    (``_restart`` from a worker thread), and the pull still succeeds."""
    ref, data = setup_model(server, size=CHUNK - 4000)  # one chunk of the earlier run's
    bad = bytearray(data)
    bad[7] ^= 0xFF
    leave_ranges(store, data, [(0, 20_000)], durable=False, written=bytes(bad))
    r = pull(ref, store=store, options=opts(chunk_size=CHUNK, connections=connections))
    assert_intact(store, data)
    assert r.bytes_resumed == 0  # the fresh run's figure


@pytest.mark.timeout(60)
def test_an_ingest_that_cannot_open_fails_the_pull_and_the_others_are_let_go(
        server: FaultServer, store: Store) -> None:
    """Ingests of a pull of many blobs open several at a time: one that cannot open (a
    file stands where its folder goes) fails the pull with that error, once every other
    one was tried, and those are closed again (no owner left, nothing committed)."""
    import os
    import threading

    from blobstore.digest import Digest
    from blobstore.errors import BlobctlError
    from tests.servers import sha

    layers = [("application/vnd.ollama.image.params", os.urandom(3000 + i)) for i in range(12)]
    server.add_model("library/many", "1", b'{"model_format":"gguf"}', layers)
    blocked = Digest.parse(sha(layers[5][1]))
    store.layout.ingest.mkdir(parents=True, exist_ok=True)
    (store.layout.ingest / blocked.filename).write_bytes(b"not a folder")
    with pytest.raises(BlobctlError):
        pull(f"{server.netloc}/library/many:1", store=store, options=opts(connections=4))
    assert not store.layout.blobs.exists() or not any(store.layout.blobs.iterdir())
    for entry in store.layout.ingest.iterdir():
        assert not (entry / "owner").exists(), entry
    assert not [t for t in threading.enumerate() if t.name.startswith("blobctl-open")]
