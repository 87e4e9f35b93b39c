"""catalog: the model catalog, hardware-aware selection, Hugging Face files, updates and
benchmarks on top of the store (spec/catalog.md, spec/api.md).

Imports flow one way: ``catalog`` uses ``registry_client`` and ``blobstore``; neither of
those ever imports ``catalog``. llama-cpp-python (extra ``llm``) is imported only by
``catalog.bench`` and only when a benchmark runs.
"""

from __future__ import annotations

from catalog.catalog import TIERS, Catalog, CatalogEntry, load_catalog, resolve_ref
from catalog.errors import CatalogError, MissingExtra, NothingFits
from catalog.recommend import Machine, Recommendation, fits, machine, recommend

__all__ = [
    "TIERS",
    "Catalog",
    "CatalogEntry",
    "CatalogError",
    "Machine",
    "MissingExtra",
    "NothingFits",
    "Recommendation",
    "fits",
    "load_catalog",
    "machine",
    "recommend",
    "resolve_ref",
]
