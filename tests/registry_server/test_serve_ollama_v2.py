"""``serve`` of a store newer Ollama wrote (``manifests-v2/`` links, manifest lists):
every route sees the model, and a client pulls it (found by review: the catalog listed
the repository while its tags list said NAME_UNKNOWN, and a list was served raw, which
no registry client can read)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest

from blobstore.store import Store
from registry_client.pull import PullOptions, pull
from tests.blobstore.test_ollama_v2 import _list_model, ollama_v2
from tests.registry_server.conftest import add_model, serving


@pytest.mark.timeout(120)
def test_serve_shows_and_serves_ollama_v2_models(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    ollama_v2(store, "tiny", [b"GGUF tiny" * 100, b"{{ .Prompt }}"])
    _list_model(store, [("mlx", "ref"), ("ollama", "ref")])  # library/lst:latest
    add_model(store, "library/tiny:old", [b"GGUF old" * 100])  # manifests/, same repo
    with serving(store) as (url, _), httpx.Client(base_url=url) as c:
        repos = c.get("/v2/_catalog").json()["repositories"]
        assert {"library/tiny", "library/lst"} <= set(repos)
        assert c.get("/v2/library/tiny/tags/list").json()["tags"] == ["latest", "old"]
        assert c.get("/v2/library/lst/tags/list").json()["tags"] == ["latest"]
        r = c.get("/v2/library/lst/manifests/latest",
                  headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"})
        assert r.status_code == 200 and b"GGUF" not in r.content
        assert r.json()["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
        digest = r.headers["Docker-Content-Digest"]
        assert c.get(f"/v2/library/lst/manifests/{digest}").status_code == 200
        netloc = url.removeprefix("http://")
        for ref, gguf in ((f"{netloc}/library/tiny:latest", b"GGUF tiny" * 100),
                          (f"{netloc}/library/lst:latest", b"GGUF for ollama" * 20)):
            other = Store(tmp_path / ref.replace("/", "_").replace(":", "_"))
            pull(ref, store=other, options=PullOptions(insecure=True, auto_gc=False))
            [entry] = other.list_models()
            path = other.resolve(entry.name).model_path
            assert path is not None
            assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(gguf).digest()


def test_a_dangling_v2_link_hides_its_tag_as_in_the_store(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    add_model(store, "library/tiny:latest", [b"GGUF old" * 100])
    v2 = ollama_v2(store, "tiny", [b"GGUF new" * 100])
    add_model(store, "library/tiny:other", [b"GGUF other" * 100])
    v2["blob"].unlink()
    (v2["link"].parent / "weird").symlink_to(tmp_path)  # a link to a folder: no tag
    with serving(store) as (url, _), httpx.Client(base_url=url) as c:
        assert c.get("/v2/library/tiny/tags/list").json()["tags"] == ["other"]
        assert c.get("/v2/library/tiny/manifests/latest").status_code == 404
