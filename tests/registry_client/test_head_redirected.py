"""HEAD of a blob redirected to a CDN that refuses HEAD (spec/pull.md, "Order of a pull",
step 5). A presigned S3/R2 URL signs the method: HEAD on a URL signed for GET is 403 (or
401), while the GET works. Found from outside: such a pull ended with exit 7 and a hint
about credentials. An auth error of the registry's own origin still stops the pull.

Hypothesis chooses the CDN's status, whether the registry wants a token, and how many
blobs are missing (from 4 on the HEADs go out in parallel).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore.digest import Digest
from blobstore.store import Store
from registry_client.errors import AuthError
from registry_client.pull import PullOptions, pull
from registry_client.retry import RetryPolicy
from tests.servers import Fault, FaultServer, sha

MODEL = "application/vnd.ollama.image.model"
FAST = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05)


def _opts() -> PullOptions:
    return PullOptions(insecure=True, connections=4, retry=FAST, stall_timeout=2.0)


def _model(srv: FaultServer, layers: int) -> tuple[str, list[bytes]]:
    blobs = [bytes([i]) * (3000 + i) for i in range(layers)]
    srv.add_model("library/m", "q4", b'{"model_format":"gguf"}',
                  [(MODEL, b) for b in blobs])
    return f"{srv.netloc}/library/m:q4", blobs


@pytest.fixture(scope="module")
def peers() -> Iterator[tuple[FaultServer, FaultServer, FaultServer]]:
    """An open registry, one that wants a token, and a CDN on another host (one set for
    every example: stopping a server costs up to 0.5 s)."""
    with FaultServer() as plain, FaultServer(token="t0k") as tokened, \
            FaultServer(host="127.0.0.2") as cdn:
        yield plain, tokened, cdn


@pytest.mark.timeout(120)
@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(status=st.sampled_from([401, 403]), token=st.booleans(),
       layers=st.integers(1, 6))
def test_a_cdn_refusing_head_after_a_redirect_does_not_stop_the_pull(
        peers: tuple[FaultServer, FaultServer, FaultServer],
        tmp_path_factory: pytest.TempPathFactory, status: int, token: bool,
        layers: int) -> None:
    plain, tokened, cdn = peers
    origin = tokened if token else plain
    ref, blobs = _model(origin, layers)
    cdn.blobs = dict(origin.blobs)
    origin.faults[:] = [Fault("redirect", target=cdn.url, times=10_000)]
    cdn.faults[:] = [Fault("head", status=status, times=10_000)]
    store = Store(tmp_path_factory.mktemp("s") / "store")
    pull(ref, store=store, options=_opts())
    assert cdn.faults[0].times < 10_000  # the CDN really refused a HEAD
    for b in blobs:
        assert store.layout.blob(Digest.parse(sha(b))).read_bytes() == b
    assert store.verify().ok


@pytest.mark.timeout(60)
@pytest.mark.parametrize("status", [401, 403])
def test_the_registry_itself_refusing_head_stays_an_auth_error(tmp_path: Path,
                                                              status: int) -> None:
    with FaultServer() as origin:
        ref, _ = _model(origin, 1)
        origin.faults.append(Fault("head", status=status, times=10_000))
        with pytest.raises(AuthError) as exc:
            pull(ref, store=Store(tmp_path / "s"), options=_opts())
        assert exc.value.status == status


@pytest.mark.timeout(60)
def test_cli_pull_through_a_cdn_refusing_head_exits_0(tmp_path: Path) -> None:
    from tests.cli.clirun import run

    with FaultServer() as origin, FaultServer(host="127.0.0.2") as cdn:
        ref, _ = _model(origin, 2)
        cdn.blobs = dict(origin.blobs)
        origin.faults.append(Fault("redirect", target=cdn.url, times=10_000))
        cdn.faults.append(Fault("head", status=403, times=10_000))
        r = run("--store", str(tmp_path / "s"), "--json", "pull", f"http://{ref}")
        assert r.code == 0, r.err
        assert "error" not in r.err
        assert json.loads(r.out.strip().splitlines()[-1])
