"""The mirror's zero-copy spans stop exactly at the hash frontier (issue 11, item 3).

A zero-copy route sends a mirrored blob straight from the ingest's data file
(``_Flight.spans``: file spans handed to ``sendfile``), so nothing reads the bytes in
Python on the way: the spans themselves must never reach past what the download engine
has written and hashed. Here a producer thread plays the engine's part on a real ingest
(``ResumableIngest`` writes, a real ``BlobJob`` reports the frontier through
``_Flight.on_frontier``, as the hasher does); hypothesis chooses the blob size, the
frontier's steps, the producer's pauses, the consumers' ranges and, in the second test,
a failure or a restart of the download. Invariants, within a time bound:

* every span ends at or below the frontier reported before it was yielded, the last
  byte only after the verified (``size``) report;
* a range's spans are contiguous, in order, and cover exactly the range;
* the bytes in each span (read back from the span's own file descriptor, as sendfile
  would) are the blob's;
* a failed fetch or a restart after bytes were handed out raises ``TransferError``
  before any span past the frontier; a restart before anything was handed out is
  invisible (the stream reads the new attempt).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore.digest import Digest
from blobstore.ingest import ResumableIngest
from blobstore.name import ModelName
from blobstore.store import Store
from registry_client.download import BlobJob
from registry_client.errors import TransferError
from registry_server.mirror import FlightStream, Span, _Flight

KiB = 1024


class Engine:
    """The download engine's side of a flight: writes the truth into a real ingest and
    reports the frontier step by step (verified at the end, then committed)."""

    def __init__(self, store: Store, truth: bytes) -> None:
        self.store = store
        self.truth = truth
        self.digest = Digest.of_bytes(truth)
        self.job = BlobJob(ModelName("registry.ollama.ai", "ns", "m", "t"), self.digest,
                           len(truth))
        self.flight = _Flight(store, self.digest, len(truth))
        self.reported = 0          # the highest frontier reported so far (in this attempt)
        self.lock = threading.Lock()
        self._fresh()

    def _fresh(self) -> None:
        self.job.ingest = ResumableIngest(self.store.layout, self.digest, len(self.truth),
                                          64 * KiB)
        self.job.status = "downloading"

    def report(self, n: int) -> None:
        with self.lock:
            self.reported = n
        self.flight.on_frontier(self.job, n)

    def step_to(self, n: int, written: int) -> int:
        """Write ``[written, n)`` and report ``n`` as hashed (below the size)."""
        ingest = self.job.ingest
        assert ingest is not None
        ingest.write_at(memoryview(self.truth)[written:n], written)
        self.report(n)
        return n

    def finish(self, written: int) -> None:
        """The last bytes, the verified report, the commit, the committed report."""
        size = len(self.truth)
        ingest = self.job.ingest
        assert ingest is not None
        ingest.write_at(memoryview(self.truth)[written:size], written)
        self.job.status = "verifying"
        self.report(size)
        ingest.commit(self.digest)
        self.job.status = "done"
        self.report(size)
        self.flight.finish(None)

    def restart(self) -> None:
        """The download starts over (resumed bytes did not verify): frontier back to 0."""
        assert self.job.ingest is not None
        self.job.ingest.drop()
        self._fresh()
        self.report(0)


async def take(engine: Engine, start: int, end: int | None) -> tuple[bytes, list[Span]]:
    """Consume a FlightStream's spans as a zero-copy route does, checking each against
    the frontier reported before it was yielded; the bytes are read from the span's fd."""
    got = bytearray()
    spans: list[Span] = []
    stream = FlightStream(engine.flight, start, end)
    try:
        async for span in stream.spans():
            with engine.lock:
                reported = engine.reported
            assert span.count > 0 and span.end <= reported, (span, reported)
            assert span.offset == (spans[-1].end if spans else start)
            got += os.pread(span.fd, span.count, span.offset)
            spans.append(span)
            await asyncio.sleep(0)
    finally:
        await stream.aclose()
    return bytes(got), spans


steps_st = st.lists(st.integers(1, 96 * KiB), min_size=1, max_size=12)
pauses_st = st.lists(st.sampled_from([0.0, 0.0, 0.001, 0.005]), min_size=1, max_size=12)


@st.composite
def ranges_st(draw: st.DrawFn, size: int) -> list[tuple[int, int | None]]:
    out: list[tuple[int, int | None]] = []
    for _ in range(draw(st.integers(1, 4))):
        a = draw(st.integers(0, size - 1))
        b = draw(st.one_of(st.none(), st.integers(a + 1, size)))
        out.append((a, b))
    return out


