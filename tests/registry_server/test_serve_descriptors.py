"""``blobctl serve`` short of file descriptors, as a real process under a low limit.

Found from outside (``ulimit -n 128``, 150 connections that send nothing for 10 s): serve
wrote 24-36 MB of stderr in ~12 s, 59,000-86,000 "socket.accept() out of system resource"
warnings each with a traceback, and burnt 3.9-5.4 s of CPU: CPython 3.11's accept loop
goes on after ``EMFILE`` and schedules a retry per backlog slot (uvicorn's is 2048), and
the retries multiply. Now the shortage costs one warning line every few seconds and next
to no CPU, and serve raises its soft descriptor limit to the hard one at start
(spec/serve.md, "Operations": descriptors).
"""

from __future__ import annotations

import asyncio
import resource
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from registry_server.descriptors import ACCEPT_FAILED, QUIET_SECONDS, AcceptFailures
from tests.registry_server.conftest import start_serve

LIMIT = 64


def _limit(soft: int, hard: int) -> Callable[[], None]:
    def set_it() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return set_it


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


@pytest.mark.timeout(120)
def test_a_descriptor_shortage_is_quiet_and_cheap_and_passes(tmp_path: Path) -> None:
    # the hard limit low too, so that raising the soft one cannot lift it
    sp = start_serve(tmp_path / "s", "--push", log_dir=tmp_path / "logs",
                     preexec_fn=_limit(LIMIT, LIMIT))
    try:
        proc = psutil.Process(sp.proc.pid)
        assert proc.rlimit(psutil.RLIMIT_NOFILE) == (LIMIT, LIMIT)
        host, port = sp.netloc.split(":")
        cpu0 = _cpu(proc)
        silent = [socket.create_connection((host, int(port)), timeout=5)
                  for _ in range(2 * LIMIT)]  # more than serve has descriptors
        time.sleep(4)
        cpu = _cpu(proc) - cpu0
        log = sp.log()
        for s in silent:
            s.close()
        # a warning now and then, no tracebacks (was ~2,000 warnings a second, each with
        # one, and a second of CPU for every 2-3 s of shortage, growing)
        lines = log.splitlines()
        assert len(lines) <= 3, log[:2000]
        assert len(log) < 2000, log[:2000]
        assert all("cannot accept connections: Too many open files" in line
                   for line in lines), log
        assert "Traceback" not in log and ACCEPT_FAILED not in log
        assert cpu < 0.25, cpu
        # the silent ones gone, serve answers again
        with httpx.Client(base_url=sp.url, timeout=10) as c:
            t0 = time.monotonic()
            assert c.get("/v2/").status_code == 200
            assert time.monotonic() - t0 < 3
    finally:
        sp.stop()


@pytest.mark.timeout(60)
def test_serve_raises_its_soft_descriptor_limit_to_the_hard_one(tmp_path: Path) -> None:
    sp = start_serve(tmp_path / "s", "--push", log_dir=tmp_path / "logs",
                     preexec_fn=_limit(256, 4096))
    try:
        assert psutil.Process(sp.proc.pid).rlimit(psutil.RLIMIT_NOFILE) == (4096, 4096)
    finally:
        sp.stop()


def test_accept_failures_are_one_line_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    """Other reports go to the loop's default handler untouched."""
    now = [100.0]
    handler = AcceptFailures(clock=lambda: now[0])
    loop = asyncio.new_event_loop()
    try:
        exc = OSError(24, "Too many open files")
        with caplog.at_level("WARNING"):
            for _ in range(40):  # 20 s, a report every 0.5 s
                handler(loop, {"message": ACCEPT_FAILED, "exception": exc})
                now[0] += 0.5
            handler(loop, {"message": "something else"})
        ours = [r.getMessage() for r in caplog.records if "cannot accept" in r.getMessage()]
        assert len(ours) == int(20 / QUIET_SECONDS)
        assert ours[1].endswith(f"({int(QUIET_SECONDS / 0.5) - 1} more in the last "
                                f"{QUIET_SECONDS:.0f} s)")
        assert any(r.getMessage() == "something else" for r in caplog.records)
    finally:
        loop.close()
