"""Searching fault tests for the pull engine (issue 8).

Hypothesis chooses the fault (kind, body offset, which requests), the connection count,
the chunk size, the window, the blob sizes (including exact multiples of the chunk and one
byte more) and the number of layers; the pull runs against the real ``docker-registry``
behind ``tests/faultproxy.FaultProxy``. Invariants, whatever was chosen:

* the pull ends within a hard bound (a hang fails with every thread's stack);
* it succeeds with every blob hashing to its name and the registry's manifest bytes, or it
  raises one ``BlobctlError`` and leaves no manifest and no blob that lies about its name;
* corruption never succeeds silently (an applied ``corrupt`` ends in an integrity error or
  in a retry that fetched good bytes; the final bytes are checked either way); transport
  faults never surface as integrity errors;
* faults the retry budget covers do not fail the pull;
* after a failure, a clean pull into the same store (resuming what is there) succeeds and
  fetches no more than the model's size.

Environment: ``BLOBCTL_FAULT_EXAMPLES`` (library property, default 200),
``BLOBCTL_FAULT_CLI_EXAMPLES`` (CLI property, default 15), ``BLOBCTL_FAULT_BOUND`` (hang
bound of one pull in seconds, default 15), ``BLOBCTL_FAULT_KINDS`` (comma-separated fault
kinds to search, default all), ``BLOBCTL_FAULT_SHRINK=1`` to let hypothesis shrink a
failure (off by default: shrinking a hang costs the bound per attempt).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from blobstore.errors import BlobctlError, IntegrityError
from registry_client.errors import RegistryError
from registry_client.pull import PullOptions, pull
from registry_client.retry import RetryPolicy
from tests.faultproxy import KINDS, Fault, FaultProxy
from tests.registry_client.pullcheck import (
    KiB,
    MiB,
    PushedModel,
    assert_blobs_honest,
    assert_failed_cleanly,
    assert_pulled,
    cli,
    finish,
    push_model,
    run_bounded,
)
from tests.servers import DockerRegistry

EXAMPLES = int(os.environ.get("BLOBCTL_FAULT_EXAMPLES", "200"))
CLI_EXAMPLES = int(os.environ.get("BLOBCTL_FAULT_CLI_EXAMPLES", "15"))
BOUND = float(os.environ.get("BLOBCTL_FAULT_BOUND", "15"))
PHASES = ((Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink)
          if os.environ.get("BLOBCTL_FAULT_SHRINK") == "1"
          else (Phase.explicit, Phase.reuse, Phase.generate))
HEALTH = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
          HealthCheck.data_too_large]
# BLOBCTL_FAULT_KINDS=rst,fin narrows the search to some kinds (e.g. to chase one bug)
CHOSEN_KINDS = tuple(k for k in os.environ.get("BLOBCTL_FAULT_KINDS", "").split(",") if k
                     ) or KINDS
STALL_KINDS = ("stall_continue", "stall_close")
TRANSIENT = ("rst", "fin", "stall_continue", "stall_close", "status5xx")
MAX_BLOB = 3 * MiB


@dataclass(frozen=True)
class Scenario:
    fault: Fault
    connections: int
    chunk: int
    sizes: tuple[int, ...]        # the model layer first, then small extra layers
    window_chunks: int | None     # PullOptions.window_bytes in chunks (None: default)
    attempts: int                 # RetryPolicy.attempts (tries per request/range)
    stall_timeout: float


def _blob_size(draw: st.DrawFn, chunk: int, max_chunks: int) -> int:
    shape = draw(st.sampled_from(["small", "multiple", "plus_one", "any"]))
    top = max(1, min(max_chunks, MAX_BLOB // chunk))
    n = draw(st.integers(1, min(top, 8)) | st.integers(1, top))  # mostly few chunks: fast
    if shape == "small":
        return draw(st.integers(1, chunk))           # one plain GET (or exactly one chunk)
    if shape == "multiple":
        return n * chunk
    if shape == "plus_one":
        return n * chunk + 1
    return n * chunk + draw(st.integers(0, chunk - 1))


@st.composite
def faults(draw: st.DrawFn, *, stall_timeout: float, kind: str | None = None,
           cli: bool = False) -> Fault:
    kind = kind or draw(st.sampled_from(CHOSEN_KINDS))
    offset: float | int = draw(st.one_of(
        st.floats(0.0, 1.0),
        st.integers(0, MAX_BLOB),
        st.sampled_from([0, 1, 4095, 4096, 16383, 16384, 16385, 65535, 65536, 65537])))
    selectors = ["first", "every", "always"]
    if (cli and kind in STALL_KINDS) or kind == "trickle":
        # the CLI's stall timeout is at least 1 s; a trickle on every request is a slow
        # server (nothing faster to move to), not a fault to search
        selectors = ["first", "every"]
    sel = draw(st.sampled_from(selectors))
    first = draw(st.integers(1, 6 if kind == "trickle" else 4)) if sel == "first" else 0
    every = {"first": 0, "every": draw(st.integers(3 if kind == "trickle" else 2, 5)),
             "always": 1}[sel]
    seconds = 0.0
    if kind in STALL_KINDS:
        # Each stall costs its length or the stall timeout: short pauses (a slow server)
        # or just past the timeout, and every-n stalls only every 3rd+ request (with few
        # chunks, see scenarios()), so that examples stay well under a second.
        every = max(every, 3) if sel == "every" else every
        seconds = draw(st.one_of(st.floats(0.02, 0.15),
                                 st.floats(stall_timeout + 0.05, stall_timeout + 0.2)))
    return Fault(kind, offset, first=first, every=every, seconds=round(seconds, 3),
                 status=draw(st.sampled_from([500, 502, 503])),
                 retry_after=draw(st.sampled_from(["0", "1"])),
                 shift=draw(st.sampled_from([1, -1, 4096, -4096, MiB])),
                 rate=draw(st.sampled_from([700, 2000, 8000, 30000])))


@st.composite
def scenarios(draw: st.DrawFn, kinds: tuple[str, ...] = CHOSEN_KINDS) -> Scenario:
    kind = draw(st.sampled_from(kinds))
    stalls = kind in STALL_KINDS
    # the stall timeout only costs time in stall examples: there it is the shortest
    stall_timeout = 0.5 if stalls else draw(st.sampled_from([0.5, 0.75, 1.0]))
    fault = draw(faults(stall_timeout=stall_timeout, kind=kind))
    chunk = draw(st.integers(16 * KiB, 256 * KiB))
    # A stall on every (n-th) request costs up to the stall timeout per request: keep
    # those examples to few requests (a 1-connection pull of 63 ranges, each stalled past
    # the timeout, took 32 s, before and after the laggard change: slow, not hung)
    repeating = stalls and fault.every >= 1
    sizes = (_blob_size(draw, chunk, 6 if repeating else 48),
             *draw(st.lists(st.integers(1, chunk if repeating else 200 * KiB), max_size=2)))
    return Scenario(fault, connections=draw(st.integers(1, 16)), chunk=chunk, sizes=sizes,
                    window_chunks=draw(st.one_of(st.none(), st.integers(2, 8))),
                    attempts=draw(st.integers(2, 3 if stalls else 5)),
                    stall_timeout=stall_timeout)


def _options(sc: Scenario) -> PullOptions:
    extra = {} if sc.window_chunks is None else {"window_bytes": sc.window_chunks * sc.chunk}
    return PullOptions(insecure=True, connections=sc.connections, chunk_size=sc.chunk,
                       stall_timeout=sc.stall_timeout, auto_gc=False,
                       # Retry-After 1 is capped at 0.05 s: 5xx on every request is retried
                       # per request and again per range (attempts**2 waits), keep it short
                       retry=RetryPolicy(attempts=sc.attempts, base_delay=0.01,
                                         max_delay=0.05),
                       **extra)  # type: ignore[arg-type]


def _must_succeed(sc: Scenario) -> bool:
    """Faults the retry budget covers. One try of margin: a connection the proxy closed
    right after a complete body may still be handed out once by the client's pool."""
    f = sc.fault
    if f.kind == "stall_continue" and f.seconds < 0.6 * sc.stall_timeout:
        return True  # a pause shorter than the stall timeout is no fault at all
    if f.kind in ("trickle", "short"):
        return True  # slow bytes are still bytes; a server may send less than asked
    return f.kind in TRANSIENT and f.first > 0 and f.first <= sc.attempts - 2


