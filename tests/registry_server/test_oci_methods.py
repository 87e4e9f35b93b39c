"""Methods no route takes (spec/serve.md, "API"): every ``/v2`` 405 is an OCI error,
``{"errors":[{"code":"UNSUPPORTED",…}]}`` with an ``Allow`` header naming what the route
takes, never Starlette's text/plain "Method Not Allowed" (found from outside: ``OPTIONS
/v2/``, ``PUT /v2/`` and ``OPTIONS`` on the other routes). Hypothesis picks the route,
the method and whether the server takes pushes."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore import Store
from tests.registry_server.conftest import serving
from tests.servers import sha

pytestmark = pytest.mark.timeout(120)

D = sha(b"x")
PATHS = ["/v2/", "/v2/_catalog", "/v2/ns/m/manifests/latest", f"/v2/ns/m/manifests/{D}",
         f"/v2/ns/m/blobs/{D}", "/v2/ns/m/tags/list", "/v2/ns/m/blobs/uploads/",
         f"/v2/ns/m/referrers/{D}", "/v2/hf.co/org/m/manifests/q4"]
METHODS = ["OPTIONS", "TRACE", "PROPFIND", "PUT", "POST", "PATCH", "DELETE", "GET", "HEAD"]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[bool, str]]:
    with serving(Store(tmp_path_factory.mktemp("ro"))) as (ro, _), \
            serving(Store(tmp_path_factory.mktemp("rw")), push=True) as (rw, _):
        yield {False: ro, True: rw}


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(PATHS), method=st.sampled_from(METHODS), push=st.booleans())
def test_every_405_is_an_oci_error_with_allow(servers: dict[bool, str], path: str,
                                              method: str, push: bool) -> None:
    r = httpx.request(method, servers[push] + path, timeout=30)
    assert r.headers.get("Docker-Distribution-API-Version") == "registry/2.0"
    if method in ("OPTIONS", "TRACE", "PROPFIND") or (path == "/v2/" and method not in
                                                     ("GET", "HEAD")):
        assert r.status_code == 405, (method, path, r.status_code, r.text)
    if r.status_code != 405:
        return
    assert r.headers["content-type"].startswith("application/json"), r.headers
    if method != "HEAD":
        assert r.json()["errors"][0]["code"] == "UNSUPPORTED", r.text
    assert "allow" in r.headers, r.headers
    allowed = [a.strip() for a in r.headers["allow"].split(",") if a.strip()]
    assert method not in allowed, (method, path, allowed)
