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


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=40,
          deadline=None)
@given(types=st.lists(st.sampled_from(sorted(t.value for t in __import__(
           "gguf").GGML_QUANT_SIZES if t.value in (0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14,
                                                   15, 16, 17, 18, 19, 20, 21, 22, 23, 24,
                                                   25, 26, 27, 28, 29, 34, 35, 39))),
                      min_size=1, max_size=4),
       rows=st.integers(1, 3), alignment=st.sampled_from([None, 32, 64, 256]),
       cut=st.floats(0.0, 1.0, exclude_max=True))
def test_a_file_cut_anywhere_in_its_tensor_data_is_refused(
        tmp_path: Path, types: list[int], rows: int, alignment: int | None,
        cut: float) -> None:
    """Tensors of any ggml type, written by the reference writer: the whole file reads,
    and a file cut short anywhere in its tensor data (an interrupted download or copy) is
    refused, not imported as a model llama.cpp cannot load (found from outside). The
    sizes per type are checked against the gguf package's own table this way."""
    import gguf
    import numpy as np

    p = tmp_path / "q.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    plain = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32,
             27: np.int64, 28: np.float64}
    for i, t in enumerate(types):
        qtype = gguf.GGMLQuantizationType(t)
        block, _ = gguf.GGML_QUANT_SIZES[qtype]
        shape = (rows, block * 2)
        if t in plain:  # (the writer takes the type from the array)
            w.add_tensor(f"t{i}", np.zeros(shape, dtype=plain[t]))
            continue
        byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
        w.add_tensor(f"t{i}", np.zeros(byte_shape, dtype=np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = p.read_bytes()
    assert read_gguf(p).tensor_count == len(types)
    # where the reference reader puts the tensor data: cuts before its end are refused,
    # cuts in the padding after it are not
    tensors = gguf.GGUFReader(str(p)).tensors
    start = min(t.data_offset for t in tensors)
    end = max(t.data_offset + t.n_bytes for t in tensors)
    at = start + int(cut * (end - start))
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:at])
    with pytest.raises(GGUFError, match="truncated"):
        read_gguf(bad)
    bad.write_bytes(data[:end - 1])  # one byte short
    with pytest.raises(GGUFError, match="truncated"):
        read_gguf(bad)
    bad.write_bytes(data[:end])
    assert read_gguf(bad).tensor_count == len(types)