def _produce(engine: Engine, steps: list[int], pauses: list[float]) -> threading.Thread:
    size = len(engine.truth)

    def run() -> None:
        written = 0
        for i, step in enumerate(steps):
            n = min(size - 1, written + step)
            if n > written:
                written = engine.step_to(n, written)
            time.sleep(pauses[i % len(pauses)])
        engine.finish(written)

    return threading.Thread(target=run, daemon=True)


@pytest.mark.timeout(120)
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data(), size=st.integers(1, 256 * KiB), steps=steps_st, pauses=pauses_st)
def test_spans_stop_at_the_frontier(tmp_path: Path, data: st.DataObject, size: int,
                                    steps: list[int], pauses: list[float]) -> None:
    truth = os.urandom(size)
    store = Store(tmp_path / f"s{time.monotonic_ns()}")
    engine = Engine(store, truth)
    ranges = data.draw(ranges_st(size))
    producer = _produce(engine, steps, pauses)

    async def go() -> list[tuple[bytes, list[Span]]]:
        tasks = [asyncio.create_task(take(engine, a, b)) for a, b in ranges]
        await asyncio.sleep(0)
        producer.start()
        return await asyncio.wait_for(asyncio.gather(*tasks), 30)

    results = asyncio.run(go())
    producer.join(10)
    for (a, b), (got, spans) in zip(ranges, results, strict=True):
        assert got == truth[a:b], f"range {a}-{b}: wrong bytes"
        assert spans and spans[-1].end == (size if b is None else b)
    assert store.blob_path(engine.digest).read_bytes() == truth


@pytest.mark.timeout(120)
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(size=st.integers(2, 256 * KiB), steps=steps_st, cut=st.integers(0, 11),
       how=st.sampled_from(["fail", "restart"]))
def test_failure_or_restart_stops_the_spans(tmp_path: Path, size: int, steps: list[int],
                                            cut: int, how: str) -> None:
    """The producer stops after ``cut`` steps and either fails the fetch or starts it
    over (then completes it). A consumer that had spans of the first attempt raises; one
    that had none, or that joins after the restart, gets the whole blob."""
    truth = os.urandom(size)
    store = Store(tmp_path / f"s{time.monotonic_ns()}")
    engine = Engine(store, truth)
    handed = threading.Event()   # the early consumer received a span
    go_on = threading.Event()    # the restart happened
    first: list[int] = []        # bytes the first attempt reported

    def run() -> None:
        written = 0
        for step in steps[:cut]:
            n = min(size - 1, written + step)
            if n > written:
                written = engine.step_to(n, written)
        first.append(written)
        if written:
            handed.wait(10)
        if how == "fail":
            engine.flight.finish(TransferError("upstream gone"))
            return
        engine.restart()
        go_on.set()
        written = 0
        for step in steps:
            n = min(size - 1, written + step)
            if n > written:
                written = engine.step_to(n, written)
        engine.finish(written)

    producer = threading.Thread(target=run, daemon=True)

    async def early() -> tuple[bytes, BaseException | None]:
        got = bytearray()
        stream = FlightStream(engine.flight)
        try:
            async for span in stream.spans():
                with engine.lock:
                    assert span.end <= engine.reported
                got += os.pread(span.fd, span.count, span.offset)
                handed.set()
        except TransferError as exc:
            return bytes(got), exc
        finally:
            await stream.aclose()
        return bytes(got), None

    async def late() -> tuple[bytes, list[Span]]:
        while not go_on.is_set():
            await asyncio.sleep(0.001)
        return await take(engine, 0, None)

    async def main() -> tuple[tuple[bytes, BaseException | None], tuple[bytes, list[Span]] | None]:
        first = asyncio.create_task(early())
        second = asyncio.create_task(late()) if how == "restart" else None
        await asyncio.sleep(0)
        producer.start()
        a = await asyncio.wait_for(first, 30)
        b = await asyncio.wait_for(second, 30) if second is not None else None
        return a, b

    (got, error), later = asyncio.run(main())
    producer.join(10)
    assert got == truth[:len(got)], "a span held bytes that are not the blob's"
    if how == "fail":
        assert error is not None and len(got) < size
    elif first[0]:  # had bytes of the first attempt: cut, never more than it hashed
        assert error is not None and 0 < len(got) <= first[0]
    else:           # the first attempt reported nothing: the restart is invisible
        assert error is None and got == truth
    if later is not None:
        assert later[0] == truth
        assert store.blob_path(engine.digest).read_bytes() == truth
