"""A small reader of GGUF metadata (the published format, versions 2 and 3).

Reads the header, the key/value metadata and the tensor infos; never the tensor data.
Large arrays (token lists) are skipped, not kept. Every length is checked against the
file size, so a truncated or hostile file raises GGUFError instead of allocating
gigabytes. Little-endian files only (``GGUF`` magic), which is what llama.cpp writes.

Bounds (spec/cli.md, ``import``), far above any real model's header, so that a hostile
header is refused (GGUFError) in bounded time and memory:

* arrays nest at most ``MAX_DEPTH`` (8) deep (real GGUFs: one level, a token list);
* a key is at most 65535 bytes (the GGUF spec's bound);
* at most ``MAX_ITEMS`` (2 Mi) metadata values and tensor infos are read one by one (a
  262k-token vocabulary with its merges is under 1 Mi; long arrays of numbers are
  skipped in one step, not counted per element);
* at most ``MAX_KEPT_BYTES`` (64 MiB) of metadata strings are kept in memory.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from blobstore.errors import GGUFError

__all__ = ["FILE_TYPES", "GGUFInfo", "file_type_name", "is_gguf", "read_gguf"]

MAGIC = b"GGUF"

# llama.cpp's ``enum llama_ftype`` (general.file_type) as Ollama names them.
FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S",
    22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M",
    28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
    37: "TQ2_0", 38: "MXFP4",
}

# value type -> struct format for scalars
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_T_STRING, _T_ARRAY = 8, 9
_KEEP_ARRAY = 64  # arrays up to this length are kept; longer ones only counted
MAX_DEPTH = 8
MAX_KEY = 65535
MAX_ITEMS = 2 << 20
MAX_KEPT_BYTES = 64 << 20


def file_type_name(code: int | None) -> str:
    if code is None:
        return "unknown"
    return FILE_TYPES.get(code, f"type{code}")


@dataclass
class GGUFInfo:
    version: int
    metadata: dict[str, object] = field(default_factory=dict)
    tensor_count: int = 0
    parameter_count: int = 0

    @property
    def architecture(self) -> str:
        v = self.metadata.get("general.architecture")
        return v if isinstance(v, str) else "unknown"

    @property
    def file_type(self) -> int | None:
        v = self.metadata.get("general.file_type")
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    @property
    def kind(self) -> str:
        """``general.type`` (``model``, ``adapter``, ``mmproj``…), default ``model``."""
        v = self.metadata.get("general.type")
        return v if isinstance(v, str) else "model"

    @property
    def is_projector(self) -> bool:
        if self.kind in ("projector", "mmproj"):
            return True
        return self.architecture == "clip"

    @property
    def is_adapter(self) -> bool:
        return self.kind == "adapter"


class _Reader:
    def __init__(self, f: BinaryIO, size: int, path: str) -> None:
        self.f = f
        self.remaining = size
        self.path = path
        self.items = 0  # values and tensor infos read one by one (MAX_ITEMS)
        self.kept = 0  # string bytes kept (MAX_KEPT_BYTES)

    def take(self, n: int) -> bytes:
        if n < 0 or n > self.remaining:
            raise GGUFError(self.path, "truncated or corrupt (length past end of file)")
        data = self.f.read(n)
        if len(data) != n:
            raise GGUFError(self.path, "truncated")
        self.remaining -= n
        return data

    def skip(self, n: int) -> None:
        if n < 0 or n > self.remaining:
            raise GGUFError(self.path, "truncated or corrupt (length past end of file)")
        self.f.seek(n, os.SEEK_CUR)
        self.remaining -= n

    def tick(self) -> None:
        self.items += 1
        if self.items > MAX_ITEMS:
            raise GGUFError(self.path, f"more than {MAX_ITEMS} metadata values and tensors "
                                       f"(no model's header holds that many)")

    def u32(self) -> int:
        return int(struct.unpack("<I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack("<Q", self.take(8))[0])

    def string(self, limit: int | None = None) -> str:
        n = self.u64()
        if limit is not None and n > limit:
            raise GGUFError(self.path, f"a key of {n} bytes (at most {limit})")
        self.kept += n
        if self.kept > MAX_KEPT_BYTES:
            raise GGUFError(self.path, f"more than {MAX_KEPT_BYTES >> 20} MiB of metadata "
                                       f"strings (no model's header holds that much)")
        return self.take(n).decode("utf-8", errors="replace")

    def value(self, vtype: int, depth: int = 0, *, keep: bool = True) -> object:
        """One metadata value of type ``vtype``; with ``keep=False`` only passed over
        (None). Arrays nest at most MAX_DEPTH deep."""
        self.tick()
        fmt = _SCALARS.get(vtype)
        if fmt is not None:
            data = self.take(struct.calcsize(fmt))
            return struct.unpack(fmt, data)[0] if keep else None
        if vtype == _T_STRING:
            if keep:
                return self.string()
            self.skip(self.u64())
            return None
        if vtype == _T_ARRAY:
            if depth >= MAX_DEPTH:
                raise GGUFError(self.path, f"metadata arrays nested more than {MAX_DEPTH} "
                                           f"deep")
            etype, count = self.u32(), self.u64()
            if count > self.remaining:
                raise GGUFError(self.path, "array longer than the file")
            if keep and count <= _KEEP_ARRAY:
                return [self.value(etype, depth + 1) for _ in range(count)]
            efmt = _SCALARS.get(etype)
            if efmt is not None:
                self.skip(count * struct.calcsize(efmt))
            else:
                for _ in range(count):
                    self.value(etype, depth + 1, keep=False)
            return count if keep else None  # long arrays are summarised by their length
        raise GGUFError(self.path, f"unknown metadata value type {vtype}")


# ggml tensor types: (elements per block, bytes per block) (ggml's type traits, as the
# gguf package's GGML_QUANT_SIZES lists them); a type not here is not size-checked
_TYPE_SIZES: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    9: (32, 40), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176),
    14: (256, 210), 15: (256, 292), 16: (256, 66), 17: (256, 74), 18: (256, 98),
    19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82), 23: (256, 136),
    24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2),
    34: (256, 54), 35: (256, 66), 39: (32, 17),
}
_DEFAULT_ALIGNMENT = 32


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def read_gguf(path: Path) -> GGUFInfo:
    """Read a GGUF file's metadata and tensor shapes; raise GGUFError if it is not one."""
    spath = str(path)
    try:
        size = os.path.getsize(path)
        f = open(path, "rb")  # noqa: SIM115
    except OSError as exc:
        raise GGUFError(spath, exc.strerror or str(exc)) from exc
    with f:
        r = _Reader(f, size, spath)
        magic = r.take(4) if size >= 4 else b""
        if magic != MAGIC:
            raise GGUFError(spath, "missing GGUF magic")
        version = r.u32()
        if version not in (2, 3):
            raise GGUFError(spath, f"unsupported GGUF version {version}")
        n_tensors, n_kv = r.u64(), r.u64()
        if n_tensors > size or n_kv > size:
            raise GGUFError(spath, "corrupt header counts")
        info = GGUFInfo(version=version, tensor_count=n_tensors)
        for _ in range(n_kv):
            r.tick()
            key = r.string(limit=MAX_KEY)
            info.metadata[key] = r.value(r.u32())
        params = 0
        extent = 0  # bytes of tensor data the header describes, from the data section
        for _ in range(n_tensors):
            r.tick()
            r.skip(r.u64())  # tensor name
            n_dims = r.u32()
            if n_dims > 8:
                raise GGUFError(spath, f"tensor with {n_dims} dimensions")
            count = 1
            for _ in range(n_dims):
                count *= r.u64()
            ggml_type = r.u32()
            offset = r.u64()
            block = _TYPE_SIZES.get(ggml_type)
            nbytes = count // block[0] * block[1] if block is not None else 0
            extent = max(extent, offset + nbytes)
            params += count
        info.parameter_count = params
        # A file cut short (an interrupted download or copy) still has its whole header:
        # its tensor data must fit in the file, or llama.cpp cannot load it
        align = info.metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or isinstance(align, bool) or align <= 0:
            align = _DEFAULT_ALIGNMENT
        data_start = -(-(size - r.remaining) // align) * align
        if n_tensors and data_start + extent > size:
            raise GGUFError(spath, f"truncated: its tensor data ends at byte "
                                   f"{data_start + extent}, the file has {size} bytes")
        return info
