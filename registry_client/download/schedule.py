"""The download schedule: which bytes of which blob to fetch next (spec/pull.md).

Pure bookkeeping, no I/O and no threads: the engine calls these methods under its one
lock and passes the clock in, so a test can drive every event (piece start, progress,
failure, steal, hash, kill) in any order and check :meth:`Schedule.check` after each.

Every byte of every unfinished blob is exactly one of:

* **hashed**: before the chunk at ``plan.frontier`` (fed to the in-order hasher);
* **on disk**: in a chunk finished in an earlier run (``chunk.on_disk``), or counted in
  ``chunk.filled`` (written by a piece of this run);
* **live**: in ``[piece.pos, piece.limit)`` of a piece a worker holds;
* **pending**: in ``[piece.pos, piece.limit)`` of a piece waiting in ``chunk.pending``.

A piece's bytes move from live to written only in :meth:`Schedule.account`, after they
were written, and a failed piece goes back to pending from its first unwritten byte: a
byte can be fetched twice, never lost. :meth:`Schedule.stalled` is true when nothing can
ever move again (nothing live, nothing pending in reach, the frontier chunk incomplete):
the engine raises that as an internal error at once instead of waiting.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["Chunk", "ConnectionTuner", "Piece", "Plan", "Schedule", "ScheduleError",
           "SchedulerOptions", "Task", "chunk_ranges"]


class ScheduleError(AssertionError):
    """The schedule's invariant was broken: a bug, never a network condition."""


@dataclass(frozen=True)
class SchedulerOptions:
    window_chunks: int = 12           # unhashed chunks fetched at once, past the frontier
    min_steal: int = 64 * 1024        # never leave a range smaller than this
    steal_age: float = 0.15           # only steal from a range running this long …
    steal_eta: float = 0.4            # … whose projected finish is further away than this
    first_byte_wait: float = 2.0      # a range with no byte yet is split only after this
    attempts: int = 8                 # tries per range before the pull fails
    progress_bytes: int = 64 * 1024   # a try that delivers this much is not a failure
    # moving a laggard (a range far slower than the others) to another connection
    move_age: float = 1.0             # judged only after running this long (once more
                                      # for each earlier move of the same bytes) …
    move_ratio: float = 8.0           # … at less than the typical rate / this …
    move_gain: float = 1.0            # … when a typical connection would save this (s)
    move_fresh: float = 5.0           # finished ranges older than this are no evidence
    # a probe: with a worker idle and no range moved on evidence, the slowest range whose
    # rest would take this long at its rate moves to another connection (one at a time)
    probe_eta: float = 2.0


class Piece:
    """Bytes ``[pos, limit)`` of one chunk; ``[pos, reserved)`` is being written now."""

    __slots__ = ("body", "chunk", "fails", "first", "limit", "mark", "moves", "moving",
                 "not_before", "pos", "probe", "recent", "reserved", "started")

    def __init__(self, chunk: Chunk, pos: int, limit: int, fails: int = 0,
                 not_before: float = 0.0, moves: int = 0) -> None:
        self.chunk = chunk
        self.pos = pos
        self.first = pos
        self.limit = limit
        self.reserved = pos
        self.fails = fails
        self.not_before = not_before
        self.started = 0.0
        self.moves = moves      # times its bytes were moved off a slow connection
        self.moving = False     # being moved now: its connection is being dropped
        self.probe = False      # moved by a probe (:meth:`Schedule.probe`), or its rest
        self.body = -1.0        # when its response's body began (-1: no response yet)
        self.recent = -1.0      # bytes/s over its last closed period (-1: none yet)
        self.mark = (pos, 0.0)  # (pos, time) its open period starts at

    def rate(self, now: float) -> float:
        age, got = now - self.started, self.pos - self.first
        return got / age if got > 0 and age > 0 else 0.0

    def eta(self, now: float) -> float:
        rate = self.rate(now)
        return (self.limit - self.pos) / rate if rate > 0 else float("inf")

    def __repr__(self) -> str:
        return (f"Piece(chunk={self.chunk.index}, {self.pos}-{self.limit}, "
                f"reserved={self.reserved}, fails={self.fails})")


