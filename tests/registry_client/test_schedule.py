"""The download schedule as a hypothesis state machine: pieces start, make progress, fail,
get stolen, get shorter responses, are moved off slow connections (on evidence or as
probes), are hashed, and the whole run is killed and resumed, in any order. After every
step every byte is exactly one of hashed / on disk / live / pending (``Schedule.check``),
and a state where nothing can move is only ever the finished one."""

from __future__ import annotations

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from registry_client.download.schedule import (
    Chunk,
    ConnectionTuner,
    Piece,
    Plan,
    Schedule,
    SchedulerOptions,
    chunk_ranges,
)


class ScheduleMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.held: list[tuple[Plan, Piece | None]] = []
        self.written: dict[str, bytearray] = {}
        self.hashed_upto: dict[str, int] = {}
        self.hashing: list[tuple[Plan, Chunk]] = []  # taken by a worker, not yet hashed

    @initialize(sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=3),
                chunk=st.integers(16, 700), window=st.integers(1, 6),
                min_steal=st.integers(1, 64), disk=st.randoms(use_true_random=False),
                typical=st.sampled_from([0.0, 20.0, 200.0]))
    def setup(self, sizes: list[int], chunk: int, window: int, min_steal: int,
              disk: object, typical: float) -> None:
        import random

        assert isinstance(disk, random.Random)
        self.opts = SchedulerOptions(window_chunks=window, min_steal=min_steal, steal_age=0.0,
                                     steal_eta=0.0, attempts=1000, progress_bytes=1,
                                     move_age=0.1, move_ratio=2.0, move_gain=0.0,
                                     first_byte_wait=0.5, probe_eta=0.5)
        plans = []
        for i, size in enumerate(sizes):
            key = f"blob{i}"
            on_disk = {r for r in chunk_ranges(size, chunk) if disk.random() < 0.3}
            plans.append(Plan.make(key, size, chunk, on_disk))
            self.written[key] = bytearray(size)
            for s, e in on_disk:
                self.written[key][s:e] = b"\x01" * (e - s)
            self.hashed_upto[key] = 0
        self.sched = Schedule(self.opts, plans)
        # as if earlier ranges had just finished at it
        self.sched.finished_rate, self.sched.finished_at = typical, 0.0

    # ------------------------------------------------------------------ events
    @rule()
    def take(self) -> None:
        task = self.sched.next_task(self.now)
        if task is not None:
            self.held.append((task.plan, task.piece))
            if task.piece is not None:
                self.sched.body_started(task.piece, self.now)

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 100), most=st.integers(1, 400), frac=st.floats(0, 1))
    def progress(self, i: int, most: int, frac: float) -> None:
        plan, piece = self.held[i % len(self.held)]
        if piece is None:
            return
        start = piece.pos
        end = self.sched.reserve(piece, most)
        assert start <= end <= piece.limit
        upto = start + int((end - start) * frac)
        buf = self.written[plan.key]
        assert not any(buf[start:upto]), "a byte was written twice while accounted once"
        buf[start:upto] = b"\x01" * (upto - start)
        self.sched.account(plan, piece, upto)

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 100), frac=st.floats(0, 1))
    def response_shorter(self, i: int, frac: float) -> None:
        """The server answers with less than the piece (its ``Content-Range`` ends
        sooner): the piece ends there, the rest is pending at once, with no failure."""
        plan, piece = self.held[i % len(self.held)]
        if piece is None:
            return
        end = piece.reserved + int((piece.limit - piece.reserved) * frac)
        limit, fails = piece.limit, piece.fails
        if self.sched.shorten(plan, piece, end, self.now):
            assert piece.limit == end and piece.fails == fails
            rest = piece.chunk.pending[0]
            assert (rest.pos, rest.limit, rest.fails) == (end, limit, 0)
            assert rest.not_before <= self.now, "the rest of a short response must be due"
        else:
            assert piece.limit == limit and not (piece.reserved <= end < limit
                                                 and plan.active and not plan.single)

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 100), delay=st.sampled_from([0.0, 0.0, 0.5, 2.0]))
    def let_go(self, i: int, delay: float) -> None:
        """The holder stops: finished, failed (reset, stall, bad status) or stolen from."""
        plan, piece = self.held.pop(i % len(self.held))
        fails = piece.fails if piece is not None else 0
        left = piece is not None and piece.pos < piece.limit and plan.active
        n = self.sched.release(plan, piece, self.now, delay)
        if piece is not None and piece.moving and left and not plan.single:
            assert n == 0, "a moved range counted as a failure"
            again = piece.chunk.pending[0]
            assert (again.pos, again.limit, again.fails, again.moves, again.probe) == (
                piece.pos, piece.limit, fails, piece.moves, piece.probe)
            assert again.not_before <= self.now, "a moved range must be due at once"

    @rule(dt=st.sampled_from([0.0, 1.0, 3.0]))
    def move_laggards(self, dt: float) -> None:
        """Time passes; the engine drops the connections of ranges far slower than the
        rest and marks them moving. Their holders go on (a last batch, a steal, the end of
        the range) until they let go (``let_go``)."""
        self.now += dt
        for plan, piece in self.sched.laggards(self.now):
            assert not piece.moving and piece.pos < piece.limit
            assert (plan, piece) in self.held, "a laggard nobody holds"
            piece.moving = True
            piece.moves += 1

    @rule(dt=st.sampled_from([0.0, 0.1, 1.0]))
    def probe(self, dt: float) -> None:
        """Time passes; a worker is idle and nothing moved on evidence: the engine moves
        the range the schedule picks as a probe (one at a time)."""
        self.now += dt
        found = self.sched.probe(self.now)
        event("probe" if found is not None else "no probe")
        if found is None:
            return
        plan, piece = found
        assert (plan, piece) in self.held, "a probe nobody holds"
        assert not piece.moving and piece.pos < piece.limit and piece.body >= 0
        for _plan, c in self.sched.reach():
            assert not any(p.probe for p in c.pending), "a probe while one waits"
            assert not any(p.probe and (p.moving or self.now - p.body < self.opts.move_age)
                           for p in c.pieces), "a probe while the last is moved or unjudged"
        piece.moving = piece.probe = True
        piece.moves += 1

    @rule(dt=st.sampled_from([0.0, 0.1, 1.0, 3.0]))
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule()
    def hash_one(self) -> None:
        ready = self.sched.hash_ready()
        if ready is None:
            return
        plan, chunk = ready
        assert chunk.start == self.hashed_upto[plan.key], "hashed out of order"
        assert all(self.written[plan.key][chunk.start:chunk.end]), "hashed an unwritten byte"
        self.sched.hashed(plan, chunk)
        self.hashed_upto[plan.key] = chunk.end

    @rule(i=st.integers(0, 100))
    def worker_takes_hash(self, i: int) -> None:
        """A worker whose piece completed a blob takes its hash (the engine does so for
        blobs of one chunk; the schedule allows it for any frontier chunk) and holds it
        across other events."""
        plan = self.sched.plans[i % len(self.sched.plans)]
        chunk = self.sched.hash_take(plan)
        if chunk is None:
            return
        assert chunk.start == self.hashed_upto[plan.key], "taken out of order"
        assert all(self.written[plan.key][chunk.start:chunk.end]), "took an unwritten byte"
        assert self.sched.hash_take(plan) is None, "one chunk of a blob taken twice"
        event("a worker took a chunk's hash")
        self.hashing.append((plan, chunk))

    @rule()
    def worker_hashed(self) -> None:
        if not self.hashing:
            return
        plan, chunk = self.hashing.pop(0)
        self.sched.hashed(plan, chunk)
        self.hashed_upto[plan.key] = chunk.end

    @rule()
    def kill_and_resume(self) -> None:
        """kill -9: every holder vanishes; a new run adopts the chunks written whole."""
        plans = []
        for plan in self.sched.plans:
            buf = self.written[plan.key]
            done = {(c.start, c.end) for c in plan.chunks if c.done}
            for c in plan.chunks:  # partly written chunks are lost on resume
                if (c.start, c.end) not in done:
                    buf[c.start:c.end] = bytes(c.length)
            plans.append(Plan.make(plan.key, plan.size, plan.chunk_size, done))
            self.hashed_upto[plan.key] = 0
        self.held.clear()
        self.hashing.clear()
        self.sched = Schedule(self.opts, plans)

    # ------------------------------------------------------------------ invariants
    @invariant()
    def consistent(self) -> None:
        if hasattr(self, "sched"):
            self.sched.check(full=True)
            self.sched.check()

    @invariant()
    def never_stuck(self) -> None:
        """Nothing held, nothing to take, nothing to hash, nothing waiting: done."""
        if not hasattr(self, "sched") or self.held or self.hashing:
            return
        if self.sched.stalled(hasher_busy=False):
            raise AssertionError("stalled:\n" + self.sched.describe())
        probe = Schedule(self.opts, self.sched.plans)
        if (probe.next_due(self.now) is None and self.sched.hash_ready_peek() is None
                and not any(c.pending for p in self.sched.plans for c in p.chunks)):
            assert all(not p.active for p in self.sched.plans), self.sched.describe()

    def teardown(self) -> None:
        """Drain: with holders finishing their pieces, every blob completes."""
        if not hasattr(self, "sched"):
            return
        for _ in range(100_000):
            if all(not p.active for p in self.sched.plans):
                break
            if self.hashing:
                self.worker_hashed()
                continue
            if self.held:
                plan, piece = self.held.pop()
                if piece is not None:
                    end = self.sched.reserve(piece, piece.limit - piece.pos)
                    self.written[plan.key][piece.pos:end] = b"\x01" * (end - piece.pos)
                    self.sched.account(plan, piece, end)
                self.sched.release(plan, piece, self.now)
                continue
            task = self.sched.next_task(self.now)
            if task is not None:
                self.held.append((task.plan, task.piece))
                continue
            if self.sched.hash_ready_peek() is not None:
                self.hash_one()
                continue
            due = self.sched.next_due(self.now)
            assert due is not None, "stuck while draining:\n" + self.sched.describe()
            self.now += due + 0.001
        assert all(p.complete for p in self.sched.plans)
        for key, buf in self.written.items():
            assert all(buf), f"{key}: finished with bytes never written"


