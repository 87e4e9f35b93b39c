"""``blobctl push`` into ``blobctl serve --push``, stopped at any byte of any chunk, then
pushed again: serve keeps the prefix of a cut PATCH (spec/serve.md, "Uploads"), so the
second push resumes from what serve holds, even mid-chunk, and never re-sends it.
(The Debian docker-registry cancels an upload whose chunk was cut mid-body; spec/push.md,
"Resume".)"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as hs

from blobstore import Store
from registry_client.push import PushOptions, push
from registry_server.context import ServerContext
from tests.blobstore.archutil import add_model
from tests.registry_server.conftest import serving

MiB = 1 << 20
pytestmark = pytest.mark.timeout(300)


class _Kill(Exception):
    """Stands for the process dying at a chosen byte of an upload."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ServerContext]]:
    with serving(Store(tmp_path_factory.mktemp("serve") / "store"), push=True) as s:
        yield s


_runs = itertools.count()


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kill_at=hs.integers(1, 6 * MiB - 1), chunk=hs.sampled_from([512 << 10, 2 * MiB, 3 * MiB]))
def test_push_cut_at_any_byte_resumes_from_what_serve_holds(
        server: tuple[str, ServerContext], tmp_path_factory: pytest.TempPathFactory,
        kill_at: int, chunk: int) -> None:
    url, ctx = server
    netloc = url.removeprefix("http://")
    store = Store(tmp_path_factory.mktemp("client"))
    layer = os.urandom(6 * MiB)
    m = add_model(store, "example.com/ns/k:1", [layer])
    big = m.layers[0].digest
    dest = f"{netloc}/resume/r{next(_runs)}"
    sent: dict[str, int] = {}

    def killer(ev: dict[str, object]) -> None:
        if ev.get("digest") == str(big) and isinstance(ev.get("completed"), int):
            sent["n"] = int(ev["completed"])  # type: ignore[call-overload]
            if sent["n"] >= kill_at:
                raise _Kill

    opts = PushOptions(insecure=True, chunk_size=chunk, index=False)
    with pytest.raises(_Kill):
        push("example.com/ns/k:1", dest, store=store, progress=killer, options=opts)
    r = push("example.com/ns/k:1", dest, store=store, options=opts)
    # what serve held of the big layer was not sent again; the rest was sent once
    assert r.bytes_resumed + r.bytes_uploaded <= len(layer) + m.config.size
    if sent["n"] > chunk:  # a chunk was answered, so the upload was recorded: all that
        assert r.bytes_resumed == sent["n"]  # went out before the cut is kept and not re-sent
    else:
        assert r.bytes_resumed == 0
    event("resumed mid-chunk" if r.bytes_resumed % chunk else "resumed at a chunk boundary")
    assert ctx.store.blob_path(big).read_bytes() == layer
    assert not list((store.root / ".blobctl/push").glob("*.json"))
