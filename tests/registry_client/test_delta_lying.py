"""A corrupted or lying chunk index never yields a bad blob (spec/delta.md, "Integrity").

Hypothesis chooses how the index of version 2 lies (chunk hashes of other chunks, wrong
chunk boundaries, the old version's index claimed for the new blob, a truncated or
bit-flipped encoding, garbage bytes) and pushes it as v2's chunk-index artifact to the
real docker-registry. A store holding v1 then pulls v2: the pull must end, in bounded
time, with exactly v2's bytes (the index was refused, or the delta's result failed the
sha256 check and the blob was fetched again whole), and nothing but verified blobs may
stand under a digest name."""

from __future__ import annotations

import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as hs

from blobstore.digest import Digest
from blobstore.manifest import Manifest
from blobstore.name import ModelName
from blobstore.store import Store
from registry_client.client import RegistryClient
from registry_client.delta import ChunkIndex, chunk_bytes, local_index
from registry_client.delta.artifact import push_index_blobs
from registry_client.delta.chunking import MAX
from registry_client.pull import PullOptions, PullResult, pull
from registry_client.push import PushOptions, push
from tests.blobstore.archutil import add_model
from tests.registry_client.deltamodels import MiB, gguf_like
from tests.registry_client.pullcheck import assert_blobs_honest, run_bounded
from tests.servers import DockerRegistry

PULL = PullOptions(insecure=True, connections=8, auto_gc=False)
KINDS = ("identity", "hash", "offsets", "truncated", "bitflip", "garbage", "size")


@dataclass
class World:
    registry: DockerRegistry
    template: Path         # a store holding v1 (and v1's cached index)
    scratch: Path
    v1: bytes
    v2: bytes
    v2_manifest: Manifest
    ref: str


@pytest.fixture(scope="module")
def world(registry: DockerRegistry) -> Iterator[World]:
    d = Path(tempfile.mkdtemp(prefix="blobctl-lying-"))
    try:
        v1 = gguf_like(seed=11, n_tensors=16, tensor_size=MiB)
        v2 = gguf_like(seed=11, n_tensors=16, tensor_size=MiB, changed={3: 50, 12: 51})
        pub = Store(d / "pub")
        add_model(pub, "example.com/pub/lie:v1", [v1])
        add_model(pub, "example.com/pub/lie:v2", [v2])
        push("example.com/pub/lie:v1", f"{registry.netloc}/delta/lie:v1", store=pub,
             options=PushOptions(insecure=True))
        push("example.com/pub/lie:v2", f"{registry.netloc}/delta/lie:v2", store=pub,
             options=PushOptions(insecure=True, index=False))
        tpl = Store(d / "tpl")
        pull(f"{registry.netloc}/delta/lie:v1", store=tpl, options=PULL)
        layer = tpl.get_manifest(ModelName.parse(f"{registry.netloc}/delta/lie:v1")).layers[0]
        assert local_index(tpl, layer.digest, layer.size) is not None  # cached now
        m2 = pub.get_manifest(ModelName.parse("example.com/pub/lie:v2"))
        yield World(registry, d / "tpl", d, v1, v2, m2, f"{registry.netloc}/delta/lie:v2")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def lie(kind: str, rnd: random.Random, v1: bytes, v2: bytes) -> bytes:
    """The encoded index pushed for v2."""
    d1, d2 = Digest.of_bytes(v1), Digest.of_bytes(v2)
    true, old = chunk_bytes(v2, d2), chunk_bytes(v1, d1)
    lengths, hashes = list(true.lengths), bytearray(true.hashes)
    if kind == "identity":  # "v2 is v1": every chunk of the changed tensors lies
        return ChunkIndex(d2, len(v2), old.chunker, old.avg, old.min, old.max,
                          list(old.lengths), old.hashes).encode()
    if kind == "hash":      # some chunks claim the content (and length) of other chunks
        for _ in range(rnd.randint(1, 8)):
            i, j = rnd.randrange(len(lengths) - 1), rnd.randrange(len(old))
            delta = old.lengths[j] - lengths[i]
            lengths[i] = old.lengths[j]
            lengths[-1] -= delta  # keep the total (may break a bound: refused then)
            hashes[32 * i:32 * i + 32] = old.hash(j)
        lengths[-1] = max(1, min(MAX, lengths[-1]))
    elif kind == "offsets":  # right hashes, wrong boundaries
        for _ in range(rnd.randint(1, 8)):
            i = rnd.randrange(len(lengths) - 1)
            move = rnd.randint(-lengths[i] + 1, lengths[i + 1] - 1)
            lengths[i] += move
            lengths[i + 1] -= move
    elif kind == "size":    # claims another blob size
        lengths[-1] += rnd.randint(1, 100)
    enc = ChunkIndex(d2, sum(lengths) if kind == "size" else len(v2), true.chunker, true.avg,
                     true.min, true.max, lengths, bytes(hashes)).encode()
    if kind == "truncated":
        return enc[:rnd.randrange(len(enc))]
    if kind == "bitflip":
        b = bytearray(enc)
        pos = rnd.randrange(len(b))
        b[pos] ^= 1 << rnd.randrange(8)
        return bytes(b)
    if kind == "garbage":
        head = enc[:6] if rnd.random() < 0.5 else b""
        return head + rnd.randbytes(rnd.randint(0, 4096))
    return enc


@pytest.mark.timeout(600)
@settings(max_examples=24, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(kind=hs.sampled_from(KINDS), seed=hs.integers(0, 2**32 - 1))
def test_a_lying_index_never_yields_a_bad_blob(world: World, kind: str, seed: int) -> None:
    data = lie(kind, random.Random(seed), world.v1, world.v2)
    name = ModelName.parse(world.ref)
    with RegistryClient(insecure=True) as client:
        push_index_blobs(client, name, world.v2_manifest, [(Digest.of_bytes(world.v2), data)])
    root = world.scratch / f"ex-{kind}-{seed}"
    shutil.copytree(world.template, root)
    try:
        st = Store(root)
        result, error = run_bounded(lambda: pull(world.ref, store=st, options=PULL), 90,
                                    f"pull with a {kind} index")
        assert error is None, f"{kind}: {error!r}"
        assert isinstance(result, PullResult)
        # a delta blob is one committed with reused bytes (a refetched one is not)
        assert result.delta_blobs == (1 if result.bytes_reused else 0), result
        event(f"{kind}: {'delta' if result.delta_blobs else 'plain or refetched'}")
        layer = st.get_manifest(name).layers[0]
        assert st.blob_path(layer.digest).read_bytes() == world.v2
        assert_blobs_honest(root)
        if result.delta_blobs and result.bytes_reused:
            # the delta was accepted: then its result verified, so it reused true chunks
            assert result.bytes_fetched < len(world.v2)
    finally:
        shutil.rmtree(root, ignore_errors=True)
