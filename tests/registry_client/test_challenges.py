"""``WWW-Authenticate`` with more than one challenge (RFC 9110 11.6.1; httpx joins
repeated headers with ", "). Found from outside: with a ``Basic`` challenge before the
``Bearer`` one a pull ended with exit 7 although an anonymous token would do; with
``Bearer realm=…,service=…, Basic realm="Registry Realm"`` in one header the realm became
"Registry Realm" and the pull retried a bad URL for 15 s before exit 6. A relative realm
(``/token``) is the registry's own; a realm that is no http(s) URL is one error at once.

The parser is searched with hypothesis over challenge lists rendered with any spacing;
the client is driven against a real token-guarded server on 127.0.0.1 whose challenge
headers hypothesis shapes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry_client.auth import Challenge, parse_challenge, parse_challenges
from registry_client.client import RegistryClient
from registry_client.errors import ProtocolError
from registry_client.retry import RetryPolicy
from tests.cli.clirun import run
from tests.servers import QuietHandler, ThreadedHTTP

TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
tokens = st.text(TCHAR, min_size=1, max_size=8)
ows = st.sampled_from(["", " ", "  ", "\t"])
# a quoted value: any visible text, quotes and backslashes escaped
values = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20)


@st.composite
def challenge_lists(draw: st.DrawFn) -> tuple[str, list[Challenge]]:
    out: list[Challenge] = []
    parts: list[str] = []
    for _ in range(draw(st.integers(1, 4))):
        scheme = draw(tokens)
        names = draw(st.lists(tokens, max_size=4, unique_by=str.lower))
        if not names and draw(st.booleans()):
            t68 = draw(st.from_regex(r"[A-Za-z0-9\-._~+/]+=*", fullmatch=True))
            out.append(Challenge(scheme.lower(), {}, t68))
            parts.append(f"{scheme} {t68}")
            continue
        params: dict[str, str] = {}
        rendered = []
        for name in names:
            v = draw(st.one_of(tokens, values))
            params[name.lower()] = v
            if draw(st.booleans()) and all(c in TCHAR for c in v) and v:
                shown = v
            else:
                shown = '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
            rendered.append(f"{name}{draw(ows)}={draw(ows)}{shown}")
        sep = draw(ows) + "," + draw(ows)
        parts.append(f"{scheme}{' ' + sep.join(rendered) if rendered else ''}")
        out.append(Challenge(scheme.lower(), params))
    joined = ""
    for i, p in enumerate(parts):
        joined += (draw(ows) + "," + draw(ows) if i else draw(ows)) + p
    return joined + draw(ows), out


@settings(max_examples=300, deadline=None)
@given(case=challenge_lists())
def test_every_challenge_is_read_back(case: tuple[str, list[Challenge]]) -> None:
    header, want = case
    assert parse_challenges(header) == want


def test_bearer_is_preferred_and_params_stay_with_their_challenge() -> None:
    for header in ('Basic realm="Registry Realm", Bearer realm="https://a/token",service=s',
                   'Bearer realm="https://a/token",service=s, Basic realm="Registry Realm"'):
        c = parse_challenge(header)
        assert c == Challenge("bearer", {"realm": "https://a/token", "service": "s"})
    assert parse_challenge('Basic realm="x", Negotiate abc==') == Challenge(
        "basic", {"realm": "x"})
    assert parse_challenge("") is None


class _Guarded:
    """A registry that wants a Bearer token for everything but ``/auth/token``; its 401
    carries the ``WWW-Authenticate`` headers set in ``challenges`` (``{realm}`` is
    replaced by ``realm``)."""

    def __init__(self) -> None:
        self.challenges: list[str] = []
        self.realm = ""
        self.tokens = 0
        srv = self

        class H(QuietHandler):
            def _send(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path.startswith("/auth/token"):
                    srv.tokens += 1
                    return self._send(200, b'{"token": "t0k", "expires_in": 300}', [])
                if self.headers.get("Authorization") != "Bearer t0k":
                    hs = [("WWW-Authenticate", c.replace("{realm}", srv.realm))
                          for c in srv.challenges]
                    return self._send(401, b"{}", hs)
                return self._send(200, b"hello", [])

            do_HEAD = do_GET

        self.server = ThreadedHTTP(H)
        self.url = self.server.url


@pytest.fixture(scope="module")
def guarded() -> Iterator[_Guarded]:
    g = _Guarded()
    yield g
    g.server.stop()


BASIC = 'Basic realm="Registry Realm"'
OTHER = ['Negotiate', 'Newauth realm="apps", type=1, title="Login to \\"apps\\""',
         "Negotiate YWJj=="]


@pytest.mark.timeout(60)
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(others=st.lists(st.sampled_from([BASIC, *OTHER]), max_size=3),
       where=st.integers(0, 3), one_header=st.booleans(),
       realm=st.sampled_from(["absolute", "/auth/token", "token", "unquoted"]),
       extra=st.sampled_from(["", ',service="reg"', ', service=reg,scope="repository:x:pull"',
                              ',error="invalid_token"']))
def test_the_bearer_challenge_is_answered_among_others(
        guarded: _Guarded, others: list[str], where: int, one_header: bool, realm: str,
        extra: str) -> None:
    guarded.realm = {"absolute": f"{guarded.url}/auth/token", "/auth/token": "/auth/token",
                     "token": "../../../auth/token", "unquoted": f"{guarded.url}/auth/token"}[realm]
    quoted = "{realm}" if realm == "unquoted" else '"{realm}"'
    bearer = f"Bearer realm={quoted}{extra}"
    listed = [*others[:where], bearer, *others[where:]]
    guarded.challenges = [", ".join(listed)] if one_header else listed
    with RegistryClient(retry=RetryPolicy(attempts=1)) as client:
        resp = client.request("GET", f"{guarded.url}/v2/x/blobs/b", scope="repository:x:pull",
                              what="blob")
        assert resp.read() == b"hello"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("realm", ["ftp://127.0.0.1/token", "http://[::1/token",
                                   "file:///srv/token"])
def test_a_realm_that_is_no_http_url_is_one_error_at_once(guarded: _Guarded, tmp_path: Path,
                                                          realm: str) -> None:
    guarded.realm = realm
    guarded.challenges = ['Bearer realm="{realm}",service="reg"']
    with RegistryClient(retry=RetryPolicy(attempts=5, base_delay=1.0)) as client:
        t0 = time.monotonic()
        with pytest.raises(ProtocolError) as exc:
            client.request("GET", f"{guarded.url}/v2/x/blobs/b", scope="", what="blob")
        assert time.monotonic() - t0 < 0.9  # no retry (the first backoff is 1 s)
    assert "token service" in exc.value.message and realm[:10] in exc.value.message
    r = run("fetch", f"{guarded.url}/v2/x/blobs/b", "--sha256", "0" * 64, "--name", "t/f:1",
            "--backoff", "1", "--store", str(tmp_path / "s"))
    assert r.code == 6, r.err
    assert r.err.startswith("error: ") and "token service" in r.err.splitlines()[0]
