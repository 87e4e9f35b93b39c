"""A small OCI 1.1 registry for tests (in memory, Starlette under uvicorn): blobs with
``Range``, monolithic uploads, manifests by tag and digest, and the referrers API
(``GET /v2/<name>/referrers/<digest>``, ``OCI-Subject`` on a manifest PUT with a
``subject``), which the Debian docker-registry lacks."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

OCI_INDEX = "application/vnd.oci.image.index.v1+json"


@dataclass
class Oci11:
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # digest -> raw, type
    tags: dict[tuple[str, str], str] = field(default_factory=dict)         # (repo, tag) -> digest
    referrers: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    uploads: dict[str, bytes] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{path:path}", self.handle,
                                       methods=["GET", "HEAD", "PUT", "POST", "PATCH"])])

    async def handle(self, req: Request) -> Response:
        path = "/" + req.path_params["path"]
        self.requests.append(f"{req.method} {path}")
        if path in ("/v2", "/v2/"):
            return Response(b"{}", media_type="application/json")
        if m := re.fullmatch(r"/upload/(\w+)", path):
            body = await req.body()
            data = self.uploads.pop(m.group(1), b"") + body
            digest = req.query_params["digest"]
            if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
                return Response(status_code=400)
            self.blobs[digest] = data
            return Response(status_code=201, headers={"Docker-Content-Digest": digest})
        m = re.fullmatch(r"/v2/(.+)/(blobs|manifests|referrers)/(.*)", path)
        if m is None:
            return Response(status_code=404)
        repo, kind, ref = m.groups()
        if kind == "blobs" and ref == "uploads/" and req.method == "POST":
            uid = secrets.token_hex(8)
            self.uploads[uid] = b""
            return Response(status_code=202, headers={"Location": f"/upload/{uid}"})
        if kind == "blobs":
            return self._blob(req, ref)
        if kind == "manifests":
            return await self._manifest(req, repo, ref)
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX,
                 "manifests": self.referrers.get(ref, [])}
        return Response(json.dumps(index).encode(), media_type=OCI_INDEX)

    def _blob(self, req: Request, digest: str) -> Response:
        data = self.blobs.get(digest)
        if data is None:
            return Response(status_code=404)
        headers = {"Docker-Content-Digest": digest, "Accept-Ranges": "bytes"}
        rng = req.headers.get("range")
        if rng and (m := re.fullmatch(r"bytes=(\d+)-(\d+)", rng)):
            a, b = int(m.group(1)), min(int(m.group(2)), len(data) - 1)
            headers["Content-Range"] = f"bytes {a}-{b}/{len(data)}"
            body = b"" if req.method == "HEAD" else data[a:b + 1]
            return Response(body, status_code=206, headers=headers,
                            media_type="application/octet-stream")
        if req.method == "HEAD":
            headers["Content-Length"] = str(len(data))
            return Response(status_code=200, headers=headers)
        return Response(data, headers=headers, media_type="application/octet-stream")

    async def _manifest(self, req: Request, repo: str, ref: str) -> Response:
        if req.method == "PUT":
            raw = await req.body()
            digest = "sha256:" + hashlib.sha256(raw).hexdigest()
            ctype = req.headers.get("content-type", "")
            self.manifests[digest] = (raw, ctype)
            if not ref.startswith("sha256:"):
                self.tags[(repo, ref)] = digest
            headers = {"Docker-Content-Digest": digest}
            doc = json.loads(raw)
            if isinstance(doc.get("subject"), dict):
                entry = {"mediaType": ctype, "digest": digest, "size": len(raw)}
                if doc.get("artifactType"):
                    entry["artifactType"] = doc["artifactType"]
                self.referrers.setdefault(doc["subject"]["digest"], []).append(entry)
                headers["OCI-Subject"] = doc["subject"]["digest"]
            return Response(status_code=201, headers=headers)
        digest = ref if ref.startswith("sha256:") else self.tags.get((repo, ref))
        if digest is None or digest not in self.manifests:
            return Response(status_code=404)
        raw, ctype = self.manifests[digest]
        headers = {"Docker-Content-Digest": digest}
        if req.method == "HEAD":
            headers["Content-Length"] = str(len(raw))
            return Response(status_code=200, headers=headers, media_type=ctype)
        return Response(raw, headers=headers, media_type=ctype)
