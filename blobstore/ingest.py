"""Writing a blob: hash while writing, verify, then commit with one rename.

:class:`BlobWriter` streams bytes into a temp file in the store's ingest area and feeds
the same bytes to the hasher, so the digest is known when the last byte lands and a
commit never reads the data back. ``commit()``:

1. flushes and fsyncs the temp file;
2. checks size and digest against what was expected (if anything was), and on a
   mismatch deletes the temp file and raises: a wrong blob never gets a digest name;
3. makes the file read-only and ``os.replace``-s it to ``blobs/<alg>-<hex>``;
4. fsyncs ``blobs/``.

Temp names are unique per writer (pid + random), so two processes writing the same
blob never share a file; whichever renames last wins with identical bytes. This holds
even where file locks do not work.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from blobstore.digest import DEFAULT_ALGORITHM, Digest, Hasher, new_hasher
from blobstore.errors import DigestMismatch, InsufficientSpace, SizeMismatch, StoreUnwritable
from blobstore.layout import Layout, fsync_dir
from blobstore.lease import Lease

__all__ = ["CHUNK", "BlobWriter", "check_free_space", "hash_file"]

CHUNK = 1 << 20


def check_free_space(path: Path, needed: int, *, reserve: int = 64 << 20) -> None:
    """Raise InsufficientSpace unless ``needed`` bytes (+ a small reserve) fit at ``path``."""
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return
    if needed + reserve > free:
        raise InsufficientSpace(str(path), needed + reserve - free, free)


def hash_file(path: Path, algorithm: str = DEFAULT_ALGORITHM) -> tuple[Digest, int]:
    """Digest and size of a file, read once in 1 MiB chunks."""
    h = new_hasher(algorithm)
    size = 0
    with open(path, "rb") as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return Digest(algorithm, h.hexdigest()), size


class BlobWriter:
    """A blob being written. Use as a context manager: an exception aborts it."""

    def __init__(
        self,
        layout: Layout,
        *,
        expected: Digest | None = None,
        expected_size: int | None = None,
        algorithm: str | None = None,
        source: str | None = None,
        lease: Lease | None = None,
    ) -> None:
        self.layout = layout
        self.lease = lease
        self.expected = expected
        self.expected_size = expected_size
        self.algorithm = expected.algorithm if expected else (algorithm or DEFAULT_ALGORITHM)
        self.source = source
        self._hasher: Hasher = new_hasher(self.algorithm)
        self.size = 0
        try:
            layout.ingest.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnwritable(str(layout.root), exc.strerror or str(exc)) from exc
        if expected_size:  # before the temp file exists: a refusal leaves nothing behind
            check_free_space(layout.ingest, expected_size)
        try:
            fd, tmp = tempfile.mkstemp(
                dir=layout.ingest, prefix=f"put-{os.getpid()}-", suffix=".tmp"
            )
        except OSError as exc:
            raise StoreUnwritable(str(layout.root), exc.strerror or str(exc)) from exc
        self.tmp_path = Path(tmp)
        self._file: BinaryIO | None = os.fdopen(fd, "wb")

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert self._file is not None, "writer is closed"
        self._file.write(data)
        self._hasher.update(data)
        self.size += len(data)
        if self.expected_size is not None and self.size > self.expected_size:
            digest = str(self.expected) if self.expected else "blob"
            self.abort()
            raise SizeMismatch(digest, self.expected_size, self.size, source=self.source)

    def copy_from(self, stream: BinaryIO,
                  progress: Callable[[int], None] | None = None) -> None:
        """Copy a whole stream in; ``progress(bytes_so_far)`` after each MiB."""
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := stream.readinto(buf):  # type: ignore[attr-defined]
            self.write(view[:n])
            if progress is not None:
                progress(self.size)

    def commit(self) -> Digest:
        """Verify and move into ``blobs/``; return the digest. Idempotent per content."""
        assert self._file is not None, "writer is closed"
        f, self._file = self._file, None
        try:
            f.flush()
            os.fsync(f.fileno())
        finally:
            f.close()
        actual = Digest(self.algorithm, self._hasher.hexdigest())
        try:
            if self.expected_size is not None and self.size != self.expected_size:
                raise SizeMismatch(
                    str(self.expected or actual), self.expected_size, self.size,
                    source=self.source,
                )
            if self.expected is not None and actual != self.expected:
                raise DigestMismatch(str(self.expected), str(actual), source=self.source)
            if self.lease is not None:
                self.lease.add(digests={actual})  # GC keeps it from before it has a name
            os.chmod(self.tmp_path, 0o444)
            self.layout.blobs.mkdir(parents=True, exist_ok=True)
            os.replace(self.tmp_path, self.layout.blob(actual))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp_path)
            raise
        fsync_dir(self.layout.blobs)
        return actual

    def abort(self) -> None:
        """Drop the temp file (safe to call twice)."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        with contextlib.suppress(OSError):
            os.unlink(self.tmp_path)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None or self._file is not None:
            self.abort()
