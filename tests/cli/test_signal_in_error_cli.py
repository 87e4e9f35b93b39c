"""A SIGTERM or Ctrl-C that arrives while a failing command reports its error (the
report imports every package's error classes: a tenth of a second) is that signal's
exit, never a traceback and exit 1. Found from outside: ``timeout`` killing commands
that were failing (``rm`` of a removed model, ``export`` of a missing one, ``link``).
The same from the command's first instant (cli/early.py): a Ctrl-C during the imports
printed Python's traceback (found by this test in CI, with the signal early)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cli.clirun import ROOT

CMD = ["link", "--prune", "--to"]  # a folder that does not exist: exit 4


def _start(store: Path, missing: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "cli", "--store", str(store), *CMD,
                             str(missing)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _catches_sigterm(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            caught = next(line for line in f if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(int(caught.split()[1], 16) >> (signal.SIGTERM - 1) & 1)


@pytest.mark.timeout(240)
def test_a_signal_while_an_error_is_reported_is_the_signals_exit(tmp_path: Path) -> None:
    store, missing = tmp_path / "s", tmp_path / "nowhere"
    (store / "blobs").mkdir(parents=True)
    (store / "manifests").mkdir()
    t0 = time.monotonic()
    proc = _start(store, missing)
    _, err = proc.communicate(timeout=60)
    base = time.monotonic() - t0
    assert proc.returncode == 4 and err.startswith("error:"), err

    @settings(max_examples=20, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(when=st.floats(0.0, 1.1), sig=st.sampled_from([signal.SIGTERM, signal.SIGINT]))
    def one(when: float, sig: signal.Signals) -> None:
        p = _start(store, missing)
        # from the moment blobctl's first code runs (it catches SIGTERM from then on;
        # before, Python itself is starting, which is not ours to change)
        deadline = time.monotonic() + 30
        while not _catches_sigterm(p.pid) and p.poll() is None:
            assert time.monotonic() < deadline, "blobctl never started"
            time.sleep(0.001)
        time.sleep(base * when)
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
        assert "Traceback" not in err, err
        # the command's own exit, the signal's, or killed before Python ran any of ours
        assert p.returncode in (4, 128 + sig, -sig), (p.returncode, err)
        if p.returncode == 128 + sig:
            assert err.strip().splitlines()[-1].startswith("error: ")

    one()