TestSchedule = ScheduleMachine.TestCase
TestSchedule.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)


def test_tuner_grows_while_rate_rises_and_backs_off() -> None:
    t = ConnectionTuner(16, 48, step=8, period=1.0)
    per_conn = 20.0  # a per-connection cap: the rate follows the count until 40 conns
    total, now = 0.0, 0.0
    t.sample(now, 0)
    seen = [t.target]
    for _ in range(10):
        now += 1.0
        total += min(t.target, 40) * per_conn
        seen.append(t.sample(now, int(total)))
    assert seen[0] == 16 and max(seen) == 48 and seen[-1] == 40 and t.settled


def test_tuner_stays_when_the_server_is_the_limit() -> None:
    t = ConnectionTuner(16, 48, step=8, period=1.0)
    t.sample(0.0, 0)
    total = 0
    for k in range(1, 8):
        total += 300
        t.sample(float(k), total)
    assert t.target == 16 and t.settled


def test_tuner_stops_growing_on_a_busy_cpu() -> None:
    t = ConnectionTuner(16, 48, step=8, period=1.0)
    t.sample(0.0, 0)
    t.sample(1.0, 100, cpu_busy=0.8)
    assert t.target == 16 and t.settled


# ---------------------------------------------------------------------- laggards
def _live(rates: list[float], *, age: float = 2.0, left: int = 1 << 20,
          opts: SchedulerOptions | None = None) -> tuple[Schedule, list[Piece]]:
    """A schedule with one live piece per rate (bytes/s), each started at 0 and ``left``
    bytes short of its end after ``age`` s (the rest of its chunk written by others)."""
    chunk = int(max(rates) * age) + left
    plan = Plan.make("b", chunk * len(rates), chunk)
    sched = Schedule(opts or SchedulerOptions(window_chunks=len(rates)), [plan])
    pieces = []
    for rate in rates:
        task = sched.next_task(0.0)
        assert task is not None and task.piece is not None
        p = task.piece
        got = int(rate * age)
        sched.reserve(p, got)
        sched.account(plan, p, p.pos + got)
        p.chunk.filled += p.limit - (p.pos + left)  # a thief wrote the tail
        p.limit = p.pos + left
        pieces.append(p)
    for p in pieces:  # (their bodies began at 0)
        p.body, p.mark = 1e-9, (p.first, 1e-9)
    sched.check()
    return sched, pieces


