"""Models for the archive, push and cache tests, written straight into a store."""

from __future__ import annotations

import json
import os

from blobstore.manifest import Manifest
from blobstore.name import ModelName
from blobstore.store import Store
from tests.servers import OCI_MANIFEST, sha

MODEL = "application/vnd.ollama.image.model"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def add_model(store: Store, ref: str, layers: list[bytes], *, oci: bool = True,
              config: bytes | None = None, layer_type: str = MODEL) -> Manifest:
    """A model whose manifest is compact registry JSON (OCI or Docker v2 media types)."""
    cfg = config if config is not None else json.dumps(
        {"model_format": "gguf", "ref": ref}).encode()
    store.put_bytes(cfg)
    for b in layers:
        store.put_bytes(b)
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST if oci else DOCKER_MANIFEST,
           "config": {"mediaType": OCI_CONFIG if oci else DOCKER_CONFIG, "digest": sha(cfg),
                      "size": len(cfg)},
           "layers": [{"mediaType": layer_type, "digest": sha(b), "size": len(b)}
                      for b in layers]}
    m = Manifest.decode(json.dumps(doc, separators=(",", ":")).encode())
    store.put_manifest(ModelName.parse(ref), m)
    return m


def rand(n: int) -> bytes:
    return os.urandom(n)
