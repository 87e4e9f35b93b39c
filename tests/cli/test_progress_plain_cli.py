"""Plain (not a terminal) pull progress stays proportional to what happens: a line when
a blob starts, moves (at most every 5 s) and ends, never one for a blob not started
(found from outside: a pull of 4,000 tiny layers wrote 23,000-37,000 stderr lines,
19,000-33,000 of them "DIGEST 0.0% 0 B/N B" for blobs waiting their turn)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cli.pull_cmds import _Progress
from tests.cli.clirun import run_proc
from tests.servers import FaultServer

MODEL = "application/vnd.ollama.image.model"


@pytest.mark.timeout(120)
def test_a_many_layer_pull_prints_no_line_for_blobs_not_started(tmp_path: Path) -> None:
    layers = [(MODEL, f"layer {i} ".encode() + os.urandom(16)) for i in range(300)]
    with FaultServer() as srv:
        srv.add_model("library/many", "1", b'{"model_format":"gguf"}', layers)
        r = run_proc("pull", f"{srv.netloc}/library/many:1", "--insecure",
                     "--connections", "2", "--store", str(tmp_path / "s"))
    assert r.code == 0, r.err
    lines = r.err.splitlines()
    assert not [x for x in lines if re.search(r" 0\.0% 0 B/", x)], r.err[:2000]
    blob_lines = [x for x in lines if re.match(r"[0-9a-f]{12} ", x)]
    ends = [x for x in blob_lines if "100.0%" in x]
    assert len(ends) == len({x.split()[0] for x in ends}) == 301  # each blob ends once
    assert len(blob_lines) <= 2 * 301 + 10, len(blob_lines)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 60), per=st.integers(1, 40), size=st.integers(0, 50),
       parallel=st.integers(1, 8))
def test_plain_lines_per_blob_are_bounded(n: int, per: int, size: int, parallel: int) -> None:
    """Blobs fetched ``parallel`` at a time, each taking ``per`` ticks of 0.1 s, every
    blob reported at every tick (as the pull engine does): a blob's lines are a start,
    one per 5 s while it moves, an end; overall lines at most one per 5 s."""
    now = [0.0]
    printed: list[str] = []
    p = _Progress("plain", clock=lambda: now[0])
    p._line = printed.append  # type: ignore[method-assign]  # (capture, not a fake)
    done = [0] * n
    key = [f"{i:012x}{'a' * 52}" for i in range(n)]  # (the line shows 12 digits)
    first = True
    while first or not all(d == size for d in done):
        first = False
        running = [i for i in range(n) if done[i] < size][:parallel]
        for i in running:
            done[i] = min(size, done[i] + max(1, size // per))
        for i in range(n):
            p({"status": "pulling", "digest": f"sha256:{key[i]}", "total": size,
               "completed": done[i]})
        now[0] += 0.1
    seconds = now[0]
    for i in range(n):
        mine = [x for x in printed if x.startswith(key[i][:12])]
        assert mine and "100.0%" in mine[-1]
        assert sum("100.0%" in x for x in mine) == 1
        assert len(mine) <= 2 + per * 0.1 / 5 + 1
        assert not any(" 0.0% 0 B/" in x for x in mine)
    overall = [x for x in printed if x.startswith("total ")]
    assert len(overall) <= seconds / 5 + 1
