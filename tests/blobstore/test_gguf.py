from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore.errors import GGUFError
from blobstore.gguf import MAX_DEPTH, file_type_name, is_gguf, read_gguf
from tests.helpers import make_gguf

ROOT = Path(__file__).resolve().parents[2]


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


# --- hostile headers: refused (GGUFError, exit 4) in bounded time and memory
def _s(text: str) -> bytes:
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


def _nested(depth: int) -> bytes:
    """A GGUF whose key ``x`` holds ``depth`` arrays, each the one element of the last
    (the tester's nested.gguf, 5000 deep, gave exit 1 'maximum recursion depth')."""
    body = _s("general.architecture") + struct.pack("<I", 8) + _s("llama")
    body += _s("x") + struct.pack("<I", 9)
    body += struct.pack("<IQ", 9, 1) * (depth - 1) + struct.pack("<IQ", 0, 0)
    return b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + body


@pytest.mark.timeout(30)
@pytest.mark.parametrize("depth", [9, 100, 5000, 200_000])
def test_arrays_nested_deeper_than_the_limit_are_refused(tmp_path: Path, depth: int) -> None:
    p = tmp_path / "nested.gguf"
    p.write_bytes(_nested(depth))
    with pytest.raises(GGUFError, match=f"nested more than {MAX_DEPTH} deep"):
        read_gguf(p)


def test_arrays_nested_up_to_the_limit_read(tmp_path: Path) -> None:
    p = tmp_path / "nested.gguf"
    p.write_bytes(_nested(MAX_DEPTH))
    value = read_gguf(p).metadata["x"]
    for _ in range(MAX_DEPTH - 1):
        assert isinstance(value, list) and len(value) == 1
        value = value[0]
    assert value == []


_HOSTILE = {
    # a key's length of 4 GiB (the file is that long: a sparse file)
    "huge key": struct.pack("<Q", 4 << 30),
    # a string value of 1 GiB
    "huge string": _s("k") + struct.pack("<I", 8) + struct.pack("<Q", 1 << 30),
    # 10^9 strings (of length 0: the zeros of a sparse file), 10^9 empty arrays
    "many strings": _s("k") + struct.pack("<IIQ", 9, 8, 10**9),
    "many arrays": _s("k") + struct.pack("<IIQ", 9, 9, 10**9),
    # 10^9 key/value pairs, 10^9 tensor infos
    "many keys": b"",
    "many tensors": b"",
}

_PARSE_CAPPED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # 1 GiB: a bomb fails loudly
from blobstore.errors import GGUFError
from blobstore.gguf import read_gguf
try:
    read_gguf(sys.argv[1])
except GGUFError as exc:
    print("GGUFError:", exc.reason)
else:
    print("read")
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(_HOSTILE))
def test_hostile_counts_and_lengths_are_refused_in_bounded_time_and_memory(
        tmp_path: Path, case: str) -> None:
    """Lengths and counts up to the file's size pass the size check; in an 8 GiB sparse
    file they asked for gigabytes of memory or 10^9 loop turns. Parsed in a child
    limited to 1 GiB of address space, within 20 s."""
    n_kv = 10**9 if case == "many keys" else 1
    n_tensors = 10**9 if case == "many tensors" else 0
    p = tmp_path / "hostile.gguf"
    with open(p, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + _HOSTILE[case])
        f.truncate(8 << 30)  # sparse: no disk used
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", _PARSE_CAPPED, str(p)], env=env,
                         capture_output=True, text=True, timeout=40)
    assert out.stdout.startswith("GGUFError:"), (out.stdout, out.stderr[-2000:])
    assert time.monotonic() - started < 20


_FIELD = st.one_of(
    st.integers(0, 13).map(lambda t: struct.pack("<I", t)),  # value types, valid or not
    st.integers(0, 2**32 - 1).map(lambda n: struct.pack("<I", n)),
    st.integers(0, 70).map(lambda n: struct.pack("<Q", n)),  # small counts and lengths
    st.integers(0, 2**64 - 1).map(lambda n: struct.pack("<Q", n)),
    st.binary(max_size=16),
    st.text(max_size=8).map(_s),  # a key (or string value) as written
    # a key whose value is arrays d deep
    st.integers(1, 3000).map(
        lambda d: _s("k") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * d),
)


@pytest.mark.timeout(120)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=300,
          deadline=None)
@given(version=st.sampled_from([2, 3, 3, 1, 4]),
       n_tensors=st.one_of(st.integers(0, 4), st.integers(0, 2**64 - 1)),
       n_kv=st.one_of(st.integers(0, 4), st.integers(0, 2**64 - 1)),
       fields=st.lists(_FIELD, max_size=40), pad=st.integers(0, 1 << 20))
def test_random_header_fields_read_or_raise_gguf_error(
        tmp_path: Path, version: int, n_tensors: int, n_kv: int, fields: list[bytes],
        pad: int) -> None:
    """Any header: read, or GGUFError (exit 4); never another exception, within 5 s."""
    p = tmp_path / "h.gguf"
    with open(p, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + b"".join(fields))
        f.truncate(f.tell() + pad)
    started = time.monotonic()
    try:
        read_gguf(p)
    except GGUFError:
        pass
    assert time.monotonic() - started < 5
