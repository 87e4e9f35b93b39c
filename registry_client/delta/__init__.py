"""Delta updates: chunk indexes of large blobs and pulls that fetch only what changed
(spec/delta.md).

``chunking`` cuts a blob into content-defined chunks (FastCDC) and hashes them (blake3),
``index`` is the versioned wire format and the local cache, ``artifact`` stores and finds
indexes in a registry (OCI referrers API or the referrers tag schema), ``plan`` compares
indexes, decides and seeds the new blob's ingest, ``local`` ties them to a store.
"""

from __future__ import annotations

from registry_client.delta.artifact import ARTIFACT_TYPE, find_indexes, push_indexes
from registry_client.delta.chunking import CHUNKER, chunk_bytes, chunk_file
from registry_client.delta.index import MEDIA_TYPE, ChunkIndex, IndexCache, IndexInvalid
from registry_client.delta.local import local_index, plan_blobs
from registry_client.delta.plan import MIN_BLOB, MIN_FRACTION, DeltaPlan, compare, worth_it

__all__ = ["ARTIFACT_TYPE", "CHUNKER", "MEDIA_TYPE", "MIN_BLOB", "MIN_FRACTION", "ChunkIndex",
           "DeltaPlan", "IndexCache", "IndexInvalid", "chunk_bytes", "chunk_file", "compare",
           "find_indexes", "local_index", "plan_blobs", "push_indexes", "worth_it"]