class Chunk:
    __slots__ = ("end", "filled", "index", "on_disk", "pending", "pieces", "seeded", "start")

    def __init__(self, index: int, start: int, end: int, on_disk: bool = False,
                 have: list[tuple[int, int]] | None = None) -> None:
        self.index = index
        self.start = start
        self.end = end
        self.on_disk = on_disk
        self.filled = 0
        self.seeded = False              # part of it was on disk before this run fetched
        self.pieces: list[Piece] = []   # live
        self.pending: list[Piece] = []  # waiting for a worker
        if not on_disk and end > start:
            # ``have``: sorted, disjoint sub-ranges already written (a delta's copies):
            # they count as filled; only the gaps between them are fetched
            pos = start
            for hs, he in have or ():
                s, e = max(hs, pos), min(he, end)
                if e <= s:
                    continue
                if s > pos:
                    self.pending.append(Piece(self, pos, s))
                self.filled += e - s
                self.seeded = True
                pos = e
            if pos < end:
                self.pending.append(Piece(self, pos, end))

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def done(self) -> bool:
        return self.on_disk or self.filled == self.length

    def __repr__(self) -> str:
        return (f"Chunk({self.index}, {self.start}-{self.end}, filled={self.filled}, "
                f"on_disk={self.on_disk}, live={self.pieces}, pending={self.pending})")


def chunk_ranges(size: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, size, chunk_size):
        yield start, min(size, start + chunk_size)


@dataclass(eq=False)
class Plan:
    """One blob's chunks and where its hash frontier stands."""

    key: str
    size: int
    chunk_size: int
    chunks: list[Chunk]
    frontier: int = 0        # index of the next chunk to hash
    hashing: bool = False    # the hasher holds chunk[frontier] now
    single: bool = False     # the server ignores Range: one stream for the whole blob
    single_taken: bool = False
    complete: bool = False   # every chunk hashed (or the single stream finished)
    failed: bool = False
    holders: int = 0         # workers holding a piece of this plan (or its one stream)
    todo: list[int] = field(default_factory=list)  # indexes of chunks not on disk
    todo_pos: int = 0        # first entry of ``todo`` at or past the frontier
    fetched: int = 0         # bytes accounted in this run

    @classmethod
    def make(cls, key: str, size: int, chunk_size: int,
             on_disk: set[tuple[int, int]] | None = None,
             seeded: list[tuple[int, int]] | None = None) -> Plan:
        """``on_disk``: whole chunks an earlier run finished; ``seeded``: sorted, disjoint
        byte ranges written before this run at any offsets (a delta's copies): chunks
        they cover whole count as on disk, the others fetch only their gaps."""
        have = on_disk or set()
        chunks = []
        k = 0
        runs = seeded or []
        for i, (s, e) in enumerate(chunk_ranges(size, chunk_size)):
            while k < len(runs) and runs[k][1] <= s:
                k += 1
            part = []
            j = k
            while j < len(runs) and runs[j][0] < e:
                part.append(runs[j])
                j += 1
            whole = (s, e) in have or (len(part) == 1 and part[0][0] <= s and part[0][1] >= e)
            chunks.append(Chunk(i, s, e, whole, None if whole else part))
        return cls(key, size, chunk_size, chunks, complete=size == 0,
                   todo=[c.index for c in chunks if not c.on_disk])

    @property
    def active(self) -> bool:
        return not (self.complete or self.failed)

    def _advance_todo(self) -> None:
        while self.todo_pos < len(self.todo) and self.todo[self.todo_pos] < self.frontier:
            self.todo_pos += 1

    def unhashed(self) -> Iterator[Chunk]:
        """Chunks past the frontier still to fetch (not on disk), in order."""
        chunks, todo = self.chunks, self.todo
        for i in range(self.todo_pos, len(todo)):
            yield chunks[todo[i]]

    def done_bytes(self) -> int:
        return sum(c.length if c.done else c.filled for c in self.chunks)


