"""GC phase 1b: the plan, a pure function of the snapshot (spec/gc.md).

What goes: unreferenced blobs, models (LRU, dedupe-aware, under a cap or past an age)
and stale ingests; what stays and why. The running account of the choice is one small
class, :class:`Ledger`, whose invariants ``Ledger.check`` states (a test drives it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from blobstore.digest import Digest
from blobstore.errors import InvalidDigest
from blobstore.gc.report import GCOptions, Skipped
from blobstore.gc.snapshot import Model, Snapshot
from blobstore.ingest import IngestEntry
from blobstore.units import human_bytes

__all__ = ["LIKELY_PULL_WINDOW", "OLLAMA_PULL", "Ledger", "Plan", "ingest_kept",
           "likely_ollama_pull", "live_ollama_download", "make_plan",
           "ollama_download"]

# why unreferenced blobs stay while Ollama downloads into the store (spec/gc.md)
OLLAMA_PULL = "an Ollama download is running"


def holders(purposes: set[str]) -> str:
    """What holds leases, for a reason: ``pull NAME``, ``blobctl bench NAME``, ``serve``
    (a lease's purpose; found from outside: every lease was "a running pull")."""
    return " / ".join(sorted(purposes))


@dataclass
class Plan:
    evict: list[Model]
    delete_blobs: dict[Digest, int]
    delete_ingests: list[tuple[Path, int]]
    skipped: list[Skipped]
    total_before: int
    total_after: int
    cap_met: bool
    cap_reason: str
    # the part of delete_blobs no manifest referenced when planned: these need not wait
    # for the evicted manifests to go
    orphans: frozenset[Digest] = frozenset()
    # a live Ollama download in blobs/ (``live_ollama_download``), and the unreferenced
    # blobs kept for it that would have gone otherwise
    ollama_pull: str | None = None
    ollama_kept: dict[Digest, int] = field(default_factory=dict)


class Ledger:
    """The plan's running account: which blobs go, who still names each blob.

    Invariants (``check``):

    1. ``refcount[d]`` is the number of models not evicted that name ``d``, plus one if
       a manifest that does not decode mentions it;
    2. every blob in ``delete`` is in the snapshot with that size, no remaining model
       names it, and ``deletable`` allows it (not leased, not in use, not young);
    3. ``remaining`` is the snapshot's total minus the bytes in ``delete``;
    4. no evicted model is ``blocked`` (pinned, leased, in use, young).
    """

    def __init__(self, snap: Snapshot, opts: GCOptions) -> None:
        self.snap = snap
        self.opts = opts
        self.leased: dict[Digest, set[str]] = {}  # blob -> what holds a lease on it
        self.leased_ingests: set[str] = set()
        for lease in snap.leases:
            for d in lease.digests:
                self.leased.setdefault(d, set()).add(lease.purpose or "blobctl command")
            self.leased_ingests |= lease.ingests
        # who holds each blob open or mapped (usually nobody: keep the per-blob test cheap)
        self.held: dict[Digest, list[str]] = {}
        targets = {t: d for d, ts in snap.linked.items() for t in ts}
        for held_path, who in snap.in_use.holders.items():
            folder, _, fname = held_path.rpartition("/")
            if folder == snap.real_blobs:
                try:
                    d = Digest.from_filename(fname)
                except InvalidDigest:
                    continue
            elif held_path in targets:  # a symlinked blob, used through its link
                d = targets[held_path]
            else:
                continue
            if d in snap.blobs:  # under either of its names (found from outside: a
                # model mapped under one name while the other existed was evicted)
                lst = self.held.setdefault(d, [])
                lst.extend(w for w in who if w not in lst)
        self.refcount: dict[Digest, int] = dict.fromkeys(snap.rescued, 1)
        for m in snap.models:
            for d in m.digests:
                self.refcount[d] = self.refcount.get(d, 0) + 1
        self.total = sum(entry.size for entry in snap.blobs.values())
        self.remaining = self.total
        self.delete: dict[Digest, int] = {}
        self.evicted: list[Model] = []
        # unreferenced blobs kept only because an Ollama download runs (and why)
        self.ollama_kept: dict[Digest, str] = {}
        self._young_before = snap.now - opts.grace  # modified after this: in grace

    def deletable(self, d: Digest) -> str | None:
        """None if blob ``d`` may go now, else the reason it stays."""
        if d in self.leased:
            return f"held by a running {holders(self.leased[d])}"
        if d in self.held:
            return f"in use by {', '.join(self.held[d])}"
        if self.snap.blobs[d].mtime > self._young_before:
            return "younger than the grace period"
        return None

    def blocked(self, m: Model) -> str | None:
        """None if model ``m`` may be evicted, else the reason it stays."""
        if m.state.pinned:
            return "pinned"
        if self.leased and not self.leased.keys().isdisjoint(m.digests):
            who = set().union(*(self.leased[d] for d in m.digests if d in self.leased))
            return f"a blob is held by a running {holders(who)}"
        if self.held:
            for d in m.digests:
                if d in self.held:
                    return f"in use by {', '.join(self.held[d])}"
        if self.snap.now - m.mtime < self.opts.grace:
            return "younger than the grace period"
        return None

    def drop(self, d: Digest) -> int:
        """Plan blob ``d`` (named by nobody, deletable) for deletion; bytes freed."""
        size = self.snap.blobs[d][1]
        self.delete[d] = size
        self.remaining -= size
        return size

    def evict(self, m: Model) -> int:
        """Plan model ``m``'s eviction; returns the bytes that frees."""
        freed = 0
        for d in m.digests:
            self.refcount[d] -= 1
            if (self.refcount[d] == 0 and d in self.snap.blobs and d not in self.delete
                    and self.deletable(d) is None):
                freed += self.drop(d)
        self.evicted.append(m)
        return freed

    def would_free(self, m: Model) -> int:
        """Bytes evicting ``m`` alone would free now."""
        blobs = self.snap.blobs
        return sum(blobs[d][1] for d in m.digests
                   if self.refcount.get(d) == 1 and d in blobs and d not in self.delete
                   and self.deletable(d) is None)

    def check(self) -> None:
        """Assert the invariants in the class docstring (tests call this)."""
        evicted = {id(m) for m in self.evicted}
        want = dict.fromkeys(self.snap.rescued, 1)
        for m in self.snap.models:
            if id(m) not in evicted:
                for d in m.digests:
                    want[d] = want.get(d, 0) + 1
        have = {d: c for d, c in self.refcount.items() if c}
        assert have == want, "refcount out of step with the models left"
        for d, size in self.delete.items():
            assert d in self.snap.blobs and self.snap.blobs[d][1] == size
            assert not want.get(d), f"{d} planned for deletion but still named"
            assert self.deletable(d) is None, f"{d} planned for deletion but protected"
        assert self.remaining == self.total - sum(self.delete.values())
        for m in self.evicted:
            assert self.blocked(m) is None, f"{m.name} evicted but {self.blocked(m)}"


def make_plan(snap: Snapshot, opts: GCOptions, *, check: bool = False) -> Plan:
    """What ``gc`` should do with the store in ``snap`` (pure: changes nothing).

    With ``check``, the ledger's invariants are asserted at the end (tests)."""
    ledger = Ledger(snap, opts)
    skipped: list[Skipped] = []
    now = snap.now

    # 1. unreferenced blobs. While Ollama downloads into blobs/, any of them may be a
    # layer its pull finished (or found present) and is about to reference: Ollama
    # writes the manifest only once every layer is there, so none goes.
    ollama = live_ollama_download(snap, opts)
    likely = None if ollama is not None else likely_ollama_pull(
        snap, opts, [d for d in snap.blobs if not ledger.refcount.get(d)])
    ollama = ollama or likely
    for d in snap.blobs:
        if ledger.refcount.get(d):
            continue
        why = ledger.deletable(d)
        if why is None and ollama is not None:
            why = ledger.ollama_kept[d] = f"{OLLAMA_PULL} ({ollama})"
        if why is None:
            ledger.drop(d)
        else:
            skipped.append(Skipped("blob", str(d), why))
    orphans = frozenset(ledger.delete)

    # 2. model eviction candidates, LRU order, oldest first
    candidates: list[Model] = []
    unevictable: list[Model] = []
    blocked_why: list[tuple[Model, str]] = []
    for m in sorted(snap.models, key=lambda m: (m.last_used, m.name.key)):
        why = ledger.blocked(m)
        wanted = (opts.max_size is not None) or (
            opts.older_than is not None and now - m.last_used > opts.older_than)
        if why is None:
            candidates.append(m)
            continue
        unevictable.append(m)
        if wanted:
            skipped.append(Skipped("model", str(m.name), why))
            blocked_why.append((m, why.split(" by ")[0]))

    alive = [True] * len(candidates)
    if opts.older_than is not None:
        for i, m in enumerate(candidates):
            if now - m.last_used > opts.older_than:
                ledger.evict(m)
                alive[i] = False

    cap_met, cap_reason = True, ""
    if opts.max_size is not None and likely is not None and ledger.remaining > opts.max_size:
        # only a guess that Ollama pulls: no model is evicted on it (the blobs kept may
        # be garbage, and a model evicted for them would be downloaded again; found by
        # review): the cap waits for a later run
        cap_met = False
        cap_reason = (f"{OLLAMA_PULL} ({likely}): no model is evicted for the cap while "
                      "it may be; run gc again when it has finished")
    elif opts.max_size is not None:
        _evict_to_cap(ledger, candidates, alive, unevictable, opts.max_size)
        if ledger.remaining > opts.max_size:
            cap_met = False
            cap_reason = _cap_reason(ledger, blocked_why)
    if check:
        ledger.check()
    # a model's hidden manifests/ files go with it (snapshot.Model.hides)
    evicted = [x for m in ledger.evicted for x in (m, *m.hides)]
    return Plan(evicted, ledger.delete, _stale_ingests(snap, ledger, skipped), skipped,
                ledger.total, ledger.remaining, cap_met, cap_reason, orphans, ollama,
                {d: snap.blobs[d].size for d in ledger.ollama_kept})


def _evict_to_cap(ledger: Ledger, candidates: list[Model], alive: list[bool],
                  unevictable: list[Model], cap: int) -> None:
    """The oldest model whose eviction frees bytes *now* goes next. A model whose blobs
    are all shared is passed over (evicting it alone frees nothing) while any model
    frees bytes; when none does, the oldest model that shares blobs only with other
    evictable models goes, so that a group of models sharing a blob can be evicted.
    Models sharing only with unevictable ones are never evicted for nothing."""
    snap = ledger.snap
    # Blobs that stay whatever we do: named by a model that cannot be evicted.
    kept_anyway = set(snap.rescued)
    for m in unevictable:
        kept_anyway |= m.digests
    first = 0

    def pick(pred: Callable[[Model], bool]) -> int | None:
        nonlocal first
        while first < len(candidates) and not alive[first]:
            first += 1
        for i in range(first, len(candidates)):
            if alive[i] and pred(candidates[i]):
                return i
        return None

    def could_free(m: Model) -> bool:
        return any(d not in kept_anyway and d not in ledger.delete and d in snap.blobs
                   and ledger.deletable(d) is None for d in m.digests)

    while ledger.remaining > cap:
        victim = pick(lambda m: ledger.would_free(m) > 0)
        if victim is None:
            victim = pick(could_free)
        if victim is None:
            break
        alive[victim] = False
        ledger.evict(candidates[victim])


def _cap_reason(ledger: Ledger, blocked_why: list[tuple[Model, str]]) -> str:
    """What stays because of each reason, counted after the evictions (a blob shared
    with an evicted model is now the kept model's alone), once per blob."""
    snap = ledger.snap
    blocked_reasons: dict[str, int] = {}
    counted: set[Digest] = set()
    for m, why in blocked_why:
        kept = [d for d in m.digests
                if d in snap.blobs and d not in ledger.delete and d not in counted]
        counted.update(kept)
        blocked_reasons[why] = blocked_reasons.get(why, 0) + sum(snap.blobs[d][1] for d in kept)
    # unreferenced blobs kept for their own sake: a running pull's lease, a process that
    # has them open, the grace period (found from outside: these were reported as "0 B
    # needed by models that cannot be evicted")
    for d, entry in snap.blobs.items():
        if d in ledger.delete or d in counted or ledger.refcount.get(d, 0) > 0:
            continue
        held = ledger.deletable(d)
        if held is None and d in ledger.ollama_kept:
            held = OLLAMA_PULL
        if held is not None:
            counted.add(d)
            blocked_reasons[held] = blocked_reasons.get(held, 0) + entry[1]
    parts = [f"{human_bytes(n)} {k}" for k, n in sorted(blocked_reasons.items()) if n]
    shared = sum(snap.blobs[d][1] for d, c in ledger.refcount.items()
                 if c > 0 and d in snap.blobs)
    return ("; ".join(parts) if parts else
            f"{human_bytes(shared)} needed by models that cannot be evicted")


def _stale_ingests(snap: Snapshot, ledger: Ledger,
                   skipped: list[Skipped]) -> list[tuple[Path, int]]:
    """Ingests (and Ollama's ``-partial`` files) whose writer is gone (no live owner, no
    live lease), silent for longer than the ingest grace (by the writer's heartbeat, see
    ``blobstore.ingest.scan``) and open by nobody. The files of one Ollama download stay
    or go together (``ollama_download``)."""
    why = [ingest_kept(e, snap.now, ledger.opts.ingest_grace, snap.ingest_open)
           for e in snap.ingests]
    downloads: dict[Path, str] = {}  # data file -> why one of its files stays
    for e, reason in zip(snap.ingests, why, strict=True):
        data = ollama_download(e.path)
        if data is not None and reason is not None:
            downloads.setdefault(data, f"part of a running download ({data.name}: {reason})")
    out: list[tuple[Path, int]] = []
    for e, own in zip(snap.ingests, why, strict=True):
        data = ollama_download(e.path)
        reason = own if own is not None or data is None else downloads.get(data)
        if reason is None:
            out.append((e.path, e.bytes))
        else:
            skipped.append(Skipped("ingest", str(e.path), reason))
    return out


def live_ollama_download(snap: Snapshot, opts: GCOptions) -> str | None:
    """The first Ollama download in ``blobs/`` that is live by the rule that keeps its
    files (``ingest_kept``: open, young or leased), as ``<data file>: <why>``; else None."""
    for e in snap.ingests:
        data = ollama_download(e.path)
        if data is None:
            continue
        why = ingest_kept(e, snap.now, opts.ingest_grace, snap.ingest_open)
        if why is not None:
            return f"{data.name}: {why}"
    return None


# how recent a finished layer must be to suggest a running Ollama pull (between two
# layers, and while Ollama verifies them, no -partial file is there: seconds to minutes)
LIKELY_PULL_WINDOW = 600.0


def likely_ollama_pull(snap: Snapshot, opts: GCOptions,
                       unreferenced: Iterable[Digest]) -> str | None:
    """Why an Ollama pull may be running although no ``-partial`` file is there: an
    Ollama process runs and an ``unreferenced`` blob came within the last
    ``LIKELY_PULL_WINDOW`` seconds (and the grace period): a layer a pull just finished
    (found from outside: between two layers and while Ollama verified them, the pull's
    older layers went, and Ollama failed after the download). Else None."""
    window = min(opts.grace, LIKELY_PULL_WINDOW)
    young = [(age, d) for d in unreferenced
             if -60 <= (age := snap.now - snap.blobs[d].mtime) < window]
    # (a blob from the future, beyond a clock's small skew, says nothing about now)
    if not young:
        return None
    from blobstore.inuse import ollama_running

    proc = ollama_running()
    if proc is None:
        return None
    age, d = min(young)
    return (f"{proc} is running and {d.filename} came {max(age, 0):.0f} s ago with no "
            "manifest yet")


def ollama_download(path: Path) -> Path | None:
    """The data file (``blobs/<digest name>-partial``) of the Ollama download that the
    ``blobs/`` file at ``path`` belongs to, else None. Ollama writes the data file (kept
    open) and one ``-partial-N`` file per part, rewritten as the part completes, and at
    the end removes every part file, failing on one that is gone (server/download.go):
    a part file is judged with its download, never alone (found from outside: GC removed
    the part files of a running download)."""
    name = path.name
    i = name.find("-partial")
    if i < 0 or path.parent.name != "blobs":
        return None
    return path.with_name(name[:i] + "-partial")


def ingest_kept(e: IngestEntry, now: float, grace: float,
                is_open: Callable[[Path], bool]) -> str | None:
    """Why the ingest entry ``e`` must stay, or None if it may go: the one rule for the
    plan and for apply's re-check just before the removal."""
    if e.leased:
        return "held by the lease of a running command"
    if e.owner_alive:
        return "its writer is running"
    if e.age(now) < grace:
        return "younger than the ingest grace period"
    if is_open(e.path):
        return "open by a running process"
    return None
