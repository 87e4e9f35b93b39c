"""blobstore: an Ollama-compatible content-addressed store for model blobs.

The public API is re-exported here; see spec/store-layout.md and spec/api.md.
"""

from __future__ import annotations

from blobstore.archive import (
    ArchiveDamaged,
    ArchiveImportResult,
    ExportResult,
    export_models,
    import_archive,
)
from blobstore.caches import (
    AdoptResult,
    CacheDamaged,
    LinkEntry,
    adopt_hf_cache,
    link_models,
    prune_links,
)
from blobstore.digest import Digest
from blobstore.errors import (
    BlobctlError,
    BlobNotFound,
    CapNotMet,
    DigestMismatch,
    GGUFError,
    InsufficientSpace,
    IntegrityError,
    InvalidDigest,
    InvalidInput,
    InvalidManifest,
    InvalidName,
    InvalidSize,
    ModelNotFound,
    NotFound,
    SizeMismatch,
    StoreBusy,
    StoreDamaged,
    StoreError,
    StoreUnwritable,
)
from blobstore.importer import ImportResult, import_gguf
from blobstore.lease import Lease
from blobstore.manifest import Descriptor, Index, Manifest
from blobstore.name import ModelName
from blobstore.store import ModelEntry, ResolvedModel, Store
from blobstore.units import parse_size

__all__ = [
    "AdoptResult",
    "ArchiveDamaged",
    "ArchiveImportResult",
    "BlobNotFound",
    "BlobctlError",
    "CacheDamaged",
    "CapNotMet",
    "Descriptor",
    "Digest",
    "DigestMismatch",
    "ExportResult",
    "GGUFError",
    "ImportResult",
    "Index",
    "InsufficientSpace",
    "IntegrityError",
    "InvalidDigest",
    "InvalidInput",
    "InvalidManifest",
    "InvalidName",
    "InvalidSize",
    "Lease",
    "LinkEntry",
    "Manifest",
    "ModelEntry",
    "ModelName",
    "ModelNotFound",
    "NotFound",
    "ResolvedModel",
    "SizeMismatch",
    "Store",
    "StoreBusy",
    "StoreDamaged",
    "StoreError",
    "StoreUnwritable",
    "adopt_hf_cache",
    "export_models",
    "import_archive",
    "import_gguf",
    "link_models",
    "parse_size",
    "prune_links",
]