def _must_fail(sc: Scenario) -> bool:
    """Faults that strike every request before any byte: nothing can get through."""
    f = sc.fault
    if f.every != 1:
        return False
    return f.kind == "status5xx" or (f.kind in ("rst", "fin") and f.offset in (0, 0.0))


def _check_failure(sc: Scenario, exc: BaseException, applied: list[str]) -> None:
    assert isinstance(exc, BlobctlError), (
        f"pull raised {type(exc).__name__}, not a BlobctlError: {exc!r}")
    assert not _must_succeed(sc), (
        f"{sc.fault.kind} on the first {sc.fault.first} requests is within the retry budget "
        f"({sc.attempts} tries), yet the pull failed: {type(exc).__name__}: {exc}")
    if sc.fault.kind == "corrupt":
        assert isinstance(exc, IntegrityError), (
            f"a corrupt body ended in {type(exc).__name__} ({exc}), not an integrity error")
    elif applied:
        assert isinstance(exc, RegistryError), (
            f"a {sc.fault.kind} fault ended in {type(exc).__name__} ({exc}): transport "
            "faults must be registry/network errors (an integrity error here means bytes "
            "that never arrived were hashed)")


def _pull(model: PushedModel, proxy: FaultProxy, store: Path, sc: Scenario,
          what: str) -> BaseException | None:
    _, exc = run_bounded(lambda: pull(model.ref(proxy.netloc), store=store,
                                      options=_options(sc)), BOUND, what)
    return exc


