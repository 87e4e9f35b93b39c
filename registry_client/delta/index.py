"""The chunk index of one blob, its wire format and the local cache (spec/delta.md,
"Index format").

A :class:`ChunkIndex` lists a blob's content-defined chunks in order: their lengths (they
tile the blob exactly) and the blake3 hash of each. On the wire it is ``MAGIC`` followed
by a zstandard frame holding one msgpack map (:class:`_Wire`): a format version, the
chunker and its parameters, the blob's digest and size, the lengths as little-endian
``uint32`` and the hashes as 32-byte strings, both concatenated. About 36 bytes per
64-80 KiB chunk: under 0.05 % of the blob.

An index is a *hint*. Decoding checks its shape (version, lengths tile the size, every
length within the chunker's bounds, one hash per chunk) and raises
:class:`IndexInvalid` otherwise; whether the hashes describe the blob is never trusted
(spec/delta.md, "Integrity").
"""

from __future__ import annotations

import contextlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import msgspec
import zstandard

from blobstore.decoding import decode
from blobstore.digest import Digest
from blobstore.errors import BlobctlError
from blobstore.layout import Layout, write_atomic
from blobstore.owner import make_dirs

__all__ = ["FORMAT_VERSION", "HASH_SIZE", "MAGIC", "MEDIA_TYPE", "ChunkIndex", "IndexCache",
           "IndexInvalid"]

MEDIA_TYPE = "application/vnd.blobctl.chunk-index.v1+zstd"
MAGIC = b"BCIDX\x00"
FORMAT_VERSION = 1
HASH_SIZE = 32
MAX_INDEX_BYTES = 256 << 20   # decompressed; a 1 TiB blob needs ~0.5 GiB at 64 KiB: plenty
_U32 = struct.Struct("<I")


class IndexInvalid(BlobctlError):
    """A chunk index that does not decode or whose shape is wrong (never fatal: the pull
    goes on without it)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"chunk index unusable: {reason}")
        self.reason = reason


class _Wire(msgspec.Struct, forbid_unknown_fields=False):
    v: int
    chunker: str
    avg: int
    min: int
    max: int
    hash: str
    blob: str
    size: int
    lengths: bytes
    hashes: bytes


_DEC = msgspec.msgpack.Decoder(_Wire)
_ENC = msgspec.msgpack.Encoder()


@dataclass(frozen=True)
class ChunkIndex:
    """A blob's chunks: ``lengths[i]`` bytes with blake3 ``hashes[i*32:(i+1)*32]``."""

    blob: Digest
    size: int
    chunker: str
    avg: int
    min: int
    max: int
    lengths: list[int]
    hashes: bytes

    def __len__(self) -> int:
        return len(self.lengths)

    def hash(self, i: int) -> bytes:
        return self.hashes[i * HASH_SIZE:(i + 1) * HASH_SIZE]

    def offsets(self) -> list[int]:
        """The start offset of each chunk."""
        out, pos = [], 0
        for n in self.lengths:
            out.append(pos)
            pos += n
        return out

    def encode(self) -> bytes:
        lengths = b"".join(_U32.pack(n) for n in self.lengths)
        raw = _ENC.encode(_Wire(FORMAT_VERSION, self.chunker, self.avg, self.min, self.max,
                                "blake3", str(self.blob), self.size, lengths, self.hashes))
        return MAGIC + zstandard.ZstdCompressor(level=9, write_checksum=True).compress(raw)

    @classmethod
    def decode(cls, data: bytes, *, blob: Digest | None = None,
               size: int | None = None) -> ChunkIndex:
        """Parse and check the shape; ``blob``/``size``: what the index must describe.
        Raises IndexInvalid."""
        if not data.startswith(MAGIC):
            raise IndexInvalid("not a blobctl chunk index (bad magic)")
        try:
            raw = zstandard.ZstdDecompressor().decompress(
                data[len(MAGIC):], max_output_size=MAX_INDEX_BYTES)
        except zstandard.ZstdError as exc:
            raise IndexInvalid(f"zstandard: {exc}") from exc
        try:
            w = decode(raw, _DEC)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise IndexInvalid(f"msgpack: {exc}") from exc
        if w.v != FORMAT_VERSION:
            raise IndexInvalid(f"format version {w.v} (this blobctl reads {FORMAT_VERSION})")
        if w.hash != "blake3":
            raise IndexInvalid(f"chunk hash {w.hash!r} (expected blake3)")
        try:
            digest = Digest.parse(w.blob)
        except (ValueError, BlobctlError) as exc:
            raise IndexInvalid(f"blob digest {w.blob!r}") from exc
        if blob is not None and digest != blob:
            raise IndexInvalid(f"describes {digest}, not {blob}")
        if size is not None and w.size != size:
            raise IndexInvalid(f"describes {w.size} bytes, the blob has {size}")
        if len(w.lengths) % 4:
            raise IndexInvalid("lengths field is not a whole number of uint32")
        lengths = [n for (n,) in _U32.iter_unpack(w.lengths)]
        if len(w.hashes) != HASH_SIZE * len(lengths):
            raise IndexInvalid(f"{len(lengths)} chunks but {len(w.hashes)} bytes of hashes")
        if not 0 < w.min <= w.avg <= w.max:
            raise IndexInvalid(f"chunk bounds min {w.min} avg {w.avg} max {w.max}")
        if any(n <= 0 or n > w.max for n in lengths):
            raise IndexInvalid("a chunk length is zero or above the maximum")
        if sum(lengths) != w.size:
            raise IndexInvalid(f"chunks cover {sum(lengths)} bytes, the blob has {w.size}")
        return cls(digest, w.size, w.chunker, w.avg, w.min, w.max, lengths, w.hashes)


class IndexCache:
    """Indexes of local blobs, made by this machine, in ``.blobctl/delta/<alg>-<hex>.idx``
    (keyed by blob digest: a blob never changes, so neither does its index). A cached file
    that does not decode, or describes another blob or chunker, is ignored and replaced."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.dir = layout.state_dir / "delta"

    def path(self, digest: Digest) -> Path:
        return self.dir / f"{digest.filename}.idx"

    def get(self, digest: Digest, size: int, chunker: str) -> ChunkIndex | None:
        try:
            data = self.path(digest).read_bytes()
        except OSError:
            return None
        try:
            idx = ChunkIndex.decode(data, blob=digest, size=size)
        except IndexInvalid:
            return None
        return idx if idx.chunker == chunker else None

    def put(self, index: ChunkIndex) -> None:
        """Best effort (a read-only store just does not cache)."""
        with contextlib.suppress(OSError):
            make_dirs(self.dir)
            make_dirs(self.layout.ingest)
            write_atomic(self.path(index.blob), index.encode(), self.layout.ingest)

    def drop(self, digest: Digest) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path(digest))
