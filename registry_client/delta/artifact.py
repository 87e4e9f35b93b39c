"""Chunk indexes as OCI artifacts that refer to a model's manifest (spec/delta.md,
"Storage and discovery").

One artifact manifest per model manifest: an OCI image manifest with ``artifactType``
:data:`MEDIA_TYPE`, the empty config, one layer per indexed blob (media type
:data:`MEDIA_TYPE`, annotation :data:`ANNOTATION_BLOB` = the digest of the blob it
indexes) and ``subject`` = the model manifest's descriptor. It is found through the OCI
1.1 referrers API (``GET /v2/<repo>/referrers/<digest>``) or, on registries without it,
the referrers tag schema: tag ``sha256-<hex>`` holding an OCI image index whose entries
are the referring manifests (OCI distribution-spec 1.1, "Referrers Tag Schema").
"""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx

from blobstore.decoding import loads
from blobstore.digest import Digest
from blobstore.errors import BlobctlError
from blobstore.manifest import MAX_MANIFEST_SIZE, OCI_INDEX, OCI_MANIFEST, Manifest
from blobstore.name import ModelName
from registry_client.client import RegistryClient
from registry_client.client import safe_url as _safe
from registry_client.delta.index import MEDIA_TYPE, ChunkIndex, IndexInvalid
from registry_client.errors import ProtocolError, RegistryError, RemoteNotFound

__all__ = ["ANNOTATION_BLOB", "ARTIFACT_TYPE", "artifact_manifest", "find_indexes",
           "push_index_blobs", "push_indexes", "referrers", "require_subject", "tag_for"]

log = logging.getLogger("blobctl.delta")

ARTIFACT_TYPE = MEDIA_TYPE
ANNOTATION_BLOB = "org.blobctl.chunk-index.blob"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY = b"{}"
MAX_INDEX_BLOB = 64 << 20


def tag_for(digest: Digest) -> str:
    """The referrers tag schema's tag for ``digest``: ``<alg>-<hex>``."""
    return f"{digest.algorithm}-{digest.hex}"


def _json(raw: bytes) -> dict[str, Any] | None:
    try:
        doc = loads(raw)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def referrers(client: RegistryClient, name: ModelName, subject: Digest) -> list[dict[str, Any]]:
    """Descriptors of the manifests that refer to ``subject`` (referrers API, else the
    tag schema); [] when there are none."""
    base = client.base_url(name)
    url = f"{base}/v2/{name.repository}/referrers/{subject}"
    try:
        resp, raw = client.fetch("GET", url, scope=client.scope(name),
                                 what=f"referrers of {subject.short}",
                                 headers={"Accept": OCI_INDEX}, attempts=2,
                                 limit=MAX_MANIFEST_SIZE)
    except RemoteNotFound:
        resp = None
    except RegistryError as exc:
        if exc.status not in (400, 405, 406):
            raise
        resp = None
    if resp is not None:
        doc = _json(raw)
        ctype = resp.headers.get("content-type", "").split(";")[0].strip()
        if doc is not None and isinstance(doc.get("manifests"), list) and ctype == OCI_INDEX:
            return [m for m in doc["manifests"] if isinstance(m, dict)]
    try:  # the referrers tag schema
        raw, _ = client.get_manifest(name, tag_for(subject))
    except RemoteNotFound:
        return []
    doc = _json(raw)
    if doc is None or not isinstance(doc.get("manifests"), list):
        return []
    return [m for m in doc["manifests"] if isinstance(m, dict)]


def _fetch_small(client: RegistryClient, name: ModelName, digest: Digest, size: int) -> bytes:
    if size > MAX_INDEX_BLOB:
        raise IndexInvalid(f"index blob of {size} bytes is larger than {MAX_INDEX_BLOB}")
    with client.open_blob(name, digest) as resp:
        chunks, got = [], 0
        try:
            for block in resp.iter_bytes():
                got += len(block)
                if got > size:
                    raise IndexInvalid("index blob longer than its descriptor")
                chunks.append(block)
        except httpx.HTTPError as exc:
            raise IndexInvalid(f"reading the index blob: {exc}") from exc
    data = b"".join(chunks)
    if Digest.of_bytes(data, digest.algorithm) != digest:
        raise IndexInvalid(f"index blob {digest.short} does not match its digest")
    return data


