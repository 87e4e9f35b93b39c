"""A blob GET redirected to another origin (a CDN, an object store) that refuses it with
401/403: no credentials were sent there, so it is not an authentication failure. Found
from outside: a presigned URL already expired on arrival ended with exit 7 and "hint:
check your credentials". Now the registry is asked once more for a fresh redirect, and
a second refusal is a registry/storage error (exit 6) that says the storage refused it.

Hypothesis chooses the refusing status, how many GETs the storage refuses, whether the
registry wants a token, and the size of the blob (one request or ranges).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore.digest import Digest
from blobstore.store import Store
from registry_client.errors import AuthError, RegistryError
from registry_client.pull import PullOptions, pull
from registry_client.retry import RetryPolicy
from tests.cli.clirun import run
from tests.servers import Fault, FaultServer, QuietHandler, ThreadedHTTP, sha

MODEL = "application/vnd.ollama.image.model"
FAST = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05)


def _opts() -> PullOptions:
    return PullOptions(insecure=True, connections=4, retry=FAST, stall_timeout=2.0,
                       chunk_size=1 << 20)  # (a 3 MiB blob goes in ranges)


class _Peers(tuple[FaultServer, FaultServer, FaultServer]):
    def __repr__(self) -> str:  # (hypothesis prints it: not the blobs)
        return "peers"


@pytest.fixture(scope="module")
def peers() -> Iterator[_Peers]:
    """An open registry, one that wants a token, and a storage on another host."""
    with FaultServer() as plain, FaultServer(token="t0k") as tokened, \
            FaultServer(host="127.0.0.2") as cdn:
        yield _Peers((plain, tokened, cdn))


def _setup(origin: FaultServer, cdn: FaultServer, size: int, status: int,
           refusals: int) -> tuple[str, bytes]:
    layer = bytes(range(256)) * (size // 256) + b"x"
    origin.add_model("library/m", "q4", b'{"model_format":"gguf"}', [(MODEL, layer)])
    cdn.blobs = dict(origin.blobs)
    cdn.log.clear()
    origin.faults[:] = [Fault("redirect", target=cdn.url, times=10_000)]
    cdn.faults[:] = [Fault("head", status=403, times=10_000),  # (HEAD: signed for GET)
                     Fault("status", match=f"/blobs/{sha(layer)}", status=status,
                           times=refusals)]
    return f"{origin.netloc}/library/m:q4", layer


@pytest.mark.timeout(120)
@settings(max_examples=16, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(status=st.sampled_from([401, 403]), token=st.booleans(),
       refusals=st.sampled_from([1, 2, 3, 10_000]), size=st.sampled_from([3000, 3 << 20]))
def test_a_storage_refusing_a_redirected_get(
        peers: _Peers,
        tmp_path_factory: pytest.TempPathFactory, status: int, token: bool,
        refusals: int, size: int) -> None:
    plain, tokened, cdn = peers
    origin = tokened if token else plain
    ref, layer = _setup(origin, cdn, size, status, refusals)
    store = Store(tmp_path_factory.mktemp("s") / "store")
    if refusals == 1:  # the registry's fresh redirect works
        pull(ref, store=store, options=_opts())
        assert store.layout.blob(Digest.parse(sha(layer))).read_bytes() == layer
        assert cdn.faults[1].times == 0
        return
    ranged = size > 1 << 20
    try:
        pull(ref, store=store, options=_opts())
    except RegistryError as exc_:
        exc = exc_
    else:
        # the first ranges of a blob go out together, each may meet one refusal
        assert ranged and refusals < 10_000
        assert store.layout.blob(Digest.parse(sha(layer))).read_bytes() == layer
        return
    assert not isinstance(exc, AuthError)
    assert exc.status == status
    assert f"storage the registry redirected to ({cdn.netloc}) refused it" in exc.message
    assert "credentials" not in (exc.hint or "")
    if not ranged:  # asked the registry once more, not more
        assert cdn.faults[1].times == refusals - 2


@pytest.mark.timeout(60)
def test_cli_exit_6_without_a_credentials_hint(
        peers: _Peers, tmp_path: Path) -> None:
    _, tokened, cdn = peers
    ref, _ = _setup(tokened, cdn, 3000, 403, 10)
    r = run("--store", str(tmp_path / "s"), "pull", f"http://{ref}", "--backoff", "0.01")
    assert r.code == 6, r.err
    lines = r.err.strip().splitlines()
    assert lines[-2].startswith("error: blob ")
    assert f"the storage the registry redirected to ({cdn.netloc}) refused it (403" \
        in lines[-2]
    assert lines[-1].startswith("hint: ") and "credentials" not in r.err


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["POST", "PATCH", "PUT"])
def test_only_a_get_asks_the_registry_again_after_storage_refused_it(method: str) -> None:
    """Found by review: the fresh-redirect retry re-sent any method but HEAD; sent again,
    an upload's POST or PATCH may open or feed a second session. spec/pull.md says a
    GET asks once more: anything else is the one refusal, as it came."""
    from registry_client.client import RegistryClient

    seen: list[str] = []

    class Storage(QuietHandler):
        def _refuse(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = do_PATCH = do_PUT = _refuse

    with ThreadedHTTP(Storage, "127.0.0.2") as storage:

        class Registry(QuietHandler):
            def _redirect(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                seen.append(self.command)
                self.send_response(307)
                self.send_header("Location", f"{storage.url}/up")
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_PATCH = do_PUT = _redirect

        with ThreadedHTTP(Registry) as registry, \
                RegistryClient(insecure=True, retry=RetryPolicy(attempts=1)) as client, \
                pytest.raises(RegistryError):
            client.request(method, f"{registry.url}/v2/a/b/blobs/uploads/",
                           scope="repository:a/b:push", what="upload",
                           body=lambda: b"some bytes")
    assert seen == [method]
