from __future__ import annotations

import base64
import json
import time
from email.utils import formatdate
from pathlib import Path

import pytest

from blobstore.name import ModelName
from registry_client.auth import credentials_for, parse_challenge
from registry_client.client import RegistryClient
from registry_client.retry import RetryPolicy, parse_retry_after


def test_parse_bearer_challenge() -> None:
    c = parse_challenge('Bearer realm="https://auth.example/token",service="reg",'
                        'scope="repository:library/x:pull,push"')
    assert c is not None and c.scheme == "bearer"
    assert c.params == {"realm": "https://auth.example/token", "service": "reg",
                        "scope": "repository:library/x:pull,push"}
    assert parse_challenge('Basic realm="x"').scheme == "basic"  # type: ignore[union-attr]
    assert parse_challenge(None) is None


def test_docker_config_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"auths": {
        "https://registry.example.com/v1/": {"auth": base64.b64encode(b"me:pw").decode()},
        "other:5000": {"username": "u2", "password": "p2"},
    }}))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    c = credentials_for("registry.example.com")
    assert c is not None and (c.username, c.password) == ("me", "pw")
    assert "pw" not in repr(c)
    c2 = credentials_for("OTHER:5000")
    assert c2 is not None and c2.password == "p2"
    assert credentials_for("unknown.example") is None


@pytest.mark.parametrize("var", ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN"])
def test_hf_token_from_env(var: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for v in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv(var, "hf_secret")
    c = credentials_for("hf.co")
    assert c is not None and c.bearer and c.password == "hf_secret"
    assert credentials_for("registry.ollama.ai") is None


def test_retry_after_forms() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    later = formatdate(time.time() + 30, usegmt=True)
    assert 25 <= (parse_retry_after(later) or 0) <= 31


def test_backoff_is_capped_and_honours_retry_after() -> None:
    p = RetryPolicy(attempts=5, base_delay=1.0, max_delay=4.0)
    assert all(0 <= p.delay(n) <= 4.0 for n in range(1, 20) for _ in range(20))
    assert p.delay(1, retry_after=3.0) == 3.0
    assert p.delay(1, retry_after=100.0) == 4.0


def test_registry_urls() -> None:
    with RegistryClient() as c:
        n = ModelName.parse("hf.co/bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M")
        assert c.manifest_url(n, n.tag) == (
            "https://hf.co/v2/bartowski/Qwen2.5-0.5B-Instruct-GGUF/manifests/Q4_K_M")
        o = ModelName.parse("llama3:8b")
        assert c.manifest_url(o, o.tag) == (
            "https://registry.ollama.ai/v2/library/llama3/manifests/8b")
        h = ModelName.parse("http://127.0.0.1:5000/ns/m:t")
        assert c.base_url(h) == "http://127.0.0.1:5000"


def test_token_cache_expires_before_the_token_does(monkeypatch: pytest.MonkeyPatch) -> None:
    from registry_client import auth

    clock = [1000.0]
    monkeypatch.setattr(auth.time, "monotonic", lambda: clock[0])
    cache = auth.TokenCache()
    key = ("https://a/token", "svc", "repository:x:pull")
    cache.put(key, "tok", 60, "https://reg:443")
    assert cache.for_origin("https://reg:443", "repository:x:pull") == "tok"
    assert cache.for_origin("https://other:443", "repository:x:pull") is None
    clock[0] += 49
    assert cache.get(key) == "tok"
    clock[0] += 2  # within 10 s of expiry: refresh rather than risk a 401 mid-pull
    assert cache.get(key) is None
