"""GC's plan as a pure function of a snapshot: the ledger's invariants under search."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from blobstore.blobfiles import BlobFiles
from blobstore.digest import Digest
from blobstore.gc.plan import Ledger, make_plan
from blobstore.gc.report import GCOptions
from blobstore.gc.snapshot import Model, Snapshot
from blobstore.inuse import InUse
from blobstore.lease import LeaseInfo
from blobstore.name import ModelName
from blobstore.state import ModelState

NOW = 1_000_000.0
DIGESTS = [Digest.of_bytes(b"%d" % i) for i in range(12)]
REAL = "/store/blobs"


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    present = draw(st.sets(st.integers(0, 11), min_size=1))
    # each blob under its name, Ollama's legacy name, or both (one of them held below)
    names = {i: draw(st.sampled_from([(DIGESTS[i].filename,), (DIGESTS[i].legacy_filename,),
                                      (DIGESTS[i].filename, DIGESTS[i].legacy_filename),
                                      (DIGESTS[i].legacy_filename, DIGESTS[i].filename)]))
             for i in present}
    blobs = {DIGESTS[i]: BlobFiles(names[i], draw(st.integers(0, 5000)),
                                   NOW - draw(st.sampled_from([10, 10_000])), NOW - 10)
             for i in present}
    models = []
    for k in range(draw(st.integers(0, 6))):
        refs = frozenset(DIGESTS[i] for i in draw(st.sets(st.integers(0, 11), min_size=1,
                                                          max_size=4)))
        used = NOW - draw(st.integers(0, 100_000))
        models.append(Model(ModelName.parse(f"m{k}"), f"/store/manifests/m{k}",
                            Digest.of_bytes(b"manifest %d" % k), refs,
                            NOW - draw(st.sampled_from([10, 100_000])),
                            ModelState(used, 1, draw(st.booleans())), used, None))
    leased = frozenset(DIGESTS[i] for i in draw(st.sets(st.integers(0, 11), max_size=2)))
    leases = [LeaseInfo(Path("/l"), 1, "pull", leased, frozenset(), NOW)] if leased else []
    in_use = InUse()
    for i in draw(st.sets(st.sampled_from(sorted(present)), max_size=2)):
        in_use.add(f"{REAL}/{draw(st.sampled_from(names[i]))}", "llama[1]")
    rescued = {DIGESTS[i] for i in draw(st.sets(st.integers(0, 11), max_size=1))}
    return Snapshot(NOW, models, rescued, blobs, {}, [], leases, in_use, REAL, "/store/ingest")


options = st.builds(GCOptions, max_size=st.none() | st.integers(0, 40_000),
                    older_than=st.none() | st.integers(0, 100_000),
                    grace=st.sampled_from([0.0, 3600.0]))


@settings(max_examples=300, deadline=None)
@given(snap=snapshots(), opts=options)
def test_plans_keep_the_ledger_invariants(snap: Snapshot, opts: GCOptions) -> None:
    p = make_plan(snap, opts, check=True)
    kept = [m for m in snap.models if m not in p.evict]
    for m in kept:  # nothing a remaining model names is deleted
        assert m.digests.isdisjoint(p.delete_blobs)
    assert snap.rescued.isdisjoint(p.delete_blobs)
    for m in p.evict:
        assert not m.state.pinned
    # a blob held under either of its names stays, and so does every model naming it
    held = {Digest.from_filename(path.rpartition("/")[2]) for path in snap.in_use.holders}
    assert held.isdisjoint(p.delete_blobs)
    for m in p.evict:
        assert held.isdisjoint(m.digests), f"{m.name} evicted though in use"
    if opts.max_size is not None and p.cap_met:
        assert p.total_after <= opts.max_size


@settings(max_examples=200, deadline=None)
@given(snap=snapshots(), opts=options, order=st.permutations(range(6)))
def test_any_sequence_of_evictions_keeps_the_invariants(
        snap: Snapshot, opts: GCOptions, order: list[int]) -> None:
    ledger = Ledger(snap, opts)
    ledger.check()
    for i in order:
        if i < len(snap.models) and ledger.blocked(snap.models[i]) is None \
                and snap.models[i] not in ledger.evicted:
            freed = ledger.would_free(snap.models[i])
            assert ledger.evict(snap.models[i]) == freed
            ledger.check()