def test_a_range_far_slower_than_the_others_is_moved() -> None:
    sched, pieces = _live([20e6, 20e6, 20e6, 20e3])
    assert sched.laggards(2.0) == [(sched.plans[0], pieces[3])]


def test_equal_or_moderately_slower_ranges_stay() -> None:
    for rates in ([20e6] * 4, [20e6, 20e6, 20e6, 4e6], [1e3] * 3):
        sched, _ = _live(rates)
        assert sched.laggards(2.0) == [], rates


def test_a_young_range_or_one_almost_done_stays() -> None:
    sched, _ = _live([20e6, 20e6, 20e3], age=0.5)
    assert sched.laggards(0.5) == []            # not judged before move_age
    sched, _ = _live([20e6, 20e6, 20e3], left=16 << 10)
    assert sched.laggards(2.0) == []            # 16 KiB at 20 KB/s: under a second left


def test_the_tail_is_judged_against_the_ranges_that_finished() -> None:
    sched, pieces = _live([20e3])
    assert sched.laggards(2.0) == []            # nothing to compare with
    sched.finished_rate, sched.finished_at = 20e6, 0.5
    assert sched.laggards(2.0) == [(sched.plans[0], pieces[0])]


def test_stale_evidence_moves_nothing() -> None:
    """The whole link slowed down: what finished long ago says nothing about a fresh
    connection now."""
    sched, pieces = _live([8e3, 8e3, 8e3], age=8.0)
    sched.finished_rate, sched.finished_at = 20e6, 2.5
    assert sched.laggards(8.0) == []
    sched.finished_at = 3.5                     # 4.5 s ago: fresh
    assert len(sched.laggards(8.0)) == 3
    sched, pieces = _live([8e3], age=8.0)       # the tail: old evidence is all there is
    sched.finished_rate, sched.finished_at = 20e6, 0.5
    assert sched.laggards(8.0) == [(sched.plans[0], pieces[0])]


