from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import OllamaFixture, make_gguf, write_ollama_store


@pytest.fixture
def ollama_fx(tmp_path: Path) -> OllamaFixture:
    """A models folder written exactly as Ollama writes one."""
    src = tmp_path / "src"
    src.mkdir()
    return write_ollama_store(tmp_path / "models", src)


@pytest.fixture
def gguf_file(tmp_path: Path) -> Path:
    return make_gguf(tmp_path / "tiny.gguf")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test may touch the user's real stores."""
    for var in ("BLOBCTL_STORE", "OLLAMA_MODELS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
