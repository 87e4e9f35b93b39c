"""Names, results and errors shared by archive export and import (spec/archive.md)."""

from __future__ import annotations

import contextlib
import logging
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec

from blobstore.digest import Digest
from blobstore.errors import IntegrityError, StoreUnwritable
from blobstore.layout import Layout
from blobstore.lease import Lease
from blobstore.name import ModelName

__all__ = [
    "ANNOTATION_REF_NAME",
    "ArchiveDamaged",
    "ArchiveImportResult",
    "CHUNK",
    "ExportResult",
    "INDEX_CHECK",
    "INDEX_DEC",
    "ImportedModel",
    "IndexDesc",
    "IndexDoc",
    "OCI_LAYOUT",
    "Progress",
    "SMALL",
    "SMALL_BUDGET",
    "SkipKind",
    "SkippedEntry",
    "ZSTD_MAGIC",
    "emit",
    "file_kind",
    "reader_lease",
]

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
OCI_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
INDEX_CHECK = "index.json.sha256"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
SMALL = 4 << 20              # members up to this size wait in memory for index.json
SMALL_BUDGET = 256 << 20     # ... up to this many bytes in all
CHUNK = 1 << 20

Progress = Callable[[dict[str, Any]], None]


class ArchiveDamaged(IntegrityError):
    """An archive (or the models in it) failed verification; ``result`` says what was
    imported anyway (models whose every blob verified)."""

    def __init__(self, message: str, result: ArchiveImportResult | None = None) -> None:
        super().__init__(message, hint="the archive was changed or truncated; copy it again")
        self.result = result


@dataclass
class ExportResult:
    path: Path | None               # None: streamed to a file descriptor
    format: str                     # "dir", "tar" or "tar.zst"
    models: list[tuple[ModelName, Digest]]
    blobs: int = 0
    bytes_in: int = 0               # blob bytes read from the store
    bytes_out: int = 0              # bytes written (compressed for tar.zst)
    seconds: float = 0.0


@dataclass
class ImportedModel:
    name: ModelName
    digest: Digest
    size: int


# Why an index entry was not imported (spec/archive.md "Names" and "Damage"). What the
# entry itself says decides the first three (it is not a model blobctl imports: exit 0,
# or 4 when nothing was imported); "damaged" is an entry that names an image manifest
# whose bytes, or a blob they name, are damaged, missing or disagree with their
# descriptor (exit 5).
SkipKind = Literal["no-name", "bad-name", "not-a-model", "damaged"]


@dataclass
class SkippedEntry:
    ref: str                        # the name in index.json (or the descriptor digest)
    reason: str
    kind: SkipKind

    @property
    def damaged(self) -> bool:
        """Refused as damage (exit 5), not skipped as something that is no model."""
        return self.kind == "damaged"


@dataclass
class ArchiveImportResult:
    format: str
    models: list[ImportedModel] = field(default_factory=list)
    skipped: list[SkippedEntry] = field(default_factory=list)
    blobs_added: int = 0
    blobs_present: int = 0
    bytes_read: int = 0
    seconds: float = 0.0


class IndexDesc(msgspec.Struct):
    mediaType: str
    digest: str
    size: int
    annotations: dict[str, str] | None = None


class IndexDoc(msgspec.Struct):
    schemaVersion: int
    manifests: list[IndexDesc]
    mediaType: str = ""


INDEX_DEC = msgspec.json.Decoder(IndexDoc)


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symlink"),
          (stat.S_ISREG, "a regular file"))


def file_kind(mode: int) -> str:
    """``st_mode`` in words for messages: "a FIFO", "a character device", ..."""
    return next((kind for test, kind in _KINDS if test(mode)), "a special file")


def emit(progress: Progress | None, **event: Any) -> None:
    if progress is not None:
        progress(event)


@contextlib.contextmanager
def reader_lease(layout: Layout, purpose: str, digests: set[Digest]) -> Iterator[None]:
    """A lease for a reader of blobs (export, push), or none on a store it cannot write
    (a system Ollama folder): reading must not need write access."""
    lease = Lease(layout, purpose, digests=set(digests))
    try:
        lease.acquire()
    except (OSError, StoreUnwritable) as exc:
        logging.getLogger("blobctl.archive").info("no lease (%s): store not writable", exc)
        yield
        return
    try:
        yield
    finally:
        lease.release()
