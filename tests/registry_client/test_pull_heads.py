"""Heads that trickle in, and transient failures of a manifest body or the token service
(spec/pull.md, "Stalls" and "Retries"; found from outside: each of these hung the pull or
ended it at once).

Hypothesis chooses the request that misbehaves (the manifest GET, the token GET, the first
range of a layer, a later range that goes over the range reader), how (a head that never
ends, at a chosen byte rate; a body cut short or stalled; a busy status with
``Retry-After``), how many times in a row, the connection count and the retry budget.
Invariants: the pull ends within a bound; it succeeds with the right bytes when the
budget covers the faults, and otherwise raises one ``RegistryError`` that is not an auth
error (exit 6). The CLI cases show the one ``error:`` line and the exit code.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore.store import Store
from registry_client.errors import AuthError, RegistryError
from registry_client.pull import PullOptions, pull
from registry_client.retry import RetryPolicy
from tests.registry_client.pullcheck import cli, finish, run_bounded
from tests.servers import Fault, FaultServer, sha

MODEL = "application/vnd.ollama.image.model"
KiB = 1 << 10
CHUNK = 64 * KiB
STALL = 1.0
LAYER = bytes(range(256)) * (4 * CHUNK // 256) + b"tail"  # 4 chunks and a sliver

# the request to misbehave -> the fault kinds it can take
TARGETS = {
    "manifest": ("trickle_head", "trickle_body", "truncate", "stall", "status"),
    "token": ("trickle_head", "trickle_body", "truncate", "stall", "status"),
    "first_range": ("trickle_head",),
    "later_range": ("trickle_head",),
}


def _server(token: bool) -> tuple[FaultServer, str]:
    srv = FaultServer(token="sekrit" if token else None).start()
    srv.add_model("library/m", "q4", b'{"model_format":"gguf"}', [(MODEL, LAYER)])
    return srv, f"{srv.netloc}/library/m:q4"


def _fault(target: str, kind: str, times: int, seconds: float, after: int) -> Fault:
    # a stall holds the body past the stall timeout; a trickle sends a head byte a ``seconds``
    common = {"kind": kind, "times": times, "after": after,
              "seconds": seconds if kind.startswith("trickle") else STALL * 3,
              "retry_after": "0", "status": 503}
    if target == "manifest":
        return Fault(match="/manifests/", **common)  # type: ignore[arg-type]
    if target == "token":
        return Fault(match="/token", **common)  # type: ignore[arg-type]
    start = 0 if target == "first_range" else CHUNK * 2
    return Fault(match="/blobs/", only_range_start=start, **common)  # type: ignore[arg-type]


def _options(attempts: int, connections: int) -> PullOptions:
    return PullOptions(insecure=True, connections=connections, chunk_size=CHUNK,
                       stall_timeout=STALL,
                       retry=RetryPolicy(attempts=attempts, base_delay=0.01, max_delay=0.05))


@pytest.mark.timeout(600)
@settings(max_examples=5, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_slow_heads_and_transient_small_bodies_are_retried_or_fail_cleanly(
        tmp_path: Path, data: st.DataObject) -> None:
    target = data.draw(st.sampled_from(sorted(TARGETS)), label="target")
    kind = data.draw(st.sampled_from(TARGETS[target]), label="kind")
    attempts = data.draw(st.integers(2, 3), label="attempts")
    times = data.draw(st.integers(1, attempts), label="times in a row")
    seconds = data.draw(st.sampled_from([0.05, 0.2, 0.5]), label="seconds per head byte")
    after = data.draw(st.integers(0, 200), label="body bytes before the cut")
    connections = data.draw(st.sampled_from([1, 2, 4]), label="connections")
    srv, ref = _server(token=target == "token" or data.draw(st.booleans(), label="token"))
    srv.faults.append(_fault(target, kind, times, seconds, after))
    store = Store(tmp_path / f"s{time.monotonic_ns()}")
    # each try costs at most the stall timeout (a head late, a body silent) and backoff
    bound = 10 + attempts * (STALL * 1.5 + 0.5) * 3
    t0 = time.monotonic()
    try:
        _, error = run_bounded(lambda: pull(ref, store=store,
                                            options=_options(attempts, connections)),
                               bound, f"pull with {kind} on {target} x{times}")
    finally:
        srv.stop()
    took = time.monotonic() - t0
    assert took < bound
    applied = srv.faults[0].times < times  # (a token fault waits for a challenge: always)
    if times < attempts or not applied:
        assert error is None, f"{kind} on {target} x{times} of {attempts} tries: {error!r}"
        assert store.layout.blob(__import__("blobstore").Digest.parse(sha(LAYER))
                                 ).read_bytes() == LAYER
        assert store.verify().ok
    else:
        assert isinstance(error, RegistryError), repr(error)
        assert not isinstance(error, AuthError)
        assert store.list_models() == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("target", "kind"), [("manifest", "trickle_head"),
                                              ("first_range", "trickle_head"),
                                              ("later_range", "trickle_head"),
                                              ("token", "trickle_head"),
                                              ("token", "stall"),
                                              # a body a byte every 0.3 s: every read in
                                              # time, the whole never (found from outside)
                                              ("manifest", "trickle_body"),
                                              ("token", "trickle_body")])
def test_a_head_that_never_ends_is_one_error_and_exit_6(tmp_path: Path, target: str,
                                                        kind: str) -> None:
    srv, ref = _server(token=target == "token")
    srv.faults.append(_fault(target, kind, 99, 0.3, 10))
    try:
        proc = cli("--store", str(tmp_path / "s"), "pull", ref, "--insecure",
                   "--stall-timeout", "1", "--retries", "2", "--backoff", "0.05",
                   "--chunk-size", str(CHUNK), "--connections", "1")
        code, _, err = finish(proc, 60, f"pull with {kind} on {target}")
    finally:
        srv.stop()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 6, err
    assert len(errors) == 1, err
    assert ("not complete within 1 s" in err or "timed out" in err
            or "body too slow" in err), err


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("target", "kind"), [("manifest", "truncate"), ("manifest", "stall"),
                                              ("token", "status"), ("token", "stall")])
def test_a_manifest_or_token_failing_once_is_retried(tmp_path: Path, target: str,
                                                     kind: str) -> None:
    srv, ref = _server(token=target == "token")
    srv.faults.append(_fault(target, kind, 1, 0.3, 20))
    try:
        proc = cli("--store", str(tmp_path / "s"), "pull", ref, "--insecure",
                   "--stall-timeout", "1", "--retries", "2", "--backoff", "0.05")
        code, _, err = finish(proc, 60, f"pull with {kind} on {target}")
    finally:
        srv.stop()
    assert code == 0, err
    assert "warning: retry 1/2" in err, err


@pytest.mark.timeout(60)
def test_the_token_service_refusing_stays_an_auth_error(tmp_path: Path) -> None:
    srv, ref = _server(token=True)
    srv.faults.append(Fault(kind="status", match="/token", status=403, times=99))
    try:
        _, error = run_bounded(lambda: pull(ref, store=Store(tmp_path / "s"),
                                            options=_options(3, 1)), 30, "pull")
    finally:
        srv.stop()
    assert isinstance(error, AuthError), repr(error)
