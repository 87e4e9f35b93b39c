"""``--debug`` shows no secret (spec/pull.md: "Tokens and passwords are never logged; URLs
in messages carry no query string"). Found from outside: httpx's INFO request lines and
httpcore's DEBUG response headers showed a fetch URL's password
(``GET http://alice:Sup3rSecretPW@…``) and the presigned query of a redirect
(``X-Amz-Signature=…``).

A real ``blobctl --debug`` process fetches a blob from a token-guarded server (Basic
credentials from a docker config for the token) that redirects to a storage on another
host with a signed query; hypothesis draws the secrets, the redirect status and whether
the fetch ends well or fails (an error's traceback is searched too). The whole stderr
must hold none of them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cli.clirun import run_proc
from tests.helpers import make_gguf
from tests.servers import QuietHandler, ThreadedHTTP


def _gguf() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        make_gguf(Path(d) / "m.gguf")
        return (Path(d) / "m.gguf").read_bytes()


BLOB = _gguf()
DIGEST = hashlib.sha256(BLOB).hexdigest()


class _Peers:
    """A registry (127.0.0.1) and its storage (127.0.0.2); the secrets are set per run."""

    def __init__(self) -> None:
        self.token = self.signature = ""
        self.userinfo = "-"  # the Basic header of the URL's user info (httpx sends it)
        self.status = 307
        self.storage_status = 200
        peers = self

        class Base(QuietHandler):
            def send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

        class Registry(Base):
            def do_GET(self) -> None:
                if self.path.startswith("/token"):
                    doc = {"token": peers.token, "access_token": peers.token,
                           "expires_in": 300}
                    return self.send(200, json.dumps(doc).encode(),
                                     {"Content-Type": "application/json"})
                if self.headers.get("Authorization") not in (f"Bearer {peers.token}",
                                                             peers.userinfo):
                    realm = f"{peers.registry.url}/token"
                    return self.send(401, b"{}", {"WWW-Authenticate":
                                                  f'Bearer realm="{realm}",service="r"'})
                query = (f"X-Amz-Credential=AKIA{peers.signature[:8]}&X-Amz-Expires=600"
                         f"&X-Amz-Security-Token={peers.signature}x"
                         f"&X-Amz-Signature={peers.signature}")
                self.send(peers.status, b"", {
                    "Location": f"{peers.storage.url}/store/{DIGEST}?{query}",
                    "Set-Cookie": f"session={peers.signature}c"})

            do_HEAD = do_GET

        class Storage(Base):
            def do_GET(self) -> None:
                if peers.signature not in self.path:
                    return self.send(403, b"<Error>SignatureDoesNotMatch</Error>", {})
                if peers.storage_status != 200:
                    return self.send(peers.storage_status, b"<Error>AccessDenied</Error>",
                                     {})
                self.send(200, BLOB, {"Content-Type": "application/octet-stream"})

            do_HEAD = do_GET

        self.registry = ThreadedHTTP(Registry)
        self.storage = ThreadedHTTP(Storage, "127.0.0.2")

    def __repr__(self) -> str:
        return "peers"

    def stop(self) -> None:
        self.registry.stop()
        self.storage.stop()


@pytest.fixture(scope="module")
def peers() -> Iterator[_Peers]:
    p = _Peers()
    yield p
    p.stop()


secret = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=12, max_size=24)


@pytest.mark.timeout(120)
@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(password=secret, token=secret, signature=secret,
       status=st.sampled_from([301, 302, 303, 307, 308]), fails=st.booleans(),
       userinfo=st.booleans())
def test_debug_output_holds_no_secret(peers: _Peers, tmp_path_factory: pytest.TempPathFactory,
                                      password: str, token: str, signature: str,
                                      status: int, fails: bool, userinfo: bool) -> None:
    tmp = tmp_path_factory.mktemp("d")
    peers.token, peers.signature, peers.status = "T" + token, "S" + signature, status
    peers.storage_status = 403 if fails else 200
    port = peers.registry.port
    basic = base64.b64encode(f"bob:P{password}".encode()).decode()
    (tmp / "config.json").write_text(json.dumps({"auths": {f"127.0.0.1:{port}": {
        "auth": basic}}}))
    # with user info in the URL, httpx answers with it (Basic): no token is fetched
    info = f"alice:U{password}"
    peers.userinfo = "Basic " + base64.b64encode(info.encode()).decode() if userinfo else "-"
    url = (f"http://{info + '@' if userinfo else ''}127.0.0.1:{port}/v2/library/x/blobs/"
           f"sha256:{DIGEST}?X-Sig=P{password}q")
    r = run_proc("--debug", "--store", str(tmp / "s"), "fetch", url, "--sha256", DIGEST,
                 "--name", "t/f:1", "--backoff", "0.01", "--retries", "1",
                 env={"DOCKER_CONFIG": str(tmp)})
    assert r.code == (6 if fails else 0), r.err
    assert "HTTP Request: GET" in r.err  # httpx's lines are there, and httpcore's:
    assert "receive_response_headers" in r.err
    secrets = [f"P{password}", f"U{password}", peers.token, peers.signature, basic,
               "X-Amz", "X-Sig"]
    if userinfo:
        secrets.append(peers.userinfo.split()[1])
    for s in secrets:
        assert s not in r.err, s


shapes = st.sampled_from(["{}", "GET {} \"HTTP/1.1 200 OK\"", "(b'Location', b'{}')",
                          "{{'location': '{}'}}", "redirect to <{}>", "[{}]"])


@settings(max_examples=200, deadline=None)
@given(shape=shapes, scheme=st.sampled_from(["http", "https", "HTTP"]),
       user=st.text("abc", max_size=4), password=secret, query=secret,
       path=st.text("abc/-_.:", max_size=12), relative=st.booleans())
def test_redact_hides_user_info_and_query_in_any_shape(shape: str, scheme: str, user: str,
                                                        password: str, query: str,
                                                        path: str, relative: bool) -> None:
    from cli.redact import redact

    url = (f"/{path}?sig=Q{query}" if relative
           else f"{scheme}://{user}:P{password}@host:1/{path}?a=1&sig=Q{query}")
    out = redact(shape.format(url))
    assert f"P{password}" not in out and f"Q{query}" not in out
    assert redact(out) == out