@dataclass(frozen=True)
class Task:
    plan: Plan
    piece: Piece | None  # None: the whole blob as one stream


@dataclass
class Schedule:
    opts: SchedulerOptions = field(default_factory=SchedulerOptions)
    plans: list[Plan] = field(default_factory=list)
    # bytes/s of the ranges that finished last (a moving average): what a connection of
    # this pull typically delivers, also when no other range is live (the tail)
    finished_rate: float = 0.0
    finished_at: float = float("-inf")  # when the last of them finished

    # ------------------------------------------------------------------ handing out
    def reach(self) -> Iterator[tuple[Plan, Chunk]]:
        """Chunks workers may fetch now: across the blobs in order, the first
        ``window_chunks`` unhashed chunks still to fetch (chunks on disk do not count).
        One budget for the whole pull: the bytes waiting in the page cache to be hashed
        stay at about the window. O(window)."""
        left = self.opts.window_chunks
        for plan in self.plans:
            if not plan.active or plan.single:
                continue
            for c in plan.unhashed():
                yield plan, c
                left -= 1
                if left <= 0:
                    return

    def next_task(self, now: float) -> Task | None:
        """A piece to fetch now (moved from pending to live), or None."""
        for plan in self.plans:
            # one stream, once no range writer of before the switch is left
            if plan.active and plan.single and not plan.single_taken and plan.holders == 0:
                plan.single_taken = True
                plan.holders += 1
                return Task(plan, None)
        for plan, c in self.reach():
            for i, p in enumerate(c.pending):
                if p.not_before <= now:
                    del c.pending[i]
                    p.started = now
                    p.first = p.pos
                    c.pieces.append(p)
                    plan.holders += 1
                    return Task(plan, p)
        return self._steal(now)

    def next_due(self, now: float) -> float | None:
        """Seconds until a pending piece in reach becomes due (None: none waiting)."""
        best: float | None = None
        for _plan, c in self.reach():
            for p in c.pending:
                wait = max(0.0, p.not_before - now)
                best = wait if best is None else min(best, wait)
        return best

    def _steal(self, now: float) -> Task | None:
        """Split the tail off a straggler: a range that has run a while and whose
        projected finish is far off (the chunk the hasher waits for first)."""
        o = self.opts
        best: tuple[float, Plan, Piece] | None = None
        rates: list[float] = []
        for plan, c in self.reach():
            for p in c.pieces:
                rate = p.rate(now)
                if rate > 0:
                    rates.append(rate)
                age = now - p.started
                # a range still waiting for its first byte is not split until it is
                # clearly stuck (a CDN's first byte can take a while)
                if (p.limit - p.reserved < 2 * o.min_steal or age < o.steal_age
                        or (rate == 0 and age < o.first_byte_wait)):
                    continue
                eta = p.eta(now)
                if eta < o.steal_eta:
                    continue
                score = min(eta, 1e9) * (4 if c.index == plan.frontier else 1)
                if best is None or score > best[0]:
                    best = (score, plan, p)
        if best is None:
            return None
        _, plan, victim = best
        remaining = victim.limit - victim.reserved
        rates.sort()
        own = victim.rate(now)
        if own > 0 and rates:
            rates.remove(own)
        typical = rates[len(rates) // 2] if rates else own
        share = own / (own + typical) if own > 0 and typical > 0 else 0.5
        keep = max(o.min_steal, min(remaining - o.min_steal, int(remaining * share)))
        mid = victim.reserved + keep
        tail = Piece(victim.chunk, mid, victim.limit)
        tail.started = now
        victim.limit = mid
        victim.chunk.pieces.append(tail)
        plan.holders += 1
        return Task(plan, tail)

    def body_started(self, piece: Piece, now: float) -> None:
        """``piece``'s response has come; its body starts now (the clock of
        :meth:`laggards`: a slow first byte is the stall timeout's business)."""
        piece.body = now
        piece.mark = (piece.pos, now)
        piece.recent = -1.0

    def laggards(self, now: float) -> list[tuple[Plan, Piece]]:
        """Live ranges to move to another connection (spec/pull.md, "Laggards"): whose
        body has run at least ``move_age`` (twice that for bytes moved once already, three
        times for twice, …), whose rate (:meth:`_rate_now`) is under 1/``move_ratio`` of
        the typical rate, and where fetching the rest at the typical rate would finish
        ``move_gain`` seconds sooner. A range with no body byte yet qualifies only after
        ``first_byte_wait``. The typical rate is the median of the other judged ranges'
        rates, or :attr:`finished_rate` if that is higher and fresh (a range finished
        within ``move_fresh`` seconds, or at most one other range is live: the tail has
        nothing else to go by): ranges that finished lately show what a fresh connection
        gets, even while most live ones are slow; once the whole link has slowed down for
        ``move_fresh`` seconds that evidence is gone, and nothing moves but the tail.
        Stealing cannot help such a range: the bytes it is receiving now are its own, and
        it keeps at least ``min_steal`` more. The caller drops their connections and
        marks them ``moving``; :meth:`release` then puts the rest back at once, not as a
        failure."""
        o = self.opts
        live = [(plan, p) for plan, c in self.reach() for p in c.pieces if p.body >= 0]
        if not live:
            return []
        rates = {p: self._rate_now(p, now) for _plan, p in live}
        # the rates of ranges judged long enough that got bytes: each one's "others"
        # are this list without its own rate
        judged = sorted(r for p, r in rates.items() if now - p.body >= o.move_age and r > 0)
        # finished ranges as evidence; the tail (at most one other live range) has
        # nothing else to go by
        fresh = now - self.finished_at <= o.move_fresh or len(live) <= 2
        finished = self.finished_rate if fresh else 0.0
        out = []
        for plan, p in live:
            age = now - p.body
            if p.moving or age < o.move_age * (1 + p.moves):
                continue
            if p.pos == p.first and age < o.first_byte_wait:
                continue
            own = rates[p]
            if own > 0:  # the median of ``judged`` without its own rate
                i = bisect.bisect_left(judged, own)
                k = (len(judged) - 1) // 2
                median = judged[k if k < i else k + 1] if len(judged) >= 2 else 0.0
            else:        # (its own rate is not in the list)
                median = judged[len(judged) // 2] if judged else 0.0
            typical = max(median, finished)
            if typical <= 0 or own * o.move_ratio >= typical:
                continue
            left = p.limit - p.pos
            if left > 0 and (own == 0 or left / own - left / typical >= o.move_gain):
                out.append((plan, p))
        return out

    def probe(self, now: float) -> tuple[Plan, Piece] | None:
        """A live range to move to another connection without evidence that one is faster
        (spec/pull.md, "Laggards", probes), for when a worker is idle and :meth:`laggards`
        moved nothing: where every range in reach trickles (a tiny blob, a small window,
        the tail), no range is faster to compare with and none may be small enough to
        split, so only trying shows whether a fresh connection is faster. If it is, its
        range finishes soon and :attr:`finished_rate` moves the others on evidence.

        The range whose rest would take longest at its rate (:meth:`_rate_now`), if that
        is at least ``probe_eta`` and its body has run ``move_age`` (``first_byte_wait``
        with no byte yet). One probe at a time: none while the rest of the last one waits
        for a worker, its response, or ``move_age`` of its body. That spaces probes, so
        they do without the growing wait of moves on evidence: a server whose first few
        connections all trickle is tried about once a second, not ever more rarely. The
        caller marks it ``moving`` and ``probe``; :meth:`release` puts the rest back at
        once, marked ``probe`` (until then, the piece being moved holds the next probe
        back too)."""
        o = self.opts
        best: tuple[float, Plan, Piece] | None = None
        for plan, c in self.reach():
            for p in c.pending:
                if p.probe:
                    return None  # the last probe's rest waits for a worker
            for p in c.pieces:
                if p.probe and (p.moving or p.body < 0 or now - p.body < o.move_age):
                    return None  # the last probe is being moved, or is not judged yet
                if p.moving or p.body < 0:
                    continue
                age = now - p.body
                if age < o.move_age or (p.pos == p.first and age < o.first_byte_wait):
                    continue
                left = p.limit - p.pos
                own = self._rate_now(p, now)
                eta = left / own if own > 0 else float("inf")
                if left > 0 and eta >= o.probe_eta and (best is None or eta > best[0]):
                    best = (eta, plan, p)
        return None if best is None else (best[1], best[2])

    def _rate_now(self, p: Piece, now: float) -> float:
        """``p``'s rate, clocked from its first body byte (0 until then): over its open
        period until a period of at least ``move_age`` has closed, then the higher of the
        last closed one and the open one. A range that started fast and then slowed down
        counts as slow once a whole period was slow (not once its average caught up);
        one that recovers counts as fast at once; one silent for a whole period is 0."""
        pos0, t0 = p.mark
        if p.pos == p.first:  # no byte yet: the clock waits for the first one
            p.mark = (p.pos, now)
            return 0.0
        if now - t0 >= self.opts.move_age:
            p.recent = (p.pos - pos0) / (now - t0)
            p.mark = (p.pos, now)
            return p.recent
        current = (p.pos - pos0) / (now - t0) if now > t0 else 0.0
        return max(p.recent, current)

    # ------------------------------------------------------------------ progress
    def reserve(self, piece: Piece, most: int) -> int:
        """Claim up to ``most`` bytes from ``piece.pos`` for writing; return the end of the
        claim (``piece.pos`` when the piece has nothing left: stolen or finished)."""
        end = min(piece.limit, piece.pos + most)
        piece.reserved = max(piece.pos, end)
        return piece.reserved

    def shorten(self, plan: Plan, piece: Piece, end: int, now: float) -> bool:
        """``piece``'s response covers only up to ``end``: the piece ends there and the rest
        goes back to pending, due at once and with no failure counted (never tried).
        False if that changes nothing (the response covers all that is still ``piece``'s).
        """
        if plan.single or not plan.active or not piece.reserved <= end < piece.limit:
            return False
        rest = Piece(piece.chunk, end, piece.limit, 0, now, piece.moves)
        piece.limit = end
        piece.chunk.pending.insert(0, rest)
        return True

    def account(self, plan: Plan, piece: Piece, upto: int) -> bool:
        """Bytes ``[piece.pos, upto)`` are written. True if that finished the chunk."""
        if plan.single:
            return False  # ranges were dropped; the one stream rewrites everything
        if not piece.pos <= upto <= piece.limit:
            raise ScheduleError(f"account {upto} outside {piece!r}")
        n = upto - piece.pos
        piece.pos = upto
        piece.reserved = max(piece.reserved, upto)
        c = piece.chunk
        c.filled += n
        plan.fetched += n
        if piece.pos - piece.first >= self.opts.progress_bytes or piece.pos >= piece.limit:
            piece.fails = 0  # a try that got somewhere; a trickle then a drop still counts
        if c.filled > c.length:
            raise ScheduleError(f"chunk overfilled: {c!r}")
        return n > 0 and c.filled == c.length

    def release(self, plan: Plan, piece: Piece | None, now: float, delay: float = 0.0) -> int:
        """The worker let go of ``piece`` (None: the one stream). Its unwritten bytes go
        back to pending, due after ``delay``. Returns the failure count (without
        progress) of the bytes put back, 0 when none were left. A piece being moved off
        a slow connection (``moving``) goes back due at once, not as a failure (0)."""
        plan.holders -= 1
        if plan.holders < 0:
            raise ScheduleError(f"release without a holder in {plan.key}")
        if piece is None:
            return 0
        self._unlink(piece)
        piece.reserved = piece.pos
        if piece.pos >= piece.limit:
            age = now - piece.started
            if age > 0 and piece.pos > piece.first:  # (a small range's rate has its
                # request's round trip in it: an estimate on the low side)
                rate = (piece.pos - piece.first) / age
                self.finished_rate = (rate if self.finished_rate <= 0
                                      else 0.7 * self.finished_rate + 0.3 * rate)
                self.finished_at = now
            return 0
        if plan.single or not plan.active:
            return 0
        if not piece.moving:  # (moved off a slow connection: not a failure, due at once)
            piece.fails += 1
        again = Piece(piece.chunk, piece.pos, piece.limit, piece.fails,
                      now if piece.moving else now + delay, piece.moves)
        again.probe = piece.moving and piece.probe
        piece.chunk.pending.insert(0, again)
        return 0 if piece.moving else piece.fails

    @staticmethod
    def _unlink(piece: Piece) -> None:
        if piece in piece.chunk.pieces:
            piece.chunk.pieces.remove(piece)

    def go_single(self, plan: Plan) -> None:
        """The server ignores Range: drop every range of ``plan``; one stream instead."""
        if plan.single:
            return
        plan.single = True
        plan.single_taken = False
        for c in plan.chunks:
            c.pending.clear()
            for p in c.pieces:
                p.limit = p.reserved = p.pos  # its holder stops at the next claim
            c.pieces.clear()

    # ------------------------------------------------------------------ hashing
    def hash_ready(self) -> tuple[Plan, Chunk] | None:
        """The next chunk the hasher may take (marks it taken)."""
        for plan in self.plans:
            c = self.hash_take(plan)
            if c is not None:
                return plan, c
        return None

    def hash_take(self, plan: Plan) -> Chunk | None:
        """``plan``'s frontier chunk if it may be hashed now (marks it taken), else None.
        (A worker that completed a blob of one chunk hashes it itself.)"""
        if plan.active and not plan.single and not plan.hashing \
                and plan.frontier < len(plan.chunks):
            c = plan.chunks[plan.frontier]
            if c.done:
                plan.hashing = True
                return c
        return None

    def hash_ready_peek(self) -> tuple[Plan, Chunk] | None:
        """What :meth:`hash_ready` would hand out, without taking it."""
        for plan in self.plans:
            if plan.active and not plan.single and not plan.hashing \
                    and plan.frontier < len(plan.chunks) and plan.chunks[plan.frontier].done:
                return plan, plan.chunks[plan.frontier]
        return None

    def hashed(self, plan: Plan, chunk: Chunk) -> None:
        """The hasher consumed ``chunk``; the frontier moves on."""
        if not plan.hashing or plan.chunks[plan.frontier] is not chunk:
            raise ScheduleError(f"hashed out of order: {chunk!r} at frontier {plan.frontier}")
        plan.hashing = False
        plan.frontier += 1
        plan._advance_todo()
        if plan.frontier == len(plan.chunks):
            plan.complete = True

    # ------------------------------------------------------------------ invariants
    def check(self, *, full: bool = False) -> None:
        """Raise ScheduleError unless every byte is exactly one of hashed / on disk /
        written / live / pending (see the module docstring).

        By default only the chunks in reach (the only ones that change: O(window), cheap
        enough for the engine's watchdog); ``full`` checks every chunk (tests)."""
        if not full:
            for _plan, c in self.reach():
                self._check_chunk(c)
            return
        for plan in self.plans:
            if not plan.active or plan.single:
                continue
            pos = 0
            for i, c in enumerate(plan.chunks):
                if c.start != pos or c.end <= c.start:
                    raise ScheduleError(f"chunks do not tile the blob at {c!r}")
                pos = c.end
                if i < plan.frontier and not c.done:
                    raise ScheduleError(f"hashed chunk not complete: {c!r}")
                self._check_chunk(c)
            if pos != plan.size:
                raise ScheduleError(f"chunks cover {pos} of {plan.size} bytes")
            if plan.todo != [c.index for c in plan.chunks if not c.on_disk]:
                raise ScheduleError("todo list out of step with the chunks")

    @staticmethod
    def _check_chunk(c: Chunk) -> None:
        if c.on_disk:
            if c.pieces or c.pending or c.filled:
                raise ScheduleError(f"on-disk chunk with work: {c!r}")
            return
        spans = sorted((p.pos, p.limit) for p in (*c.pieces, *c.pending) if p.limit > p.pos)
        last = c.start
        for s, e in spans:
            if s < last or e > c.end:
                raise ScheduleError(f"overlapping or stray ranges in {c!r}")
            last = e
        open_bytes = sum(e - s for s, e in spans)
        if c.filled + open_bytes != c.length:
            raise ScheduleError(f"chunk bytes do not add up: filled {c.filled} + open "
                                f"{open_bytes} != {c.length} in {c!r}")

    def stalled(self, hasher_busy: bool) -> list[Plan]:
        """Active plans that can never progress again: nothing live or pending in reach,
        no single stream to start or running, the hasher idle with nothing to take."""
        if hasher_busy:
            return []
        for _plan, c in self.reach():
            if c.pieces or c.pending:
                return []  # something is in flight or can be taken (maybe after a delay)
        active = [p for p in self.plans if p.active]
        for plan in active:
            if plan.single or plan.hashing or (plan.frontier < len(plan.chunks)
                                               and plan.chunks[plan.frontier].done):
                return []  # its one stream is pending or live; or the hasher can go on
        return active

    def describe(self) -> str:
        """The state, for an internal error in --debug."""
        lines = []
        for plan in self.plans:
            lines.append(f"{plan.key}: size={plan.size} chunk={plan.chunk_size} "
                         f"frontier={plan.frontier}/{len(plan.chunks)} hashing={plan.hashing} "
                         f"single={plan.single} complete={plan.complete} failed={plan.failed}")
            lines.extend(f"  {c!r}" for c in plan.chunks[plan.frontier:plan.frontier + 40]
                         if not c.done or c.pieces or c.pending)
        return "\n".join(lines)


class ConnectionTuner:
    """How many connections to use: grows while the aggregate rate rises (pure; the
    engine feeds it samples).

    Where each connection is capped (a per-connection rate limit, a CDN's fairness) the
    rate grows with the count; where the server, the wire or the CPU is the limit, it does
    not, and more connections only cost. So: every ``period`` seconds compare the rate
    with the previous period's; grow by ``step`` while it rose by ``gain`` or more and
    the machine has idle CPU; when a step bought less, go back one step and stay there.
    """

    def __init__(self, start: int, most: int, *, step: int = 8, period: float = 0.4,
                 gain: float = 1.15, busy: float = 0.75) -> None:
        self.target = max(1, min(start, most))
        self.most = most
        self.step = step
        self.period = period
        self.gain = gain
        self.busy = busy
        self.settled = self.target >= most
        self._t0: float | None = None
        self._b0 = 0
        self._last_rate: float | None = None
        self._previous = self.target

    @property
    def last_sample(self) -> float:
        """When the current period started (-inf before the first sample)."""
        return float("-inf") if self._t0 is None else self._t0

    def sample(self, now: float, total_bytes: int, cpu_busy: float = 0.0) -> int:
        """Feed the bytes received so far (and the machine's CPU busy share over the
        period, 0-1)."""
        if self._t0 is None:
            self._t0, self._b0 = now, total_bytes
            return self.target
        if now - self._t0 < self.period:
            return self.target
        rate = (total_bytes - self._b0) / (now - self._t0)
        self._t0, self._b0 = now, total_bytes
        if self.settled:
            return self.target
        if self._last_rate is None or rate >= self._last_rate * self.gain:
            self._last_rate = rate if self._last_rate is None else max(rate, self._last_rate)
            if cpu_busy >= self.busy or self.target >= self.most:
                self.settled = True
            else:
                self._previous = self.target
                self.target = min(self.most, self.target + self.step)
        else:  # the last step bought nothing: undo it and stay
            self.target = self._previous
            self.settled = True
        return self.target
