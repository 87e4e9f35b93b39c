"""Hosts and URLs no request can be made to (found from outside: httpx.InvalidURL escaped
as exit 1 from pull/push/outdated/update of a name like ``h:1:2/n/m`` (the name grammar
takes it, as Ollama's does), ``outdated`` of all models stopped at one such name, and
``fetch`` of ``http://127.0.0.1:abc/x`` exited 1, after writing the model when the blob
was already there).

Hypothesis chooses the host's port text and the URL's parts; the oracle is httpx itself
(what it can build a request to) and the rule of spec/names.md (a port is 1-65535)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from blobstore import ModelName, Store
from blobstore.errors import InvalidName
from tests.cli.clirun import run
from tests.helpers import make_gguf, sha256_hex

pytestmark = pytest.mark.timeout(120)

GGUF = make_gguf(Path(tempfile.mkdtemp(prefix="url-gguf-")) / "m.gguf", seed=9)
HEX = sha256_hex(GGUF.read_bytes())
SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

# what may follow "host:" in a name's host part (letters, digits, '.', '-', '_', ':')
PORT_TEXT = st.one_of(
    st.text(alphabet="0123456789:abz.-_", max_size=8),
    st.integers(0, 10**12).map(str),
    st.integers(1, 65535).map(lambda p: f"0{p}"),
)


def _reachable(host: str) -> bool:
    """Whether a request can be built to ``host``, with a port of 1-65535 if any."""
    _, sep, port = host.partition(":")
    try:
        # (both schemes: each shows its own default port as None, 80 for http)
        urls = [httpx.URL(f"{scheme}://{host}/v2/") for scheme in ("http", "https")]
    except httpx.InvalidURL:
        return False
    number = next((u.port for u in urls if u.port is not None), None)
    return not sep or (port.isascii() and port.isdigit() and number is not None
                       and 1 <= number <= 65535)


def one_error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "unexpected error" not in err, err
    return lines[0]


@settings(max_examples=300, deadline=None)
@given(hostname=st.sampled_from(["h", "127.0.0.1", "a.b-c_d"]), port=PORT_TEXT)
def test_registry_address_agrees_with_what_httpx_can_reach(hostname: str, port: str) -> None:
    host = f"{hostname}:{port}"
    try:
        name = ModelName.parse(f"{host}/n/m")
    except InvalidName:
        return  # the grammar refuses it already
    if _reachable(host):
        assert name.registry_address() == host
        httpx.URL(f"https://{name.registry_address()}/v2/")  # builds (443 shows as None)
    else:
        with pytest.raises(InvalidName, match="not a registry address"):
            name.registry_address()


@pytest.mark.timeout(300)
@SETTINGS
@given(port=PORT_TEXT, command=st.sampled_from(["pull", "push", "outdated", "update"]))
def test_network_commands_refuse_a_host_with_a_bad_port(tmp_path: Path, port: str,
                                                        command: str) -> None:
    host = f"h:{port}"
    assume(not _reachable(host))
    try:
        name = ModelName.parse(f"{host}/n/m")
    except InvalidName:
        return
    store = Path(tempfile.mkdtemp(dir=tmp_path))
    # the model is stored under that name (as Ollama could): it lists and removes
    assert run("--store", str(store), "import", str(GGUF), "--name", f"{host}/n/m").code == 0
    args = {"pull": [f"{host}/n/other"], "push": [f"{host}/n/m", f"{host}/n/x"],
            "outdated": [f"{host}/n/m"], "update": [f"{host}/n/m"]}[command]
    r = run("--store", str(store), command, *args, "--insecure", "--retries", "0")
    assert r.code == 4, r
    assert "not a registry address" in one_error_line(r.err)
    assert not Store(store).has_model(ModelName.parse(f"{host}/n/other"))
    listed = run("--store", str(store), "list")
    assert listed.code == 0 and name.display() in listed.out
    assert run("--store", str(store), "rm", f"{host}/n/m").code == 0
    if command == "pull":  # refused before a store is made (found by review)
        fresh = store / "new"
        assert run("--store", str(fresh), "pull", f"{host}/n/m").code == 4
        assert not fresh.exists()


def test_outdated_of_all_models_reports_the_rest_and_warns_for_the_bad_name(
        tmp_path: Path) -> None:
    s = str(tmp_path / "s")
    for ref in ("h:1:2/n/m", "127.0.0.1:1/n/m"):  # port 1: refused at once
        assert run("--store", s, "import", str(GGUF), "--name", ref).code == 0
    r = run("--store", s, "outdated", "--insecure", "--retries", "0")
    assert "warning: h:1:2/n/m:latest: invalid model name" in r.err, r
    assert "warning: 127.0.0.1:1/n/m:latest: cannot reach" in r.err, r
    assert "Traceback" not in r.err and "unexpected error" not in r.err
    assert r.code in (4, 6), r


# ------------------------------------------------------------------ fetch
URL_PARTS = st.tuples(
    st.sampled_from(["http://", "https://", "HTTP://", "ftp://", "", "http:/", "http:///"]),
    st.sampled_from(["", "u:secret@", "@"]),
    st.sampled_from(["127.0.0.1", "h", "[::1", "[::1]", "", "h h", "[x]"]),
    st.one_of(st.just(""), PORT_TEXT.map(lambda p: ":" + p)),
    st.one_of(st.sampled_from(["/x.gguf", "", "/a?sig=s3cret#f"]),
              st.integers(60_000, 80_000).map(lambda n: "/" + "a" * n)),
)


@pytest.mark.timeout(300)
@SETTINGS
@given(parts=URL_PARTS)
def test_fetch_refuses_a_bad_url_before_writing_anything(tmp_path: Path,
                                                         parts: tuple[str, ...]) -> None:
    url = "".join(parts)
    store = Path(tempfile.mkdtemp(dir=tmp_path))
    Store(store).put_bytes(GGUF.read_bytes())  # present: a valid URL is never asked
    r = run("--store", str(store), "fetch", url, "--sha256", HEX, "--name", "f")
    try:
        u = httpx.URL(url)
        valid = (u.scheme in ("http", "https") and bool(u.host)
                 and (u.port is None or 1 <= u.port <= 65535))
    except httpx.InvalidURL:
        valid = False
    if valid:
        assert r.code == 0, r
        assert Store(store).has_model(ModelName.parse("f"))
        return
    assert r.code == 4, r
    line = one_error_line(r.err)
    assert "URL" in line and "secret" not in line and "s3cret" not in line
    assert len(line) < 400
    assert not Store(store).has_model(ModelName.parse("f"))