def find_indexes(client: RegistryClient, name: ModelName, manifest: Manifest,
                 wanted: dict[Digest, int]) -> dict[Digest, ChunkIndex]:
    """The chunk indexes the registry holds for ``manifest``'s blobs in ``wanted`` (digest
    → size). Never raises for a missing, broken or lying artifact: what is unusable is
    logged and left out (the pull then fetches those blobs whole)."""
    found: dict[Digest, ChunkIndex] = {}
    try:
        refs = referrers(client, name, manifest.digest)
    except BlobctlError as exc:
        log.info("no chunk indexes for %s: %s", name, exc)
        return found
    for ref in refs:
        if ref.get("artifactType", ARTIFACT_TYPE) != ARTIFACT_TYPE:
            continue
        try:
            digest = Digest.parse(str(ref.get("digest")))
            raw, _ = client.get_manifest(name, str(digest))
            if Digest.of_bytes(raw, digest.algorithm) != digest:
                raise IndexInvalid(f"artifact manifest {digest.short} does not match its "
                                   "digest")
            doc = _json(raw) or {}
            subject = doc.get("subject") or {}
            if doc.get("artifactType") != ARTIFACT_TYPE or \
                    subject.get("digest") != str(manifest.digest):
                continue
            for layer in doc.get("layers") or []:
                target = (layer.get("annotations") or {}).get(ANNOTATION_BLOB)
                if layer.get("mediaType") != MEDIA_TYPE or target is None:
                    continue
                blob = Digest.parse(target)
                if blob not in wanted or blob in found:
                    continue
                data = _fetch_small(client, name, Digest.parse(str(layer.get("digest"))),
                                    int(layer.get("size", -1)))
                found[blob] = ChunkIndex.decode(data, blob=blob, size=wanted[blob])
        except (BlobctlError, ValueError, TypeError, AttributeError) as exc:
            log.warning("ignoring a chunk index of %s: %s", name, exc)
    return found


# ---------------------------------------------------------------------------- push
def artifact_manifest(subject: Manifest, blobs: list[tuple[Digest, Digest, int]]) -> bytes:
    """The artifact manifest's bytes (``blobs``: the indexed blob, and digest and size of
    its index's encoding)."""
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": EMPTY_TYPE, "digest": str(Digest.of_bytes(EMPTY)),
                   "size": len(EMPTY)},
        "layers": [{"mediaType": MEDIA_TYPE, "digest": str(d), "size": n,
                    "annotations": {ANNOTATION_BLOB: str(blob)}}
                   for blob, d, n in blobs],
        "subject": {"mediaType": subject.media_type, "digest": str(subject.digest),
                    "size": len(subject.raw)},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def _upload(client: RegistryClient, name: ModelName, scope: str, data: bytes) -> Digest:
    digest = Digest.of_bytes(data)
    base = f"{client.base_url(name)}/v2/{name.repository}"
    try:
        client.request("HEAD", f"{base}/blobs/{digest}", scope=scope,
                       what=f"blob {digest.short}").close()
        return digest
    except RemoteNotFound:
        pass
    resp = client.request("POST", f"{base}/blobs/uploads/", scope=scope,
                          what=f"upload of blob {digest.short}",
                          headers={"Content-Length": "0"})
    resp.close()
    loc = resp.headers.get("location")
    if resp.status_code != 202 or not loc:
        raise ProtocolError(f"starting an upload answered {resp.status_code}",
                            url=_safe(resp.request.url))
    target = str(resp.request.url.join(loc).copy_merge_params({"digest": str(digest)}))
    resp = client.request("PUT", target, scope=scope, what=f"upload of blob {digest.short}",
                          headers={"Content-Type": "application/octet-stream",
                                   "Content-Length": str(len(data))}, body=lambda: data)
    resp.close()
    if resp.status_code not in (201, 204):
        raise ProtocolError(f"finishing an upload answered {resp.status_code}",
                            url=_safe(resp.request.url))
    return digest


