"""The chunk index format, chunking, comparing and seeding, without a network
(spec/delta.md), and the schedule's seeded chunks (spec/pull.md, "Seeded ranges")."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from blobstore.digest import Digest
from blobstore.ingest import ResumableIngest
from blobstore.store import Store
from registry_client.delta import ChunkIndex, IndexCache, IndexInvalid, chunk_bytes, compare
from registry_client.delta.chunking import CHUNKER, MAX, MIN, chunk_file
from registry_client.download.schedule import Plan, Schedule
from tests.registry_client.deltamodels import MiB, gguf_like

pytestmark = pytest.mark.timeout(120)


def test_roundtrip_size_and_bounds() -> None:
    data = random.Random(1).randbytes(16 * MiB)
    idx = chunk_bytes(data, Digest.of_bytes(data))
    assert sum(idx.lengths) == len(data) and all(0 < n <= MAX for n in idx.lengths)
    assert all(n >= MIN for n in idx.lengths[:-1])
    enc = idx.encode()
    assert len(enc) <= 0.001 * len(data)
    assert ChunkIndex.decode(enc, blob=idx.blob, size=len(data)) == idx
    with pytest.raises(IndexInvalid, match="describes"):
        ChunkIndex.decode(enc, size=len(data) + 1)
    with pytest.raises(IndexInvalid, match="describes"):
        ChunkIndex.decode(enc, blob=Digest.of_bytes(b"other"))


@settings(max_examples=40, deadline=None)
@given(hs.binary(max_size=300))
def test_garbage_never_decodes_to_something_unchecked(junk: bytes) -> None:
    for data in (junk, b"BCIDX\x00" + junk):
        try:
            idx = ChunkIndex.decode(data)
        except IndexInvalid:
            continue
        assert sum(idx.lengths) == idx.size and len(idx.hashes) == 32 * len(idx)


def test_file_and_buffer_agree_and_the_cache_keeps_it(tmp_path: Path) -> None:
    st = Store(tmp_path / "s")
    data = gguf_like(seed=4, n_tensors=8, tensor_size=MiB)
    d = st.put_bytes(data)
    idx = chunk_file(st.blob_path(d), d)
    assert idx == chunk_bytes(data, d)
    cache = IndexCache(st.layout)
    cache.put(idx)
    assert cache.get(d, len(data), CHUNKER) == idx
    cache.path(d).write_bytes(b"BCIDX\x00broken")  # a damaged cache file is ignored
    assert cache.get(d, len(data), CHUNKER) is None


@settings(max_examples=10, deadline=None)
@given(grow=hs.integers(1, 300), changed=hs.sets(hs.integers(0, 15), max_size=3))
def test_shifted_and_changed_tensors_are_found(grow: int, changed: set[int]) -> None:
    v1 = gguf_like(seed=7, n_tensors=16, tensor_size=MiB)
    v2 = gguf_like(seed=7, n_tensors=16, tensor_size=MiB, template="x" * (13 + grow),
                   changed={i: 1000 + i for i in changed})
    old, new = chunk_bytes(v1, Digest.of_bytes(v1)), chunk_bytes(v2, Digest.of_bytes(v2))
    plan = compare(new, old, Path("/unused"))
    out = bytearray(len(v2))
    for r in plan.runs:
        out[r.new:r.new + r.length] = v1[r.old:r.old + r.length]
    for s, e in plan.missing():
        out[s:e] = v2[s:e]
    assert bytes(out) == v2
    # each changed tensor costs its size plus at most a few chunks at its edges
    assert plan.to_fetch <= len(changed) * MiB + (len(changed) + 1) * 4 * MAX


@settings(max_examples=60, deadline=None)
@given(size=hs.integers(1, 5000), chunk=hs.integers(1, 700),
       cuts=hs.lists(hs.integers(0, 5000), max_size=12), adopt=hs.integers(0, 3))
def test_seeded_plan_keeps_the_schedule_invariant(size: int, chunk: int, cuts: list[int],
                                                  adopt: int) -> None:
    pts = sorted({min(c, size) for c in cuts})
    seeded = [(pts[i], pts[i + 1]) for i in range(0, len(pts) - 1, 2) if pts[i] < pts[i + 1]]
    grid = [(s, min(size, s + chunk)) for s in range(0, size, chunk)]
    on_disk = set(grid[:adopt])
    plan = Plan.make("k", size, chunk, on_disk, seeded)
    Schedule(plans=[plan]).check(full=True)
    for c in plan.chunks:
        covered = {b for s, e in seeded for b in range(max(s, c.start), min(e, c.end))}
        pending = {b for p in c.pending for b in range(p.pos, p.limit)}
        if c.on_disk:
            assert (c.start, c.end) in on_disk or len(covered) == c.length
            continue
        assert pending == set(range(c.start, c.end)) - covered  # fetch exactly the gaps
        assert c.filled == len(covered) and c.seeded == bool(covered)


def test_seed_copies_verified_chunks_and_skips_adopted(tmp_path: Path) -> None:
    st = Store(tmp_path / "s")
    v1 = gguf_like(seed=8, n_tensors=12, tensor_size=MiB)
    v2 = gguf_like(seed=8, n_tensors=12, tensor_size=MiB, template="longer template",
                   changed={4: 77})
    d1 = st.put_bytes(v1)
    d2 = Digest.of_bytes(v2)
    plan = compare(chunk_bytes(v2, d2), chunk_bytes(v1, d1), st.blob_path(d1))
    # one chunk of the base lies about its content: it must be left for the fetch
    plan.runs[-1].hashes[0] = b"\0" * 32
    ing = ResumableIngest(st.layout, d2, len(v2), 1 * MiB)
    try:
        written = plan.seed(ing)
        total = sum(e - s for s, e in written)
        assert total == plan.reused - plan.runs[-1].lengths[0]
        for s, e in written:
            assert ing.read_at(e - s, s) == v2[s:e]
    finally:
        ing.drop()
