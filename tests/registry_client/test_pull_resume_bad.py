"""Resumed bytes that do not verify (an earlier run met a corrupting server) are fetched
again from scratch, once, in the same pull: the user never has to run it twice."""

from __future__ import annotations

import pytest

from blobstore.errors import DigestMismatch
from blobstore.store import Store
from registry_client.pull import pull
from tests.registry_client.test_pull_faults import assert_intact, opts, setup_model
from tests.registry_client.test_pull_resume import CHUNK, leave_ingest
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
