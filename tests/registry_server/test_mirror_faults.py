"""Searching fault tests for the mirror's streams (issue 11, item 3).

Hypothesis chooses the blob size, the engine's connections and chunk size, how the fetch
starts (a manifest's model pull, or a bare blob request), the fault (reset, clean close or
a flipped byte at a body offset; on the first requests or on all) and when a second client
joins. Whatever was chosen, within a hard time bound:

* every consumer either gets exactly the blob, or its iterator raises; after a cut every
  prefix it received is the blob's; after corruption it never received the whole length;
* every file under ``blobs/`` hashes to its name (no wrong blob committed);
* with the faults gone, a new request gets the whole blob and the store then holds it.

``BLOBCTL_MIRROR_EXAMPLES`` sets the number of examples (default 30).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from blobstore.digest import Digest
from blobstore.store import Store
from registry_client.retry import RetryPolicy
from tests.faultproxy import Fault, FaultProxy
from tests.registry_client.pullcheck import assert_blobs_honest
from tests.registry_server.mirrorkit import (
    Consumed,
    KiB,
    consume,
    fetch_manifest,
    mirror_name,
    new_mirror,
    proxy,
    push_model,
    registry,
    run_async,
)
from tests.servers import DockerRegistry

__all__ = ["proxy", "registry"]  # fixtures

EXAMPLES = int(os.environ.get("BLOBCTL_MIRROR_EXAMPLES", "30"))


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, object]:
    size = draw(st.integers(1, 1536 * KiB))
    kind = draw(st.sampled_from(["rst", "fin", "corrupt"]))
    offset: float | int = draw(st.floats(0.0, 1.0) | st.integers(0, size))
    sel = draw(st.sampled_from(["first", "always"]))
    return {"size": size, "connections": draw(st.integers(1, 4)),
            "chunk": draw(st.integers(16 * KiB, 128 * KiB)),
            "via_manifest": draw(st.booleans()), "late": draw(st.sampled_from([0.0, 0.05, 0.3])),
            "attempts": draw(st.integers(1, 4)),
            "fault": Fault(kind, offset, first=draw(st.integers(1, 3)) if sel == "first" else 0,
                           every=1 if sel == "always" else 0)}


def _check(out: Consumed, truth: bytes, corrupt: bool) -> None:
    if out.error is None:
        assert out.data == truth, "a stream ended without error but with other bytes"
        return
    assert len(out.data) < len(truth), "a failed stream delivered the whole length"
    if not corrupt:
        assert out.data == truth[:len(out.data)], "a cut stream delivered wrong bytes"


@pytest.mark.timeout(600)
@settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
          phases=(Phase.explicit, Phase.reuse, Phase.generate),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(sc=scenarios())
def test_faults_cut_streams_cleanly(registry: DockerRegistry, proxy: FaultProxy,
                                    sc: dict[str, object]) -> None:
    size = sc["size"]
    fault = sc["fault"]
    assert isinstance(size, int) and isinstance(fault, Fault)
    model = push_model(registry, [size])
    truth = next(b for b in model.blobs.values() if len(b) == size)
    digest = Digest.of_bytes(truth)
    name = mirror_name(model)
    root = Path(tempfile.mkdtemp(prefix="blobctl-mirror-"))
    try:
        store = Store(root / "store")
        mirror = new_mirror(store, proxy.url, connections=sc["connections"],
                            chunk_size=sc["chunk"], stall_timeout=1.0,
                            retry=RetryPolicy(attempts=int(sc["attempts"]),  # type: ignore[call-overload]
                                              base_delay=0.01, max_delay=0.02))
        proxy.set_faults(Fault(fault.kind, fault.offset, first=fault.first, every=fault.every,
                               match=f"{model.path_match}{digest}"))
        corrupt = fault.kind == "corrupt"

        async def faulty() -> list[Consumed]:
            if sc["via_manifest"]:
                assert await fetch_manifest(mirror, name, model.tag) is not None

            async def later() -> Consumed:
                await asyncio.sleep(float(sc["late"]))  # type: ignore[arg-type]
                return await consume(mirror, name, digest, None if corrupt else truth)

            return list(await asyncio.gather(
                consume(mirror, name, digest, None if corrupt else truth), later()))

        try:
            outs = run_async(faulty, 60)
        finally:
            proxy.set_faults()
        for out in outs:
            _check(out, truth, corrupt)
        assert mirror.wait_idle(30), "a mirror fetch did not end"
        assert_blobs_honest(store.root)
        if any(o.error for o in outs):
            _, acts = mirror.activity.snapshot()
            assert any(a.state == "failed" and a.error for a in acts), acts
        event(f"{fault.kind}: " + ("a stream was cut" if any(o.error for o in outs)
                                   else "streams complete"))
        # with the faults gone, the next request completes (resuming what is there)
        again = run_async(lambda: consume(mirror, name, digest, truth), 60)
        assert again.error is None, again.error
        assert again.data == truth
        assert mirror.wait_idle(30)
        assert store.blob_path(digest).read_bytes() == truth
        assert_blobs_honest(store.root)
        mirror.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
