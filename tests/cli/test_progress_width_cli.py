"""Progress bars on a narrow terminal (spec/cli.md, ``pull``); found from outside: on a
60-column terminal the lines wrapped, and each redraw (one row up per layer) left stale
copies behind; an ETA like ``100m05s`` made lines of 81-82 characters."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import sys
import termios
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cli.pull_cmds import _Progress

_ESC = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@pytest.mark.timeout(120)
@settings(max_examples=40, deadline=None)
@given(columns=st.integers(8, 160),
       layers=st.lists(st.tuples(st.integers(1, 1 << 42), st.floats(0, 1),
                                 st.floats(0.3, 1e6)), min_size=1, max_size=4))
def test_every_progress_line_fits_the_terminal(
        columns: int, layers: list[tuple[int, float, float]]) -> None:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    with os.fdopen(slave, "w", encoding="utf-8") as tty, \
            pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.delenv("COLUMNS", raising=False)
        monkeypatch.setattr(sys, "stderr", tty)
        progress = _Progress("tty")
        for i, (total, part, age) in enumerate(layers):
            digest = f"sha256:{i:064x}"
            progress({"status": "pulling", "digest": digest, "total": total, "completed": 0})
            t0, _ = progress.started[digest]
            progress.started[digest] = (t0 - age, 0)  # (as if started `age` s ago: an ETA)
            progress.last_draw = 0.0
            progress({"status": "pulling", "digest": digest, "total": total,
                      "completed": int(total * part)})
        progress.finish()
        tty.flush()
        time.sleep(0.01)
        out = os.read(master, 1 << 20).decode()
    os.close(master)
    lines = [_ESC.sub("", x) for x in out.replace("\r", "").split("\n") if x]
    assert lines
    for line in lines:
        assert len(line) < columns, (columns, line)