def _put_manifest(client: RegistryClient, name: ModelName, scope: str, reference: str,
                  raw: bytes, media_type: str) -> httpx.Response:
    url = f"{client.base_url(name)}/v2/{name.repository}/manifests/{reference}"
    resp = client.request("PUT", url, scope=scope, what=f"manifest {reference}",
                          headers={"Content-Type": media_type,
                                   "Content-Length": str(len(raw))}, body=lambda: raw)
    resp.close()
    return resp


def require_subject(client: RegistryClient, dest: ModelName, subject: Manifest) -> None:
    """Check that ``dest``'s tag holds ``subject`` (or an image index that lists it), so
    that indexes attached there describe the model found under that name. Raises
    :class:`RemoteNotFound` (its ``message`` says which case) when the tag does not exist
    or holds another manifest; sends only ``GET`` requests."""
    try:
        raw, _ = client.get_manifest(dest, dest.tag)
    except RemoteNotFound as exc:
        exc.message = (f"{dest} not found in the registry (the tag must hold manifest "
                       f"{subject.digest.short})")
        raise
    held = Digest.of_bytes(raw, subject.digest.algorithm)
    if held == subject.digest:
        return
    listed = (_json(raw) or {}).get("manifests")
    if isinstance(listed, list) and any(isinstance(m, dict)
                                        and m.get("digest") == str(subject.digest)
                                        for m in listed):
        return  # a multi-platform model's index with this platform's manifest in it
    other = RemoteNotFound(f"manifest {subject.digest.short}",
                           url=_safe(client.manifest_url(dest, dest.tag)))
    other.message = (f"{dest} holds another manifest ({held.short}), not "
                     f"{subject.digest.short}: no chunk index attached")
    raise other


def push_indexes(client: RegistryClient, dest: ModelName, subject: Manifest,
                 indexes: list[ChunkIndex]) -> Digest:
    """:func:`push_index_blobs` of the indexes' encodings."""
    return push_index_blobs(client, dest, subject, [(i.blob, i.encode()) for i in indexes])


def push_index_blobs(client: RegistryClient, dest: ModelName, subject: Manifest,
                     encoded: list[tuple[Digest, bytes]]) -> Digest:
    """Upload the indexes and their artifact manifest to ``dest``'s repository (the model
    manifest should be there already) and make it findable: through the referrers API
    when the registry answers the manifest with ``OCI-Subject``, else by adding it to the
    referrers tag ``sha256-<hex>`` (replacing earlier chunk-index entries). Returns the
    artifact manifest's digest."""
    scope = f"repository:{dest.repository}:pull,push"
    _upload(client, dest, scope, EMPTY)
    blobs = [(blob, _upload(client, dest, scope, data), len(data)) for blob, data in encoded]
    raw = artifact_manifest(subject, blobs)
    digest = Digest.of_bytes(raw)
    resp = _put_manifest(client, dest, scope, str(digest), raw, OCI_MANIFEST)
    if resp.headers.get("oci-subject"):
        return digest  # an OCI 1.1 registry: its referrers API lists it
    entries: list[dict[str, Any]] = []
    try:
        old, _ = client.get_manifest(dest, tag_for(subject.digest))
        doc = _json(old) or {}
        entries = [m for m in doc.get("manifests") or [] if isinstance(m, dict)
                   and m.get("artifactType") != ARTIFACT_TYPE and m.get("digest") != str(digest)]
    except RemoteNotFound:
        pass
    entries.append({"mediaType": OCI_MANIFEST, "digest": str(digest), "size": len(raw),
                    "artifactType": ARTIFACT_TYPE})
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries},
                       separators=(",", ":")).encode()
    _put_manifest(client, dest, scope, tag_for(subject.digest), index, OCI_INDEX)
    return digest
