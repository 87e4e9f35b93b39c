"""blobstore: an Ollama-compatible content-addressed store for model blobs.

The public API is re-exported here; see spec/store-layout.md and spec/api.md.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

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
    InvalidOption,
    InvalidSize,
    ModelNotFound,
    ModelPinned,
    NotFound,
    SizeMismatch,
    StateUnreadable,
    StoreBusy,
    StoreDamaged,
    StoreError,
    StoreUnreadable,
    StoreUnwritable,
)
from blobstore.importer import ImportResult, import_gguf
from blobstore.lease import Lease
from blobstore.manifest import Descriptor, Index, Manifest
from blobstore.name import ModelName
from blobstore.store import ModelEntry, ResolvedModel, Store
from blobstore.units import parse_size

if TYPE_CHECKING:
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
        adopt_hf_cache,
    )
    from blobstore.linkfarm import LinkEntry, link_models, prune_links

# Moving models (archives, HF caches, link farms) is loaded on first use: commands that
# do not move models do not pay for importing it.
_LAZY = {
    "ArchiveDamaged": "blobstore.archive", "ArchiveImportResult": "blobstore.archive",
    "ExportResult": "blobstore.archive", "export_models": "blobstore.archive",
    "import_archive": "blobstore.archive", "AdoptResult": "blobstore.caches",
    "CacheDamaged": "blobstore.caches", "LinkEntry": "blobstore.linkfarm",
    "adopt_hf_cache": "blobstore.caches", "link_models": "blobstore.linkfarm",
    "prune_links": "blobstore.linkfarm",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'blobstore' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

# A library logs; its host decides what reaches stderr. Without a handler of its own the
# "blobctl" loggers' warnings went to Python's last-resort handler, i.e. the host's stderr
# (found from outside: spec/api.md says nothing prints). The CLI configures its own.
logging.getLogger("blobctl").addHandler(logging.NullHandler())

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
    "InvalidOption",
    "InvalidSize",
    "Lease",
    "LinkEntry",
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
    "StoreUnreadable",
    "StoreUnwritable",
    "adopt_hf_cache",
    "export_models",
    "import_archive",
    "import_gguf",
    "link_models",
    "parse_size",
    "prune_links",
]
