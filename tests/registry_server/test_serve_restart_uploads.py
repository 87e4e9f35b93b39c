"""Upload sessions survive a restart of ``serve --push`` (spec/serve.md, "Uploads"): a
session id is its ingest folder's key and every answered PATCH is checkpointed, so a
server that was stopped, or killed with SIGKILL, re-opens a session it does not know and
the client goes on from the ``Range`` it is told. Only the same caller and repository
re-open it."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as hs

from blobstore import Store
from blobstore.digest import Digest
from registry_client.push import PushOptions, push
from tests.blobstore.archutil import add_model
from tests.registry_server.conftest import serving, start_serve

MiB = 1 << 20
pytestmark = pytest.mark.timeout(300)


def upload_leftovers(store: Store) -> list[str]:
    return sorted(p.name for p in store.layout.ingest.glob("up-*"))


def test_a_session_is_reopened_after_a_clean_restart(tmp_path: Path) -> None:
    store = Store(tmp_path / "serve")
    blob = os.urandom(3 * MiB + 17)
    with serving(store, push=True) as (url, _), httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v2/ns/r/blobs/uploads/")
        loc = r.headers["Location"]
        assert c.patch(loc, content=blob[:MiB],
                       headers={"Content-Range": f"0-{MiB - 1}"}).status_code == 202
        assert c.patch(loc, content=blob[MiB:2 * MiB],
                       headers={"Content-Range": f"{MiB}-{2 * MiB - 1}"}).status_code == 202
    # the server is gone; its session folder stays
    assert upload_leftovers(store) == [loc.rsplit("/", 1)[1]]
    with serving(store, push=True) as (url, _), httpx.Client(base_url=url, timeout=30) as c:
        # another repository does not get it (and does not spoil it)
        other = loc.replace("/v2/ns/r/", "/v2/ns/other/")
        assert c.get(other).status_code == 404
        r = c.get(loc)
        assert r.status_code == 204 and r.headers["Range"] == f"0-{2 * MiB - 1}"
        r = c.put(loc, params={"digest": str(Digest.of_bytes(blob))}, content=blob[2 * MiB:],
                  headers={"Content-Range": f"{2 * MiB}-{len(blob) - 1}"})
        assert r.status_code == 201, r.text
    assert store.blob_path(Digest.of_bytes(blob)).read_bytes() == blob
    assert upload_leftovers(store) == []


@settings(max_examples=4, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kill_at=hs.integers(1, 6 * MiB - 1))
@example(kill_at=3 * MiB + 5)  # always one cut after answered PATCHes
def test_push_resumes_across_a_killed_serve(tmp_path_factory: pytest.TempPathFactory,
                                            kill_at: int) -> None:
    """``blobctl push`` cut at a chosen byte; the server then dies by SIGKILL and comes
    back on the same address: the next push continues from what the server held."""
    base = tmp_path_factory.mktemp("restart")
    served = Store(base / "serve")
    sp = start_serve(served.root, "--push", log_dir=base / "logs")
    port = sp.url.rsplit(":", 1)[1]
    client = Store(base / "client")
    layer = os.urandom(6 * MiB)
    m = add_model(client, "example.com/ns/k:1", [layer])
    big = m.layers[0].digest
    dest = f"{sp.netloc}/restart/r"
    opts = PushOptions(insecure=True, chunk_size=MiB, index=False)
    sent = {"n": 0}

    class Cut(Exception):
        pass

    def killer(ev: dict[str, object]) -> None:
        if ev.get("digest") == str(big) and isinstance(ev.get("completed"), int):
            sent["n"] = int(ev["completed"])  # type: ignore[call-overload]
            if sent["n"] >= kill_at:
                raise Cut

    try:
        with pytest.raises(Cut):
            push("example.com/ns/k:1", dest, store=client, progress=killer, options=opts)
        states = list((client.root / ".blobctl/push").glob("*.json"))
        held = 0
        if states:
            url = msgspec.json.decode(states[0].read_bytes())["url"]
            # let the server finish the cut request (its checkpoint) before killing it
            last, since = None, time.monotonic()
            with httpx.Client(timeout=10) as c:
                while time.monotonic() - since < 0.5:
                    rng = c.get(url).headers.get("Range")
                    if rng != last:
                        last, since = rng, time.monotonic()
                    time.sleep(0.05)
            held = int(last.split("-")[1]) + 1 if last and last != "0-0" else 0
        sp.stop(signal.SIGKILL)
        sp = start_serve(served.root, "--push", "--listen", f"127.0.0.1:{port}",
                         log_dir=base / "logs")
        assert sp.url.endswith(f":{port}")
        r = push("example.com/ns/k:1", dest, store=client, options=opts)
        assert r.bytes_resumed == held  # all the killed server had, and not re-sent
        event("resumed after the kill" if held else "nothing held: started over")
        if sent["n"] > MiB:  # a PATCH was answered: the session existed and survived
            assert held > 0
        assert served.blob_path(big).read_bytes() == layer
        if held:  # the session was resumed and committed: its folder is gone
            assert upload_leftovers(served) == []
        # else the killed server's folder, with nothing durable in it, waits for GC
        assert len(upload_leftovers(served)) <= 1
    finally:
        sp.stop()
