"""Taking over a dead owner's ingest folder where the file system has no hard links
(vfat, exFAT: link(2) answers EPERM and the owner file is made in place with O_EXCL,
empty for an instant). Found in review: a crash left an empty owner file older than
the TTL; claimers B and C both read it (b""); B renamed it away, deleted it and made its
own owner file (still empty); C renamed B's new file away, found it "the same" by its
bytes (b"" again), deleted it and made its own: both owned the folder.

How the interleaving is forced: two claimers run ``Ingest.for_digest`` in threads whose
system calls that change or create files (``os.link``, which here always answers EPERM
as on vfat, ``os.open``, ``os.write``, ``os.rename``, ``os.unlink``) each wait at a gate;
the test lets one thread through one gate at a time, in the order hypothesis chooses,
and waits until that thread stands at its next gate (or is done) before the next step.
Everything between two gates (reads, stats) runs while the other thread is parked, so an
interleaving is exactly the list of choices. Real files, real renames; nothing of
blobctl's own code is replaced."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from blobstore.digest import Digest
from blobstore.ingest import OWNER_TTL, Ingest, ResumableIngest
from blobstore.owner import make_dirs
from blobstore.store import Store

pytestmark = pytest.mark.timeout(120)

DATA = b"x" * 4096
DIGEST = Digest.of_bytes(DATA)
_WAIT = 20.0  # seconds a step may take before the test calls the run stuck


class Interleaver:
    """Runs claimer threads one gated system call at a time, in a chosen order."""

    def __init__(self, order: list[int]) -> None:
        self.order = list(order)
        self.cv = threading.Condition()
        self.local = threading.local()
        self.at_gate: set[int] = set()
        self.finished: set[int] = set()
        self.turn: int | None = None
        self.steps: list[tuple[int, str]] = []

    def gate(self, what: str) -> None:
        me: int | None = getattr(self.local, "me", None)
        if me is None:
            return  # not a claimer (the test itself, hypothesis, pytest)
        with self.cv:
            self.at_gate.add(me)
            self.cv.notify_all()
            if not self.cv.wait_for(lambda: self.turn == me, timeout=_WAIT):
                raise RuntimeError("interleaver: never given a turn")
            self.turn = None
            self.at_gate.discard(me)
            self.steps.append((me, what))
            self.cv.notify_all()

    def run(self, claimers: list[Callable[[], Any]]) -> list[Any]:
        out: list[Any] = [None] * len(claimers)
        errors: list[BaseException] = []

        def body(i: int) -> None:
            self.local.me = i
            try:
                self.gate("start")
                out[i] = claimers[i]()
            except BaseException as exc:  # reported by the test
                errors.append(exc)
            finally:
                with self.cv:
                    self.finished.add(i)
                    self.cv.notify_all()

        threads = [threading.Thread(target=body, args=(i,), daemon=True)
                   for i in range(len(claimers))]
        for t in threads:
            t.start()
        n = len(claimers)
        with self.cv:
            while True:
                settled = self.cv.wait_for(
                    lambda: self.turn is None and all(
                        i in self.at_gate or i in self.finished for i in range(n)),
                    timeout=_WAIT)
                assert settled, f"a claimer is stuck between gates after {self.steps}"
                live = sorted(self.at_gate)
                if not live:
                    break
                want = self.order.pop(0) if self.order else live[0]
                self.turn = want if want in live else live[0]
                self.cv.notify_all()
        for t in threads:
            t.join(_WAIT)
        if errors:
            raise errors[0]
        return out


@pytest.fixture
def gated(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[list[int]], Interleaver]]:
    """os.link answers EPERM (vfat); the calls that create or change files are gated."""
    current: list[Interleaver] = []
    real = {name: getattr(os, name) for name in ("open", "write", "rename", "unlink")}

    def gate(what: str) -> None:
        if current:
            current[0].gate(what)

    def no_link(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        gate("link")
        raise OSError(errno.EPERM, "Operation not permitted", str(src), None, str(dst))

    def wrap(name: str) -> Callable[..., Any]:
        fn = real[name]

        def gated_call(*args: Any, **kwargs: Any) -> Any:
            gate(name)
            return fn(*args, **kwargs)
        return gated_call

    monkeypatch.setattr(os, "link", no_link)
    for name in real:
        monkeypatch.setattr(os, name, wrap(name))

    def make(order: list[int]) -> Interleaver:
        current[:] = [Interleaver(order)]
        return current[0]
    yield make
    current.clear()


# The reviewer's interleaving, as runs of (claimer, steps): C (1) takes 5 steps: start,
# its tmp owner (open, write), link, open: exists; it reads b"", judges the stale file dead
# and stands at its rename. B (0) takes 9: the same, then renames the stale file away,
# unlinks it, link, open: its own owner file exists, not written yet. C then renames B's
# file away and finds b"" again.
_REVIEWED = [(1, 5), (0, 9), (1, 12)]


@pytest.mark.timeout(300)
@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(runs=_REVIEWED)
@given(runs=st.lists(st.tuples(st.integers(0, 1), st.integers(1, 12)), max_size=12))
def test_one_owner_when_two_take_over_an_empty_stale_owner_file(
        tmp_path_factory: pytest.TempPathFactory,
        gated: Callable[[list[int]], Interleaver], runs: list[tuple[int, int]]) -> None:
    """Whatever the interleaving (hypothesis picks runs of steps of one claimer), one
    claimer owns the dead owner's folder, and its owner file is the one in place."""
    order = [who for who, n in runs for _ in range(n)]
    store = Store(tmp_path_factory.mktemp("nolink"))
    folder = store.layout.blob_ingest / ResumableIngest.key_of(DIGEST)
    make_dirs(folder)
    owner = folder / "owner"
    owner.write_bytes(b"")  # a crash between the O_EXCL create and the write ...
    old = time.time() - OWNER_TTL - 60
    os.utime(owner, (old, old))  # ... long ago: dead

    il = gated(order)
    ings: list[Ingest] = il.run([
        lambda: Ingest.for_digest(store.layout, DIGEST, len(DATA), 1024),
        lambda: Ingest.for_digest(store.layout, DIGEST, len(DATA), 1024)])
    try:
        owning = [i for i in ings if i.dir == folder]
        assert len(owning) <= 1, f"two owners of {folder} after {il.steps}"
        assert owning, f"nobody took the dead owner's folder over after {il.steps}"
        assert owner.read_bytes() == owning[0]._owner  # the owner file is the winner's
    finally:
        for i in ings:
            i.drop()
