"""The page's one-time notes belong to the caller who acted, and the access log names
who acted on the page.

Found from outside (serve --auth): the admin pinned secret:1 through the form, and an
anonymous visitor allowed only library/public* opened ``/?note=1`` and read "pinned
secret:1" (reading consumed it); the access log said SUBJECT ``-`` for the admin's
POST /ui/actions/pin, GET / and /ui/login, while /v2 requests said ``admin``.
"""

from __future__ import annotations

import io
import os
import re
import time
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore import Store
from registry_server.app import close_app, create_app
from registry_server.context import ServeOptions, ServerContext
from tests.registry_server.conftest import add_model
from tests.registry_server.test_web_http import ADMIN, READER, TokenPolicy
from tests.servers import running_asgi

CALLERS = {"admin": ADMIN, "reader": READER, "anonymous": None}
MODELS = {"secret": "library/secret", "public": "library/public"}


class Served:
    def __init__(self, url: str, log: io.StringIO) -> None:
        self.url = url
        self.log = log

    def client(self, who: str) -> httpx.Client:
        h = {"Origin": self.url}
        if CALLERS[who]:
            h["Authorization"] = CALLERS[who]  # type: ignore[assignment]
        return httpx.Client(base_url=self.url, headers=h, timeout=30)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    store = Store(tmp_path_factory.mktemp("notes") / "store")
    for repo in MODELS.values():
        add_model(store, f"{repo}:1", [os.urandom(1000)])
    ctx = ServerContext(store, ServeOptions(),
                        policy=TokenPolicy(hidden=frozenset({"library/secret"})))
    log = io.StringIO()
    app = create_app(ctx, log_stream=log)
    try:
        with running_asgi(app) as url:
            yield Served(url, log)
    finally:
        close_app(app)


def shown(html: str) -> str | None:
    m = re.search(r'<p class="note [^"]*">([^<]*)</p>', html)
    return m.group(1) if m else None


ACT = st.tuples(st.sampled_from(["admin", "reader", "anonymous"]),
                st.sampled_from(["secret", "public", "bad name"]),
                st.sampled_from(["pin", "unpin"]))


@pytest.mark.timeout(120)
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(acts=st.lists(ACT, min_size=1, max_size=4),
       readers=st.lists(st.sampled_from(list(CALLERS)), min_size=1, max_size=5))
def test_a_note_is_read_once_by_the_caller_who_acted_and_only_if_it_may_see_the_model(
        served: Served, acts: list[tuple[str, str, str]], readers: list[str]) -> None:
    notes = []  # (note URL, owner, model or None, message)
    for who, model, kind in acts:
        with served.client(who) as c:
            name = f"{model}:1" if model in MODELS else "x y z"
            r = c.post(f"/ui/actions/{kind}", data={"name": name})
        if r.status_code == 303:
            notes.append((r.headers["location"], who, model if model in MODELS else None))
        else:  # refused before any note: 401 asks for credentials, 403 says no
            assert r.status_code in (401, 403) and who != "admin", (r.status_code, who)
    for loc, owner, model in notes:
        assert not re.fullmatch(r"/\?note=\d+(#.*)?", loc), loc  # ids are not a counter
        taken = False
        for who in [*readers, owner]:
            with served.client(who) as c:
                text = shown(c.get(loc.split("#")[0]).text)
            may_see = model != "secret" or who == "admin"
            if who == owner and may_see and not taken:
                assert text is not None, (loc, who)
                if model is not None:
                    assert f"{model}:1" in text
                taken = True
            else:  # someone else's, one it may not see, or already read
                assert text is None, (loc, who, owner, text)


@pytest.mark.timeout(60)
def test_the_access_log_names_who_acted_on_the_page(served: Served) -> None:
    with served.client("admin") as c:
        c.post("/ui/actions/pin", data={"name": "public:1"})
        c.get("/")
        c.get("/ui/login")
        c.get("/ui/api/models")
    with served.client("reader") as c:
        c.post("/ui/actions/unpin", data={"name": "public:1"})  # 403: still who asked
        c.get("/ui/api/bench")
    # a request's line is written once its response went out: the client may see the
    # response first (the last line is waited for)
    deadline = time.monotonic() + 10
    while True:
        lines = served.log.getvalue().splitlines()
        if any(" GET /ui/api/bench " in ln for ln in lines) or time.monotonic() > deadline:
            break
        time.sleep(0.02)

    def subject(method: str, path: str, who: str) -> list[str]:
        return [ln.rsplit(" ", 1)[-1] for ln in lines
                if f" {method} {path} " in ln and ln.endswith(f" {who}")]

    assert subject("POST", "/ui/actions/pin", "admin"), lines
    assert subject("GET", "/", "admin") and subject("GET", "/ui/login", "admin"), lines
    assert subject("GET", "/ui/api/models", "admin"), lines
    assert subject("POST", "/ui/actions/unpin", "reader"), lines
    assert subject("GET", "/ui/api/bench", "reader"), lines
    assert not [ln for ln in lines if "/ui/" in ln and ln.endswith(" -")], lines
