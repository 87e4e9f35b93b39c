"""``serve --listen`` (spec/serve.md, "Listen rules"); found from outside: a port in use
and a host that does not resolve were exit 1 ("a bug"), and ``--listen ::1`` was read as
host ``:`` (a warning about serving ``:`` without --auth, then exit 1)."""

from __future__ import annotations

import socket
from pathlib import Path

import click
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cli.serve_cmds import parse_listen
from tests.cli.clirun import run_proc
from tests.helpers import make_gguf


@given(addr=st.ip_addresses(v=6), port=st.integers(0, 65535))
def test_an_ipv6_address_is_read_in_brackets_and_refused_bare(addr: object,
                                                              port: int) -> None:
    assert parse_listen(f"[{addr}]:{port}") == (str(addr), port)
    for bare in (str(addr), f"{addr}:{port}"):
        with pytest.raises(click.BadParameter, match="in brackets"):
            parse_listen(bare)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    r = run_proc("--store", str(tmp_path / "s"), "import", str(make_gguf(tmp_path / "a.gguf")),
                 "--name", "m:1")
    assert r.code == 0, r.err
    return tmp_path / "s"


@pytest.mark.timeout(60)
def test_an_address_in_use_is_exit_11_with_one_error_line(store: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        r = run_proc("--store", str(store), "serve", "--listen", listen, timeout=30)
    assert r.code == 11, r.err
    assert r.err.splitlines()[0] == f"error: cannot listen on {listen}: Address already in use"
    assert "Traceback" not in r.err and r.out == ""


@pytest.mark.timeout(60)
def test_a_host_that_does_not_resolve_is_exit_4(store: Path) -> None:
    r = run_proc("--store", str(store), "serve", "--listen", "nosuchhost.invalid:5050",
                 timeout=30)
    assert r.code == 4, r.err
    assert "error: cannot listen on nosuchhost.invalid:5050: nosuchhost.invalid does not " \
           "resolve" in r.err


@pytest.mark.timeout(60)
def test_a_bare_ipv6_address_is_a_usage_error(store: Path) -> None:
    r = run_proc("--store", str(store), "serve", "--listen", "::1", timeout=30)
    assert r.code == 2, r.err
    assert r.err.startswith("error: Invalid value for --listen: '::1' is not HOST:PORT")
    assert "without --auth" not in r.err
