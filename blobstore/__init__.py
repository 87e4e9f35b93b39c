"""blobstore: an Ollama-compatible content-addressed store for model blobs.

The public API is re-exported here; see spec/store-layout.md and spec/api.md.
"""

from __future__ import annotations

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
    ModelPinned,
    NotFound,
    SizeMismatch,
    StateUnreadable,
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
    "BlobNotFound",
    "BlobctlError",
    "CapNotMet",
    "Descriptor",
    "Digest",
    "DigestMismatch",
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
    "Manifest",
    "ModelEntry",
    "ModelName",
    "ModelNotFound",
    "ModelPinned",
    "NotFound",
    "ResolvedModel",
    "SizeMismatch",
    "StateUnreadable",
    "Store",
    "StoreBusy",
    "StoreDamaged",
    "StoreError",
    "StoreUnwritable",
    "import_gguf",
    "parse_size",
]