def _arm(registry: DockerRegistry, proxy: FaultProxy, scratch: Path,
         sc: Scenario) -> tuple[PushedModel, Fault, Path]:
    """Push the scenario's model, aim its fault at that model's blobs, make a store."""
    model = push_model(registry, list(sc.sizes))
    fault = dataclasses.replace(sc.fault, match=model.path_match)
    proxy.set_faults(fault)
    return model, fault, Path(tempfile.mkdtemp(dir=scratch))


# The search is split by fault family so that each test stays under a minute; the
# examples add up to BLOBCTL_FAULT_EXAMPLES. Trickles and short responses have their own
# tests (below).
GROUPS = {"cut": ("rst", "fin"), "stall": STALL_KINDS, "data": ("corrupt", "wrong_range"),
          "status": ("status5xx",)}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("group", sorted(GROUPS))
@settings(max_examples=max(1, EXAMPLES // len(GROUPS)), deadline=None,
          suppress_health_check=HEALTH, phases=PHASES, print_blob=True)
@given(data=st.data())
def test_pull_under_faults(registry: DockerRegistry, proxy: FaultProxy, scratch: Path,
                           group: str, data: st.DataObject) -> None:
    kinds = tuple(k for k in GROUPS[group] if k in CHOSEN_KINDS)
    if not kinds:
        return  # BLOBCTL_FAULT_KINDS left this family out
    sc = data.draw(scenarios(kinds), label="scenario")
    model, fault, store = _arm(registry, proxy, scratch, sc)
    match = model.path_match
    try:
        exc = _pull(model, proxy, store, sc, f"pull with {fault}")
        applied = proxy.applied(match)
        if exc is None:
            assert not _must_fail(sc), f"{sc.fault} struck every request, yet the pull succeeded"
            assert_pulled(store, model, proxy.netloc)
            return
        assert_failed_cleanly(store, model, proxy.netloc)
        _check_failure(sc, exc, applied)
        # nothing lost: a clean pull into the same store resumes and succeeds
        proxy.set_faults()
        mark = proxy.mark()  # a stalled response of the failed pull may still trickle
        again = _pull(model, proxy, store, sc, f"clean pull after {type(exc).__name__}")
        if isinstance(again, IntegrityError) and sc.fault.kind == "corrupt":
            # Corrupt chunks of a blob that was never verified (the pull stopped at another
            # blob's mismatch) are resumed, found bad and dropped: one more pull is allowed.
            assert_failed_cleanly(store, model, proxy.netloc)
            mark = proxy.mark()
            again = _pull(model, proxy, store, sc, "second clean pull after corruption")
        assert again is None, f"clean pull after a failure raised {type(again).__name__}: {again}"
        assert_pulled(store, model, proxy.netloc)
        refetched = proxy.blob_bytes_sent(match, since=mark)
        # After corruption, resumed bytes that do not verify make the engine fetch that
        # blob once more from scratch (spec/pull.md, "Resume"): at most twice the model.
        limit = model.total * (2 if sc.fault.kind == "corrupt" else 1)
        assert refetched <= limit, (
            f"the clean pull fetched {refetched} bytes for a model of {model.total}")
    finally:
        shutil.rmtree(store, ignore_errors=True)


# ---------------------------------------------------------------------- short ranges
SHORT_EXAMPLES = int(os.environ.get("BLOBCTL_SHORT_EXAMPLES", "25"))


@pytest.mark.timeout(300)
@settings(max_examples=SHORT_EXAMPLES, deadline=None, suppress_health_check=HEALTH,
          phases=PHASES, print_blob=True)
@given(data=st.data())
def test_pull_takes_ranges_shorter_than_asked_in_its_stride(
        registry: DockerRegistry, proxy: FaultProxy, scratch: Path,
        data: st.DataObject) -> None:
    """Responses cover less than the range asked for (a server may; some cap a response's
    size), with a ``Content-Range`` that says so. That is no failure: the rest is asked
    for again at once, on the same connection. The pull succeeds, logs no retry, and the
    proxy relays each byte of the layers once where nothing can be split off a connection
    (one connection: steals may fetch bytes already on their way)."""
    if "short" not in CHOSEN_KINDS:
        return
    sc = data.draw(scenarios(("short",)), label="scenario")
    model, fault, store = _arm(registry, proxy, scratch, sc)
    warnings: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                warnings.append(record.getMessage())

    catch = Catch()
    logging.getLogger("blobctl").addHandler(catch)
    try:
        mark = proxy.mark()
        _, exc = run_bounded(lambda: pull(model.ref(proxy.netloc), store=store,
                                          options=_options(sc)), BOUND, f"pull with {fault}")
        assert exc is None, f"pull with {fault} raised {type(exc).__name__}: {exc}"
        assert_pulled(store, model, proxy.netloc)
        assert not [w for w in warnings if "retry" in w], warnings
        if sc.connections == 1:  # (no other connection to steal or move to)
            sent = proxy.blob_bytes_sent(model.path_match, since=mark)
            assert sent == model.total, (sent, model.total)
    finally:
        logging.getLogger("blobctl").removeHandler(catch)
        proxy.set_faults()
        shutil.rmtree(store, ignore_errors=True)


# ---------------------------------------------------------------------- trickles
TRICKLE_EXAMPLES = int(os.environ.get("BLOBCTL_TRICKLE_EXAMPLES", "8"))
TRICKLE_BOUND = 20.0


@pytest.mark.timeout(600)
@settings(max_examples=TRICKLE_EXAMPLES, deadline=None, suppress_health_check=HEALTH,
          phases=PHASES, print_blob=True)
@given(data=st.data())
def test_pull_is_not_held_by_a_trickling_connection(
        registry: DockerRegistry, proxy: FaultProxy, scratch: Path,
        data: st.DataObject) -> None:
    """Some responses turn into a trickle (700 B/s-30 KB/s) at a chosen body offset: bytes
    keep coming, so no stall timeout fires. The pull must still end soon, with the right
    bytes: a range far slower than the others moves to another connection (spec/pull.md,
    "Laggards"). Staying on a 2 KB/s connection for the rest of a 64 KiB+ range alone
    would take longer than the bound. (With moves switched off, this test fails.)"""
    if "trickle" not in CHOSEN_KINDS:
        return
    sc = data.draw(scenarios(("trickle",)), label="scenario")
    # A connection beyond the trickling requests: with all of them trickling, every
    # request the pull can make is slow (the server is slow; nothing faster to find).
    # Any layer and window otherwise: where every range in reach trickles, probes find
    # the faster connection (spec/pull.md, "Laggards"; these once took 31-33 s).
    first = sc.fault.first or 1
    sc = dataclasses.replace(sc, connections=max(sc.connections, first + 1, 2))
    model, fault, store = _arm(registry, proxy, scratch, sc)
    try:
        result, exc = run_bounded(lambda: pull(model.ref(proxy.netloc), store=store,
                                               options=_options(sc)),
                                  TRICKLE_BOUND, f"pull with {fault}")
        assert exc is None, f"pull with {fault} raised {type(exc).__name__}: {exc}"
        assert_pulled(store, model, proxy.netloc)
        slow = [x for x in proxy.exchanges(model.path_match) if x.fault == "trickle"]
        if slow and result is not None:
            assert result.ranges_moved <= 4 * len(slow) + 4, result
    finally:
        proxy.set_faults()
        shutil.rmtree(store, ignore_errors=True)


# The two cases the search found where every range in reach trickled (spec/pull.md,
# "Laggards", probes): (layer, chunk, window in chunks, trickling requests, rate,
# connections). A 2-range layer of 256 KiB chunks with the first 5 requests at 8 KB/s
# (CI, through the CLI: 31 s), and 26 KB chunks with a window of 3 and the first 5
# requests at 700 B/s (33 s).
NOTHING_FASTER_IN_REACH = [(2 * 256 * KiB, 256 * KiB, None, 5, 8000, 10),
                           (5 * 26_000, 26_000, 3, 5, 700, 6)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("offset", [0, 20_000])
@pytest.mark.parametrize("case", NOTHING_FASTER_IN_REACH)
def test_a_trickle_with_nothing_faster_in_reach_is_probed(
        registry: DockerRegistry, proxy: FaultProxy, scratch: Path,
        case: tuple[int, int, int | None, int, int, int], offset: int) -> None:
    """Every range in reach trickles, so no live range shows that a fresh connection is
    faster, and none can be split: while a connection is idle, one slow range at a time
    is moved to it (a probe). The first probe past the trickling requests is fast and
    becomes the evidence that moves the rest. Without probes these pulls take 30 s+."""
    layer, chunk, window, first, rate, connections = case
    sc = Scenario(Fault("trickle", offset, first=first, rate=rate), connections=connections,
                  chunk=chunk, sizes=(layer,), window_chunks=window, attempts=3,
                  stall_timeout=1.0)
    model, fault, store = _arm(registry, proxy, scratch, sc)
    try:
        t0 = time.monotonic()
        result, exc = run_bounded(lambda: pull(model.ref(proxy.netloc), store=store,
                                               options=_options(sc)),
                                  TRICKLE_BOUND, f"pull with {fault}")
        took = time.monotonic() - t0
        assert exc is None, f"pull with {fault} raised {type(exc).__name__}: {exc}"
        assert_pulled(store, model, proxy.netloc)
        assert took < 12.0, f"{took:.1f} s with {fault}"  # (16.8-17.8 s without probes)
        assert result is not None and result.ranges_moved <= 4 * first + 4, result
    finally:
        proxy.set_faults()
        shutil.rmtree(store, ignore_errors=True)


# ---------------------------------------------------------------------- the real CLI
@st.composite
def cli_scenarios(draw: st.DrawFn) -> Scenario:
    fault = draw(faults(stall_timeout=1.0, cli=True))
    chunk = draw(st.integers(16 * KiB, 256 * KiB))
    layer = _blob_size(draw, chunk, 12 if fault.kind in STALL_KINDS else 32)
    connections = draw(st.integers(1, 16))
    if fault.kind == "trickle":  # the precondition of the trickle test above: a
        # connection beyond the trickling requests
        connections = max(connections, (fault.first or 1) + 1, 2)
    sizes = (layer, *draw(st.lists(st.integers(1, 64 * KiB), max_size=1)))
    return Scenario(fault, connections=connections, chunk=chunk, sizes=sizes,
                    window_chunks=None, attempts=draw(st.integers(2, 3)), stall_timeout=1.0)


@pytest.mark.timeout(600)
@settings(max_examples=CLI_EXAMPLES, deadline=None, suppress_health_check=HEALTH,
          phases=PHASES, print_blob=True)
@given(sc=cli_scenarios())
def test_cli_pull_under_faults(registry: DockerRegistry, proxy: FaultProxy, scratch: Path,
                               sc: Scenario) -> None:
    """``blobctl pull --json`` as a real process: exit 0 and correct blobs, or a documented
    non-zero code with exactly one ``error:`` line (and at most one ``hint:``)."""
    model, fault, store = _arm(registry, proxy, scratch, sc)
    try:
        proc = cli("--store", str(store), "pull", model.ref(proxy.netloc), "--insecure",
                   "--connections", str(sc.connections), "--chunk-size", str(sc.chunk),
                   "--backoff", "0.01", "--stall-timeout", str(sc.stall_timeout),
                   "--retries", str(sc.attempts - 1), "--json")
        code, out, err = finish(proc, BOUND, f"blobctl pull with {fault}")
        lines = err.splitlines()
        errors = [x for x in lines if x.startswith("error:")]
        hints = [x for x in lines if x.startswith("hint:")]
        assert "Traceback" not in err, err
        if code == 0:
            assert not errors, err
            summary = json.loads(out.splitlines()[-1])
            assert summary["status"] == "success", out[-500:]
            assert_pulled(store, model, proxy.netloc)
            return
        assert len(errors) == 1 and len(hints) <= 1, f"exit {code}, stderr:\n{err}"
        # 5 integrity, 6 registry/network; 1 would be an unexpected error (a bug)
        assert code in (5, 6), f"exit {code}: {errors[0]}"
        if sc.fault.kind == "corrupt":
            assert code == 5, f"corrupt body gave exit {code}: {errors[0]}"
        assert not _must_succeed(sc), f"within the retry budget, yet exit {code}: {errors[0]}"
        assert_failed_cleanly(store, model, proxy.netloc)
        assert_blobs_honest(store)
    finally:
        shutil.rmtree(store, ignore_errors=True)


# ---------------------------------------------------------------------- partial chunks
@pytest.mark.timeout(120)
def test_a_failed_pull_leaves_its_partial_chunks_to_the_next(
        registry: DockerRegistry, proxy: FaultProxy, scratch: Path) -> None:
    """Every body is reset half way: no chunk ever finishes (a rest of one byte is cut at
    byte 0), so the pull fails once a range has had its tries. What it wrote is not lost
    with it: light records are per write, so the clean pull after it resumes those bytes
    and fetches only the rest (it used to resume nothing and fetch all: no chunk had
    been finished)."""
    model = push_model(registry, [2 * MiB])
    proxy.set_faults(Fault("rst", 0.5, every=1, match=model.path_match))
    store = Path(tempfile.mkdtemp(dir=scratch))
    sc = Scenario(Fault("rst"), connections=2, chunk=256 * KiB, sizes=(2 * MiB,),
                  window_chunks=None, attempts=5, stall_timeout=1.0)
    try:
        exc = _pull(model, proxy, store, sc, "pull with every body reset half way")
        assert isinstance(exc, RegistryError), exc
        proxy.set_faults()
        mark = proxy.mark()
        result, again = run_bounded(lambda: pull(model.ref(proxy.netloc), store=store,
                                                 options=_options(sc)),
                                    BOUND, "clean pull after it")
        assert again is None, again
        assert_pulled(store, model, proxy.netloc)
        refetched = proxy.blob_bytes_sent(model.path_match, since=mark)
        assert result.bytes_resumed >= 64 * KiB, result
        # (a steal may fetch bytes already on their way: one chunk per connection)
        assert refetched <= model.total - result.bytes_resumed + sc.connections * sc.chunk, (
            refetched, model.total, result.bytes_resumed)
    finally:
        proxy.set_faults()
        shutil.rmtree(store, ignore_errors=True)