def test_a_first_byte_late_in_the_body_does_not_make_a_laggard() -> None:
    """Head at 0, first body byte at 1.6 s, then the typical rate: not moved (its clock
    starts at its first byte)."""
    sched, pieces = _live([5e6, 5e6, 5e6])
    late = pieces[2]
    late.chunk.filled -= late.pos - late.first
    late.pos = late.reserved = late.first
    late.body, late.mark, late.recent = 0.0, (late.first, 0.0), -1.0
    for t in (1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6):  # the watchdog ticks meanwhile
        assert sched.laggards(t) == []
    sched.reserve(late, int(5e6 * 0.05))
    sched.account(sched.plans[0], late, late.pos + int(5e6 * 0.05))
    assert sched.laggards(1.65) == []


def test_a_range_is_judged_from_when_its_body_began() -> None:
    """A slow first byte is not slowness of the body: the clock starts at the response,
    and a body that then flows like the others stays."""
    sched, pieces = _live([5e6, 5e6, 5e6])
    late = pieces[2]
    late.body, late.mark = 1.9, (late.first, 1.9)
    late.chunk.filled -= late.pos - late.first  # no body byte yet at 2.0
    late.pos = late.reserved = late.first
    sched.check()
    assert sched.laggards(2.0) == []            # 0.1 s into its body, not 2 s
    sched.reserve(late, int(5e6))
    sched.account(sched.plans[0], late, late.pos + int(5e6))
    assert sched.laggards(2.9) == []            # then flowing as fast as the others


def test_slow_ranges_move_when_fresh_ones_finished_fast() -> None:
    """Most live connections slow (the first requests hit a slow edge), but ranges that
    finished lately were fast: the slow ones move."""
    sched, pieces = _live([8e3, 8e3, 8e3, 8e3])
    assert sched.laggards(2.0) == []
    sched.finished_rate, sched.finished_at = 6e6, 1.5
    assert sched.laggards(2.0) == [(sched.plans[0], p) for p in pieces]


def test_bytes_moved_before_wait_longer() -> None:
    sched, pieces = _live([20e6, 20e6, 20e3], age=1.5)
    pieces[2].moves = 1
    assert sched.laggards(1.5) == []
    assert sched.laggards(2.0 + 0.01) == [(sched.plans[0], pieces[2])]


def test_a_range_without_a_first_byte_waits_first_byte_wait() -> None:
    sched, pieces = _live([20e6, 20e6, 0.0], age=1.5)
    assert sched.laggards(1.5) == []
    sched, pieces = _live([20e6, 20e6, 0.0], age=2.5)
    assert sched.laggards(2.5) == [(sched.plans[0], pieces[2])]
    sched, pieces = _live([20e6, 20e6], age=2.5)
    pieces[1].body = -1.0                        # no response yet: not ours to judge
    pieces[1].pos = pieces[1].first
    assert sched.laggards(2.5) == []


def test_a_range_that_slowed_down_shows_its_recent_rate() -> None:
    """Fast at first, then a trickle: judged by its latest period, not its average."""
    sched, pieces = _live([2e6, 2e6, 1e6], age=1.0, left=8 << 20)
    assert sched.laggards(1.001) == []          # (its first period closes here)
    for p, rate in zip(pieces, (2e6, 2e6, 1e3), strict=True):  # one more second
        sched.reserve(p, int(rate))
        sched.account(sched.plans[0], p, p.pos + int(rate))
    assert pieces[2].rate(2.002) * 8 > 2e6      # its average still looks fine
    assert sched.laggards(2.002) == [(sched.plans[0], pieces[2])]


