from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore.errors import GGUFError
from blobstore.gguf import file_type_name, is_gguf, read_gguf
from tests.helpers import make_gguf


def test_reads_what_the_reference_writer_wrote(tmp_path: Path) -> None:
    p = make_gguf(tmp_path / "m.gguf", arch="qwen2", file_type=7, n_embd=32, n_vocab=100,
                  layers=2)
    info = read_gguf(p)
    assert info.version == 3
    assert info.architecture == "qwen2"
    assert file_type_name(info.file_type) == "Q8_0"
    assert info.parameter_count == 100 * 32 + 2 * 32 * 32
    assert info.metadata["qwen2.context_length"] == 128
    assert info.metadata["tokenizer.ggml.tokens"] == 100  # long arrays are counted
    assert not info.is_projector and not info.is_adapter
    assert is_gguf(p)


def test_projector_and_adapter_kinds(tmp_path: Path) -> None:
    assert read_gguf(make_gguf(tmp_path / "p.gguf", arch="clip", kind="mmproj")).is_projector
    assert read_gguf(make_gguf(tmp_path / "a.gguf", kind="adapter")).is_adapter


@pytest.mark.parametrize("cut", [0, 3, 4, 8, 20, 40, 200, 1000])
def test_truncated_file(tmp_path: Path, cut: int) -> None:
    data = make_gguf(tmp_path / "m.gguf").read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:cut])
    with pytest.raises(GGUFError):
        read_gguf(bad)


def test_not_a_gguf(tmp_path: Path) -> None:
    p = tmp_path / "x.bin"
    p.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(GGUFError, match="magic"):
        read_gguf(p)
    with pytest.raises(GGUFError):
        read_gguf(tmp_path / "missing.gguf")


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=200)
@given(st.binary(max_size=64), st.integers(0, 3000))
def test_corrupted_bytes_raise_gguf_error_only(tmp_path: Path, noise: bytes, at: int) -> None:
    base = tmp_path / "base.gguf"
    if not base.exists():
        make_gguf(base, n_vocab=20, n_embd=8)
    data = bytearray(base.read_bytes())
    at = min(at, len(data))
    data[at:at + len(noise)] = noise
    p = tmp_path / "c.gguf"
    p.write_bytes(bytes(data))
    try:
        read_gguf(p)
    except GGUFError:
        pass
