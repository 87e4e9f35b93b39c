"""Faults on the wire while a delta fetches its missing ranges (spec/delta.md, "Fetching a
delta"): hypothesis chooses one or two faults (reset, early close, stall, corrupted byte,
wrong Content-Range, 5xx; where in the body; which requests) that FaultProxy applies to
the ranges of version 2's layer. The pull must end in bounded time with exactly v2's
bytes, or fail with one clean error (a corrupted byte in every try), and nothing but
verified blobs may stand under a digest name."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as hs

from blobstore.errors import BlobctlError
from blobstore.name import ModelName
from blobstore.store import Store
from registry_client.delta import local_index
from registry_client.pull import PullOptions, PullResult, pull
from registry_client.push import PushOptions, push
from registry_client.retry import RetryPolicy
from tests.blobstore.archutil import add_model
from tests.faultproxy import KINDS, Fault, FaultProxy
from tests.registry_client.deltamodels import MiB, gguf_like
from tests.registry_client.pullcheck import assert_blobs_honest, run_bounded
from tests.servers import DockerRegistry

OPTS = PullOptions(insecure=True, connections=4, auto_gc=False, stall_timeout=1.5,
                   retry=RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05))


@dataclass
class World:
    template: Path
    scratch: Path
    v2: bytes
    ref: str
    layer_path: str


@pytest.fixture(scope="module")
def world(registry: DockerRegistry, proxy: FaultProxy) -> Iterator[World]:
    d = Path(tempfile.mkdtemp(prefix="blobctl-delta-faults-"))
    try:
        v1 = gguf_like(seed=31, n_tensors=16, tensor_size=MiB)
        v2 = gguf_like(seed=31, n_tensors=16, tensor_size=MiB, template="{{ .Prompt }}!",
                       changed={4: 60, 9: 61, 13: 62})
        pub = Store(d / "pub")
        for tag, data in (("v1", v1), ("v2", v2)):
            add_model(pub, f"example.com/pub/faults:{tag}", [data])
            push(f"example.com/pub/faults:{tag}", f"{registry.netloc}/dfault/m:{tag}",
                 store=pub, options=PushOptions(insecure=True))
        tpl = Store(d / "tpl")
        proxy.set_faults()
        pull(f"{proxy.netloc}/dfault/m:v1", store=tpl, options=OPTS)
        layer = tpl.get_manifest(ModelName.parse(f"{proxy.netloc}/dfault/m:v1")).layers[0]
        assert local_index(tpl, layer.digest, layer.size) is not None
        m2 = pub.get_manifest(ModelName.parse("example.com/pub/faults:v2"))
        yield World(d / "tpl", d, v2, f"{proxy.netloc}/dfault/m:v2",
                    f"/v2/dfault/m/blobs/{m2.layers[0].digest}")
    finally:
        shutil.rmtree(d, ignore_errors=True)


faults = hs.builds(
    # (a trickle on every request is a slow server, not a fault: test_pull_generative
    # searches trickles with the selectors that leave a faster connection)
    Fault, kind=hs.sampled_from([k for k in KINDS if k != "trickle"]),
    offset=hs.one_of(hs.floats(0.0, 1.0), hs.integers(0, 300_000)),
    first=hs.integers(0, 3), every=hs.integers(0, 2), seconds=hs.sampled_from([0.0, 2.5]),
    status=hs.sampled_from([500, 502, 503]))


@pytest.mark.timeout(600)
@settings(max_examples=16, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(chosen=hs.lists(faults, min_size=1, max_size=2))
def test_faults_during_a_delta_never_yield_a_bad_blob(world: World, proxy: FaultProxy,
                                                      chosen: list[Fault]) -> None:
    import dataclasses

    root = world.scratch / "ex"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(world.template, root)
    proxy.set_faults(*[dataclasses.replace(f, match=world.layer_path) for f in chosen])
    try:
        st = Store(root)
        result, error = run_bounded(lambda: pull(world.ref, store=st, options=OPTS), 120,
                                    f"delta pull with faults {chosen}")
        proxy.set_faults()
        assert_blobs_honest(root)
        name = ModelName.parse(world.ref)
        if error is not None:
            assert isinstance(error, BlobctlError), repr(error)
            assert not st.has_model(name)
            event(f"clean failure: {type(error).__name__}")
            return
        assert isinstance(result, PullResult)
        # a delta blob is one committed with reused bytes; refetched whole it is not
        assert result.delta_blobs == (1 if result.bytes_reused else 0), result
        event("delta kept" if result.bytes_reused else "delta refetched whole")
        layer = st.get_manifest(name).layers[0]
        assert st.blob_path(layer.digest).read_bytes() == world.v2
    finally:
        proxy.set_faults()
        shutil.rmtree(root, ignore_errors=True)