# ---------------------------------------------------------------------- probes
def _move(sched: Schedule, piece: Piece, now: float, *, probe: bool) -> Piece:
    """What the engine does with a range it moves: mark it, drop its connection, and its
    holder lets go; returns the rest, pending."""
    piece.moving, piece.probe = True, probe
    piece.moves += 1
    assert sched.release(sched.plans[0], piece, now) == 0
    rest = piece.chunk.pending[0]
    assert (rest.pos, rest.limit, rest.not_before) == (piece.pos, piece.limit, now)
    return rest


def test_a_probe_takes_the_range_that_would_take_longest() -> None:
    """All trickle alike: no evidence, nothing moves on it; a probe takes the range with
    the longest rest at its rate, once its body has run move_age."""
    sched, pieces = _live([8e3, 4e3, 8e3], left=64 << 10)
    assert sched.laggards(2.0) == []
    assert sched.probe(0.5) is None             # not judged before move_age
    assert sched.probe(2.0) == (sched.plans[0], pieces[1])


def test_no_probe_when_the_rest_is_soon_done() -> None:
    sched, _ = _live([8e3, 8e3], left=8 << 10)  # about a second left at 8 KB/s
    assert sched.probe(2.0) is None
    sched, _ = _live([8e3, 8e3], left=8 << 10,
                     opts=SchedulerOptions(window_chunks=2, probe_eta=0.5))
    assert sched.probe(2.0) is not None


def test_one_probe_at_a_time() -> None:
    """The next probe waits until the last one's rest has a worker, a response and
    move_age of body: long enough to show whether the fresh connection is faster."""
    sched, pieces = _live([8e3, 8e3, 8e3], left=64 << 10,
                          opts=SchedulerOptions(window_chunks=4))
    found = sched.probe(2.0)
    assert found is not None
    found[1].moving = found[1].probe = True  # its connection is dropped; not let go yet
    assert sched.probe(2.1) is None             # being moved: still the one probe
    found[1].moving = False
    rest = _move(sched, found[1], 2.0, probe=True)
    assert rest.probe
    assert sched.probe(2.5) is None             # its rest waits for a worker
    task = sched.next_task(2.5)
    assert task is not None and task.piece is rest
    assert sched.probe(3.0) is None             # no response yet
    sched.body_started(rest, 3.0)
    assert sched.probe(3.5) is None             # judged after move_age of its body
    nxt = sched.probe(4.0)                      # it trickles too: the next one
    assert nxt is not None and nxt[1] in pieces and nxt[1] is not rest


def test_a_probe_that_trickles_too_is_probed_again_once_judged() -> None:
    """A probe's rest on another trickling connection is tried again as soon as it is
    judged (move_age of its body), not after the growing wait of moves on evidence: the
    first few connections of a server may all trickle."""
    sched, pieces = _live([8e3], left=64 << 10)
    rest = _move(sched, pieces[0], 2.0, probe=True)
    task = sched.next_task(2.0)
    assert task is not None and task.piece is rest
    sched.body_started(rest, 2.0)
    sched.reserve(rest, 8000)
    sched.account(sched.plans[0], rest, rest.pos + 8000)
    assert sched.probe(2.9) is None             # not judged yet
    assert sched.probe(3.0) == (sched.plans[0], rest)
    assert sched.laggards(3.0) == []            # (no evidence: moves would wait 2 s)


def test_a_range_moved_on_evidence_is_no_probe() -> None:
    """Only a probe's rest holds the next probe back; a move on evidence does not, and a
    probe's rest moved later on evidence is no probe any more."""
    sched, pieces = _live([8e3, 8e3], left=64 << 10)
    rest = _move(sched, pieces[0], 2.0, probe=False)
    assert not rest.probe
    assert sched.probe(2.0) == (sched.plans[0], pieces[1])
    rest2 = _move(sched, pieces[1], 2.0, probe=True)
    task = sched.next_task(2.0)
    assert task is not None
    while task is not None and task.piece is not rest2:
        task = sched.next_task(2.0)
    assert task is not None and task.piece is rest2
    sched.body_started(rest2, 2.0)
    again = _move(sched, rest2, 2.2, probe=False)
    assert not again.probe
