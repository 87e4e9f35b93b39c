"""Models as OCI image layouts: folder, ``.tar`` or ``.tar.zst`` (spec/archive.md).

Export writes ``oci-layout``, ``blobs/<alg>/<hex>`` (each blob once, manifests
included, bytes unchanged) and ``index.json`` with one descriptor per model: the
manifest's own media type, digest and size, and the annotation
``org.opencontainers.image.ref.name`` = the full name ``host/ns/repo:tag``. blobctl
adds ``index.json.sha256`` (the digest of ``index.json``), so that a damaged index is
refused like any damaged blob. Archives are written streaming (memory flat in model
size) to a temp name next to the target and renamed into place when complete; a FIFO,
a character device or a file descriptor is streamed into instead, and nothing but a
regular file is ever replaced (symlinks are followed).

Import (:func:`import_archive`) takes one pass over an archive: every blob is hashed
while it is read and committed with the store's writer only when it verifies; small
members (manifests, configs) stay in memory until ``index.json`` says what they are.
Manifests are written at the end, each only when every blob it names is present and
verified. Damage to a member's data skips the models that use it; damage to the tar
structure or the zstd stream stops the import before any manifest is written. Either
way :class:`ArchiveDamaged` (an ``IntegrityError``) is raised at the end, carrying the
result of what was imported.
"""

from __future__ import annotations

from blobstore.archive.common import (
    ANNOTATION_REF_NAME,
    ArchiveDamaged,
    ArchiveImportResult,
    ExportResult,
    ImportedModel,
    SkipKind,
    SkippedEntry,
)
from blobstore.archive.export import export_models
from blobstore.archive.load import detect_archive, import_archive

__all__ = [
    "ANNOTATION_REF_NAME",
    "ArchiveDamaged",
    "ArchiveImportResult",
    "ExportResult",
    "ImportedModel",
    "SkipKind",
    "SkippedEntry",
    "detect_archive",
    "export_models",
    "import_archive",
]
