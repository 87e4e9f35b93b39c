"""A model-based test of the store + GC: random import / use / pin / rm / gc sequences."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from blobstore.errors import CapNotMet, ModelPinned
from blobstore.gc import GCOptions, gc
from blobstore.name import ModelName
from blobstore.store import Store
from tests.blobstore.gcutil import add_model, assert_no_missing_blobs, blob_total

NAMES = ["a", "b", "c", "d", "e"]
# a pool of layer contents of different sizes, so models share blobs in varied ways
POOL = [bytes([i]) * (1000 * (i + 1)) for i in range(6)]
LATER = time.time() + 30 * 86400


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="blobctl-sm-"))
        self.store = Store(self.tmp / "s")
        self.clock = 1_000_000.0
        # the model: name -> (layer indexes, last used, pinned)
        self.models: dict[str, tuple[frozenset[int], float, bool]] = {}

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def tick(self) -> float:
        self.clock += 1
        return self.clock

    def config_bytes(self, name: str) -> bytes:
        return f'{{"model":"{name}"}}'.encode()

    def bytes_of(self, layers: frozenset[int], name: str) -> dict[bytes, int]:
        out = {POOL[i]: len(POOL[i]) for i in layers}
        out[self.config_bytes(name)] = len(self.config_bytes(name))
        return out

    def surviving_blobs(self, names: list[str]) -> dict[bytes, int]:
        out: dict[bytes, int] = {}
        for n in names:
            out.update(self.bytes_of(self.models[n][0], n))
        return out

    @rule(name=st.sampled_from(NAMES),
          layers=st.frozensets(st.integers(0, len(POOL) - 1), min_size=1, max_size=3))
    def import_model(self, name: str, layers: frozenset[int]) -> None:
        pinned = self.models[name][2] if name in self.models else False
        add_model(self.store, name, [POOL[i] for i in sorted(layers)],
                  config=self.config_bytes(name), used=self.tick())
        self.models[name] = (layers, self.clock, pinned)

    @precondition(lambda self: self.models)
    @rule(data=st.data())
    def use(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.models)))
        self.store.record_use(ModelName.parse(name), when=self.tick())
        layers, _, pinned = self.models[name]
        self.models[name] = (layers, self.clock, pinned)

    @precondition(lambda self: self.models)
    @rule(data=st.data(), pin=st.booleans())
    def pin(self, data: st.DataObject, pin: bool) -> None:
        name = data.draw(st.sampled_from(sorted(self.models)))
        self.store.set_pinned(ModelName.parse(name), pin)
        layers, used, _ = self.models[name]
        self.models[name] = (layers, used, pin)

    @precondition(lambda self: self.models)
    @rule(data=st.data(), force=st.booleans())
    def rm(self, data: st.DataObject, force: bool) -> None:
        name = data.draw(st.sampled_from(sorted(self.models)))
        if self.models[name][2] and not force:  # pins are enforced by the library
            with pytest.raises(ModelPinned):
                self.store.remove_model(ModelName.parse(name))
            return
        self.store.remove_model(ModelName.parse(name), force=force)
        del self.models[name]

    @rule(cap=st.integers(0, 25_000))
    def gc_cap(self, cap: int) -> None:
        before = dict(self.models)
        try:
            report = gc(self.store, GCOptions(max_size=cap), now=LATER)
            met = True
        except CapNotMet as exc:
            report = exc.report  # type: ignore[attr-defined]
            met = False
        evicted = {ModelName.parse(n).model for n in report.removed_models}
        for n in evicted:
            assert not before[n][2], f"pinned model {n} was evicted"
            del self.models[n]
        total = blob_total(self.store)
        pinned_bytes = sum(self.surviving_blobs([n for n, v in before.items() if v[2]]).values())
        # the cap is met whenever the pinned models alone fit under it
        assert met == (total <= cap)
        if pinned_bytes <= cap:
            assert met, f"cap {cap} not met though pinned models need only {pinned_bytes}"
        # LRU: a kept unpinned model older than an evicted one either frees nothing
        # on its own, or the cap was already met when it was reached
        survivors = list(self.models)
        for s in survivors:
            if self.models[s][2]:
                continue
            others = self.surviving_blobs([n for n in survivors if n != s])
            own = {b for b in self.bytes_of(self.models[s][0], s) if b not in others}
            for e in evicted:
                if before[e][1] > self.models[s][1]:
                    assert not own or met, f"kept older {s} over newer {e}"

    @invariant()
    def no_manifest_lacks_a_blob(self) -> None:
        assert_no_missing_blobs(self.store)

    @invariant()
    def store_matches_model(self) -> None:
        got = {e.name.model for e in self.store.list_models()}
        assert got == set(self.models)


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(
    max_examples=60, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
