"""Content-defined chunking of a blob into a :class:`ChunkIndex` (spec/delta.md,
"Chunking").

FastCDC 2020 (``pyfastcdc``, Cython) with a 64 KiB target, 16 KiB minimum and 256 KiB
maximum, normalized chunking level 1 and the reference gear table: cut points depend on
the bytes only, so an insertion near the start of a file moves every later chunk's
offset but not its content, and the chunks after it match again. Each chunk is hashed
with blake3. Measured here: ~2.3-2.7 GB/s per core for the cut points, ~3.4 GB/s for
blake3 (README, "Delta updates").
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import blake3
import pyfastcdc

from blobstore.digest import Digest
from registry_client.delta.index import ChunkIndex

__all__ = ["AVG", "CHUNKER", "MAX", "MIN", "chunk_bytes", "chunk_file"]

AVG = 48 * 1024   # pyfastcdc's mean chunk is avg + min: ~64 KiB
MIN = 16 * 1024
MAX = 256 * 1024
CHUNKER = f"fastcdc2020-nc1-{AVG}-{MIN}-{MAX}"


def _cdc() -> pyfastcdc.FastCDC:
    return pyfastcdc.FastCDC(AVG, min_size=MIN, max_size=MAX, normalized_chunking=1)


def _index(digest: Digest, chunks: list[tuple[int, bytes]]) -> ChunkIndex:
    return ChunkIndex(digest, sum(n for n, _ in chunks), CHUNKER, AVG, MIN, MAX,
                      [n for n, _ in chunks], b"".join(h for _, h in chunks))


def chunk_bytes(data: bytes | bytearray | memoryview, digest: Digest) -> ChunkIndex:
    """The index of an in-memory blob."""
    out = [(c.length, blake3.blake3(c.data).digest()) for c in _cdc().cut_buf(data)]
    return _index(digest, out)


def chunk_file(path: Path, digest: Digest, *,
               keep_going: Callable[[int, bytes], bool] | None = None) -> ChunkIndex | None:
    """The index of the file at ``path`` (mmap-ed by the chunker; nothing is copied).

    ``keep_going(end_offset, chunk_hash)`` is asked after every chunk; when it answers
    False chunking stops and None is returned (the early exit of the delta decision)."""
    out: list[tuple[int, bytes]] = []
    if path.stat().st_size == 0:
        return _index(digest, out)
    for c in _cdc().cut_file(str(path)):
        h = blake3.blake3(c.data).digest()
        out.append((c.length, h))
        if keep_going is not None and not keep_going(c.offset + c.length, h):
            return None
    return _index(digest, out)
