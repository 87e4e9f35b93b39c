"""The OCI distribution API over the store: the read side and the router
(spec/serve.md, "API"). Uploads live in ``uploads.py``.

Every route authorizes (``ctx.policy.authorize``) before it answers with data (manifest
and blob routes read the repository's manifests first, for the tier); a refusal carries the
policy's status, an OCI error body and never a byte of content. Disk work
runs in worker threads; the event loop only waits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any
from urllib.parse import quote

import anyio
import anyio.to_thread
import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from blobstore import (
    BlobctlError,
    Digest,
    InsufficientSpace,
    InvalidDigest,
    InvalidName,
    StoreBusy,
)
from blobstore.manifest import OCI_INDEX, OCI_MANIFEST, referenced_by
from registry_client.delta.artifact import ARTIFACT_TYPE
from registry_client.errors import RegistryError
from registry_server.context import TIERS, Action, OpenAccess, ServerContext
from registry_server.indexes import BuiltIndex, IndexArtifacts
from registry_server.names import (
    Repo,
    RouteMatch,
    match_route,
    parse_reference,
    parse_repo,
    tag_invalid,
    unstorable_tag,
)
from registry_server.repos import ManifestInfo, RepoIndex, manifest_facts
from registry_server.responses import (
    ZEROCOPY,
    cut_response,
    oci_error,
    os_error,
    parse_range,
    send_file_body,
)
from registry_server.streams import StreamLeases

__all__ = ["API_VERSION_HEADERS", "OCIRoutes", "routes"]

log = logging.getLogger("blobctl.serve")

API_VERSION_HEADERS = {"Docker-Distribution-API-Version": "registry/2.0"}
SUBJECT_KEY = "blobctl.subject"
MIRRORED_KEEP = 4096  # mirrored manifests whose blobs a repository remembers
ROUTED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _lowest_tier(tiers: list[str]) -> str:
    return min(tiers, key=TIERS.index) if tiers else TIERS[0]


class OCIRoutes:
    """The ``/v2/`` routes bound to one server context."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.repos = RepoIndex(ctx.store)
        self.leases = StreamLeases(ctx.store)
        self.indexes = IndexArtifacts(ctx.store, ctx.count)
        self.active_streams = 0
        # (repository key, manifest digest) -> (annotations, blobs) of mirrored manifests served
        # to an authorized caller: their blobs belong to the repository (blob_tier) before
        # the background pull stores the manifest (and a by-digest one is never stored).
        self._mirrored: OrderedDict[tuple[str, Digest],
                                    tuple[dict[str, str], frozenset[Digest]]] = OrderedDict()
        self._mirrored_lock = threading.Lock()
        from registry_server.uploads import Uploads  # the write side, same router

        self.uploads = Uploads(ctx, self)

    @property
    def open_access(self) -> bool:
        return isinstance(self.ctx.policy, OpenAccess)

    def routes(self) -> list[BaseRoute]:
        # (OPTIONS reaches dispatch, which answers 405 with the route's own Allow; other
        # methods get Starlette's 405, made an OCI error by the app's handler)
        methods = [*ROUTED_METHODS, "OPTIONS"]
        return [Route("/v2/", self.base, methods=methods),
                Route("/v2/{rest:path}", self.dispatch, methods=methods)]

    def allowed(self, m: RouteMatch) -> list[str]:
        """The methods this server answers on the route ``m`` (the ``Allow`` of a 405)."""
        push = self.ctx.options.push
        if m.kind == "manifest":
            return ["GET", "HEAD", "PUT", "DELETE"] if push else ["GET", "HEAD"]
        if m.kind == "upload":
            if not push:
                return []
            return ["POST"] if m.arg == "" else ["GET", "HEAD", "PATCH", "PUT", "DELETE"]
        return ["GET", "HEAD"]  # catalog, tags, blobs (removed by gc), referrers

    # ------------------------------------------------------------------ access
    def authorize(self, request: Request, repo: str | None, action: Action,
                  tier: str | None) -> Response | None:
        """None when allowed; otherwise the refusal (401 with the challenge, or 403)."""
        d = self.ctx.policy.authorize(request.headers, repo, action, tier)
        request.scope[SUBJECT_KEY] = d.subject
        if d.allowed:
            return None
        if d.status == 401:
            headers = {"WWW-Authenticate": d.challenge} if d.challenge else {}
            return oci_error(401, "UNAUTHORIZED", d.reason or "authentication required",
                             headers={**headers, **API_VERSION_HEADERS})
        return oci_error(d.status if d.status >= 400 else 403, "DENIED",
                         d.reason or "access denied", headers=API_VERSION_HEADERS)

    # ------------------------------------------------------------------ router
    async def base(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return oci_error(405, "UNSUPPORTED", f"{request.method} is not supported here",
                             headers={**API_VERSION_HEADERS, "Allow": "GET, HEAD"})
        denied = self.authorize(request, None, Action.READ, None)
        if denied is not None:
            return denied
        return Response(b"{}", 200, headers=API_VERSION_HEADERS, media_type="application/json")

    async def dispatch(self, request: Request) -> Response:
        rest = request.path_params["rest"]
        m = match_route(rest)
        if m is None:
            return oci_error(404, "NAME_UNKNOWN", "no such route", detail={"path": rest})
        resp = await self._dispatch(request, m)
        if isinstance(resp, Response) and resp.status_code == 405 \
                and "allow" not in resp.headers:
            resp.headers["Allow"] = ", ".join(self.allowed(m))
        return resp

    async def _dispatch(self, request: Request, m: RouteMatch) -> Response:
        method = request.method
        if method not in ROUTED_METHODS:  # OPTIONS: no route takes it, whatever the path
            return oci_error(405, "UNSUPPORTED", f"{method} is not supported here")
        if m.kind == "catalog":
            if method in ("GET", "HEAD"):
                return await self.catalog(request)
            return oci_error(405, "UNSUPPORTED", f"{method} is not supported here")
        try:
            repo = parse_repo(m.name)
        except InvalidName as exc:
            denied = self.authorize(request, None, Action.READ, None)
            return denied or oci_error(400, "NAME_INVALID", exc.message,
                                       detail={"name": m.name}, headers=API_VERSION_HEADERS)
        if m.kind == "upload":
            return await self.uploads.upload(request, repo, m.arg)
        if m.kind == "blob" and method == "POST":
            return oci_error(404, "NAME_UNKNOWN", "no such route")
        if m.kind == "manifest":
            if method in ("PUT", "DELETE"):
                return await self.uploads.manifest_write(request, repo, m.arg)
            if method in ("GET", "HEAD"):
                return await self.manifest(request, repo, m)
        if m.kind == "blob":
            if method == "DELETE":
                return await self.uploads.blob_delete(request, repo, m.arg)
            if method in ("GET", "HEAD"):
                return await self.blob(request, repo, m.arg)
        if m.kind == "tags" and method in ("GET", "HEAD"):
            return await self.tags(request, repo)
        if m.kind == "referrers" and method in ("GET", "HEAD"):
            return await self.referrers(request, repo, m.arg)
        return oci_error(405, "UNSUPPORTED", f"{method} is not supported here")

    # ------------------------------------------------------------------ manifests
    async def manifest(self, request: Request, repo: Repo, m: RouteMatch) -> Response:
        try:
            ref = parse_reference(m.arg)
        except InvalidDigest as exc:
            denied = self.authorize(request, repo.url_name, Action.READ, None)
            return denied or oci_error(400, "DIGEST_INVALID", exc.message)
        except InvalidName as exc:
            denied = self.authorize(request, repo.url_name, Action.READ, None)
            return denied or oci_error(400, "TAG_INVALID", tag_invalid(repo, m.arg, exc.reason),
                                       headers=API_VERSION_HEADERS)
        info: ManifestInfo | None = None
        if isinstance(ref, Digest):
            info = await anyio.to_thread.run_sync(self.repos.by_digest, repo, ref)
        elif unstorable_tag(repo, ref) is None:  # (a longer OCI tag is never stored)
            info = await anyio.to_thread.run_sync(self.repos.by_tag, repo, ref)
        if info is None and isinstance(ref, Digest):
            found = await anyio.to_thread.run_sync(self.derived, repo, ref, True)
            if found is not None and found[0].digest == ref:
                return self._derived_manifest(request, repo, *found)
        if info is None:
            return await self._manifest_miss(request, repo, ref)
        tier = self.ctx.policy.tier_of(repo.url_name, info.annotations)
        denied = self.authorize(request, repo.url_name, Action.READ, tier)
        if denied is not None:
            return denied
        # asked by digest: that digest (a sha512 one too), else the stored bytes' sha256
        answered = ref if isinstance(ref, Digest) else info.digest
        headers = {"Docker-Content-Digest": str(answered), **API_VERSION_HEADERS,
                   "Content-Type": info.media_type}
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(info.raw))
            return Response(b"", 200, headers=headers)
        name = repo.name(info.tag)
        with contextlib.suppress(InvalidName):
            await anyio.to_thread.run_sync(self.ctx.store.record_use, name)
        return Response(info.raw, 200, headers=headers)

    async def _manifest_miss(self, request: Request, repo: Repo, ref: str | Digest) -> Response:
        mirror = self.ctx.mirror
        # an OCI tag the store's names cannot hold is served from upstream, not stored
        unstorable = None if isinstance(ref, Digest) else unstorable_tag(repo, ref)
        name = repo.name("latest" if isinstance(ref, Digest) or unstorable else ref)
        if mirror is not None and mirror.covers(name):
            # the tier of a model not here yet comes from the pattern table only
            denied = self.authorize(request, repo.url_name, Action.READ,
                                    self.ctx.policy.tier_of(repo.url_name, None))
            if denied is not None:
                return denied
            try:
                got = await mirror.manifest(name, str(ref))
            except BlobctlError as exc:
                self.ctx.count("mirror_misses")
                return oci_error(502, "UNAVAILABLE", f"upstream: {exc.message}",
                                 headers={**API_VERSION_HEADERS, "Retry-After": "5"})
            if got is not None:
                self.ctx.count("mirror_hits")
                # the mirrored body's own annotation counts (over the table's floor)
                annotations = manifest_facts(got.body)[1]
                tier = self.ctx.policy.tier_of(repo.url_name, annotations)
                denied = self.authorize(request, repo.url_name, Action.READ, tier)
                if denied is not None:
                    return denied
                self._remember_mirrored(repo, got.digest, annotations, got.body)
                await mirror.prefetch(got)  # only now: a refused caller costs no download
                headers = {"Docker-Content-Digest": str(got.digest), **API_VERSION_HEADERS,
                           "Content-Type": got.media_type}
                if request.method == "HEAD":
                    headers["Content-Length"] = str(len(got.body))
                    return Response(b"", 200, headers=headers)
                return Response(got.body, 200, headers=headers)
            self.ctx.count("mirror_misses")
        denied = self.authorize(request, repo.url_name, Action.READ, None)
        if denied is not None:
            return denied
        return oci_error(404, "MANIFEST_UNKNOWN",
                         "manifest unknown" + (f" ({unstorable})" if unstorable else ""),
                         detail={"name": repo.url_name, "reference": str(ref)},
                         headers=API_VERSION_HEADERS)

    def _remember_mirrored(self, repo: Repo, digest: Digest, annotations: dict[str, str],
                           body: bytes) -> None:
        key = (repo.url_name.lower(), digest)
        refs = frozenset(referenced_by(body))
        with self._mirrored_lock:
            self._mirrored[key] = (annotations, refs)
            self._mirrored.move_to_end(key)
            while len(self._mirrored) > MIRRORED_KEEP:
                self._mirrored.popitem(last=False)

    # ------------------------------------------------------------------ blobs
    def blob_tier(self, repo: Repo, digest: Digest) -> tuple[bool, str | None]:
        """(referenced by a manifest of the repository, stored or mirrored and served,
        lowest tier among those)."""
        tiers = [self.ctx.policy.tier_of(repo.url_name, m.annotations)
                 for m in self.repos.referencing(repo, digest)]
        key = repo.url_name.lower()
        with self._mirrored_lock:
            anns = [a for (r, _d), (a, refs) in self._mirrored.items()
                    if r == key and digest in refs]
        tiers += [self.ctx.policy.tier_of(repo.url_name, a) for a in anns]
        if not tiers:
            return False, None
        return True, _lowest_tier(tiers)

    def blob_access(self, request: Request, repo: Repo, digest: Digest, referenced: bool,
                    tier: str | None) -> Response | None:
        """Authorize reading ``digest`` through ``repo`` (spec/serve.md, "Blobs and
        access") given its :meth:`blob_tier`: the tier is the lowest among the
        repository's manifests that reference it. A blob no manifest of the repository
        references is served only without ``--auth`` (Ollama-style dedup); with a policy
        it is unknown in that repository."""
        denied = self.authorize(request, repo.url_name, Action.READ, tier)
        if denied is not None:
            return denied
        if not referenced and not self.open_access and not self.uploads.granted(
                repo, digest, str(request.scope.get(SUBJECT_KEY) or "")):
            return oci_error(404, "BLOB_UNKNOWN", "blob unknown to this repository",
                             detail={"digest": str(digest)}, headers=API_VERSION_HEADERS)
        return None

    async def blob(self, request: Request, repo: Repo, ref: str) -> Response:
        try:
            digest = Digest.parse(ref)
        except InvalidDigest as exc:
            denied = self.authorize(request, repo.url_name, Action.READ, None)
            return denied or oci_error(400, "DIGEST_INVALID", exc.message,
                                       headers=API_VERSION_HEADERS)
        # one worker-thread hop for both lookups (each hop costs the event loop CPU)
        found, (referenced, tier) = await anyio.to_thread.run_sync(
            lambda: (self.derived(repo, digest, None), self.blob_tier(repo, digest)))
        if found is not None and found[0].digest != digest:
            return self._derived_blob(request, repo, digest, *found)
        denied = self.blob_access(request, repo, digest, referenced, tier)
        if denied is not None:
            return denied
        return BlobResponse(self, repo, digest)  # type: ignore[return-value]

    # ------------------------------------------------------------------ built indexes
    def derived(self, repo: Repo, digest: Digest,
                scan: bool | None) -> tuple[BuiltIndex, ManifestInfo] | None:
        """The built chunk-index artifact that is, or holds, ``digest`` and whose subject
        is a manifest of ``repo`` (with that manifest). Kept artifacts first; with
        ``scan`` (None: when the store has no blob ``digest``) the repository's manifests
        whose indexes the cache holds are tried too (a restarted server)."""
        for b in self.indexes.holding(digest):
            subject = self.repos.by_digest(repo, b.subject)
            if subject is not None:
                return b, subject
        if scan is None:
            scan = self.ctx.store.layout.existing_blob(digest) is None
        if not scan:
            return None
        for info in self.repos.manifests(repo):
            if info.subject is not None or self.indexes.known(info.digest) is not None:
                continue
            cached = self.indexes.from_cache(info.raw)
            if cached is not None:
                self.indexes.keep(info.digest, cached)  # each manifest is scanned once
                if cached.holds(digest):
                    return cached, info
        return None

    def _derived_access(self, request: Request, repo: Repo,
                        subject: ManifestInfo) -> Response | None:
        """A built artifact is read with its model's access: the model's tier."""
        tier = self.ctx.policy.tier_of(repo.url_name, subject.annotations)
        return self.authorize(request, repo.url_name, Action.READ, tier)

    def derived_readable(self, request: Request, repo: Repo, subject: ManifestInfo) -> bool:
        """Whether the caller may read a built artifact of ``subject`` (its model's tier)."""
        tier = self.ctx.policy.tier_of(repo.url_name, subject.annotations)
        return self.ctx.policy.authorize(request.headers, repo.url_name, Action.READ,
                                         tier).allowed

    def _derived_manifest(self, request: Request, repo: Repo, built: BuiltIndex,
                          subject: ManifestInfo) -> Response:
        denied = self._derived_access(request, repo, subject)
        if denied is not None:
            return denied
        headers = {"Docker-Content-Digest": str(built.digest), **API_VERSION_HEADERS,
                   "Content-Type": OCI_MANIFEST}
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(built.raw))
            return Response(b"", 200, headers=headers)
        return Response(built.raw, 200, headers=headers)

    def _derived_blob(self, request: Request, repo: Repo, digest: Digest, built: BuiltIndex,
                      subject: ManifestInfo) -> Response:
        denied = self._derived_access(request, repo, subject)
        if denied is not None:
            return denied
        data = built.blobs[digest]
        headers = self.blob_headers(digest)
        size = len(data)
        rng = parse_range(request.headers.get("range"), size)
        if rng == "unsatisfiable":
            return Response(b"", 416, headers={**headers, "Content-Range": f"bytes */{size}"})
        status = 200
        if isinstance(rng, tuple):
            data = data[rng[0]:rng[1] + 1]
            status = 206
            headers["Content-Range"] = f"bytes {rng[0]}-{rng[1]}/{size}"
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(data))
            return Response(b"", status, headers=headers)
        self.ctx.count("bytes_served", len(data))
        return Response(data, status, headers=headers)

    def blob_headers(self, digest: Digest) -> dict[str, str]:
        return {"Docker-Content-Digest": str(digest), "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream", **API_VERSION_HEADERS}

    # ------------------------------------------------------------------ listings
    async def tags(self, request: Request, repo: Repo) -> Response:
        denied = self.authorize(request, repo.url_name, Action.READ, None)
        if denied is not None:
            return denied
        tags = await anyio.to_thread.run_sync(self.repos.tags, repo)
        if tags is None:
            return oci_error(404, "NAME_UNKNOWN", "repository name not known to registry",
                             detail={"name": repo.url_name}, headers=API_VERSION_HEADERS)
        page, link = _paginate(tags, request, f"/v2/{repo.url_name}/tags/list")
        return _json({"name": repo.url_name, "tags": page}, link)

    async def catalog(self, request: Request) -> Response:
        denied = self.authorize(request, None, Action.READ, None)
        if denied is not None:
            return denied
        repos = await anyio.to_thread.run_sync(self.repos.repositories)
        names = [r.url_name for r in repos
                 if self.ctx.policy.visible(request.headers, r.url_name)]
        page, link = _paginate(names, request, "/v2/_catalog")
        return _json({"repositories": page}, link)

    async def referrers(self, request: Request, repo: Repo, ref: str) -> Response:
        try:
            digest = Digest.parse(ref)
        except InvalidDigest as exc:
            denied = self.authorize(request, repo.url_name, Action.READ, None)
            return denied or oci_error(400, "DIGEST_INVALID", exc.message)
        denied = self.authorize(request, repo.url_name, Action.READ, None)
        if denied is not None:
            return denied
        want = request.query_params.get("artifactType")
        infos: list[ManifestInfo] = await anyio.to_thread.run_sync(
            lambda: [m for m in self.repos.manifests(repo) if m.subject == digest])
        built = None
        if (not want or want == ARTIFACT_TYPE) and \
                not any(m.artifact_type == ARTIFACT_TYPE for m in infos):
            built = await self._built_for(request, repo, digest)
        seen: set[Digest] = set()
        entries: list[dict[str, Any]] = []
        for m in infos:
            if m.digest in seen or (want and m.artifact_type != want):
                continue
            tier = self.ctx.policy.tier_of(repo.url_name, m.annotations)
            if not self.ctx.policy.authorize(request.headers, repo.url_name, Action.READ,
                                             tier).allowed:
                continue  # never list what the caller may not read
            seen.add(m.digest)
            e: dict[str, Any] = {"mediaType": m.media_type, "digest": str(m.digest),
                                 "size": len(m.raw)}
            if m.artifact_type:
                e["artifactType"] = m.artifact_type
            if m.annotations:
                e["annotations"] = m.annotations
            entries.append(e)
        if built is not None and built.digest not in seen:
            entries.append({"mediaType": OCI_MANIFEST, "digest": str(built.digest),
                            "size": len(built.raw), "artifactType": ARTIFACT_TYPE})
        body = msgspec.json.encode({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                    "manifests": entries})
        headers = dict(API_VERSION_HEADERS)
        if want:
            headers["OCI-Filters-Applied"] = "artifactType"
        return Response(body, 200, headers=headers, media_type=OCI_INDEX)

    async def _built_for(self, request: Request, repo: Repo,
                         digest: Digest) -> BuiltIndex | None:
        """The chunk-index artifact of the repository's manifest ``digest``, built now if
        need be (spec/serve.md, "Chunk indexes"); None when the repository has no such
        manifest, the caller may not read it, it has no large layer, or the build failed."""
        subject = await anyio.to_thread.run_sync(self.repos.by_digest, repo, digest)
        if subject is None or subject.subject is not None:
            return None
        tier = self.ctx.policy.tier_of(repo.url_name, subject.annotations)
        if not self.ctx.policy.authorize(request.headers, repo.url_name, Action.READ,
                                         tier).allowed:
            return None
        return await self.indexes.for_subject(subject.digest, subject.raw)


def _json(doc: Any, link: str | None) -> Response:
    headers = dict(API_VERSION_HEADERS)
    if link:
        headers["Link"] = link
    return Response(msgspec.json.encode(doc), 200, headers=headers,
                    media_type="application/json")


def _paginate(items: list[str], request: Request, path: str) -> tuple[list[str], str | None]:
    """``n``/``last`` pagination (distribution spec): items after ``last``, at most ``n``,
    and a ``Link: <...>; rel="next"`` when more remain."""
    last = request.query_params.get("last")
    if last:
        items = [t for t in items if t > last]
    n_text = request.query_params.get("n")
    if n_text is None:
        return items, None
    try:
        n = int(n_text)
    except ValueError:
        return items, None
    if n < 0:
        return items, None
    page = items[:n]
    if len(items) > n and page:
        return page, f'<{path}?n={n}&last={quote(page[-1], safe="")}>; rel="next"'
    return page, None


class BlobResponse:
    """A blob's bytes (whole or one range) from the store, or from the mirror on a miss.

    Holds the digest's stream lease from before the file is opened until the last byte
    is sent."""

    def __init__(self, routes: OCIRoutes, repo: Repo, digest: Digest) -> None:
        self.routes = routes
        self.repo = repo
        self.digest = digest

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        r = self.routes
        head = scope["method"] == "HEAD"
        headers = r.blob_headers(self.digest)
        if head:
            size = await anyio.to_thread.run_sync(self._size)
            if size is None:
                await self._miss(scope, receive, send, head=True)
                return
            await _start(send, 200, {**headers, "Content-Length": str(size)})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        try:
            fd = await anyio.to_thread.run_sync(self._lease_open)
        except StoreBusy as exc:
            resp = oci_error(503, "UNAVAILABLE", exc.message,
                             headers={**API_VERSION_HEADERS, "Retry-After": "5"})
            await resp(scope, receive, send)
            return
        except OSError as exc:  # before the head: an OCI error, not uvicorn's bare 500
            await _open_failed(exc, self.digest)(scope, receive, send)
            return
        try:
            if fd is None:
                await self._miss(scope, receive, send, head=False)
                return
            try:
                await self._send(scope, receive, send, fd, headers)
            finally:
                os.close(fd)
        finally:
            await anyio.to_thread.run_sync(r.leases.release, self.digest)

    def _size(self) -> int | None:
        p = self.routes.ctx.store.layout.existing_blob(self.digest)
        if p is None:
            return None
        try:
            return p.stat().st_size
        except OSError:
            return None

    def _lease_open(self) -> int | None:
        """Lease the digest (raises StoreBusy), then open its blob (None: not stored;
        the lease is held either way and released by the caller)."""
        self.routes.leases.acquire(self.digest)
        try:
            return self._open()
        except BaseException:
            self.routes.leases.release(self.digest)
            raise

    def _open(self) -> int | None:
        p = self.routes.ctx.store.layout.existing_blob(self.digest)
        if p is None:
            return None
        try:
            return os.open(p, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return None

    async def _send(self, scope: Scope, receive: Receive, send: Send, fd: int,
                    headers: dict[str, str]) -> None:
        size = os.fstat(fd).st_size
        rng = parse_range(_header(scope, b"range"), size)
        if rng == "unsatisfiable":
            await _start(send, 416, {**headers, "Content-Range": f"bytes */{size}",
                                     "Content-Length": "0"})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        if rng is None:
            start, count, status = 0, size, 200
        else:
            assert isinstance(rng, tuple)
            start, count, status = rng[0], rng[1] - rng[0] + 1, 206
            headers["Content-Range"] = f"bytes {rng[0]}-{rng[1]}/{size}"
        headers["Content-Length"] = str(count)
        await _start(send, status, headers)
        r = self.routes
        r.active_streams += 1
        try:
            async with anyio.create_task_group() as tg:
                # A client that hangs up (Ollama's first GET reads only the headers) ends
                # the response: uvicorn drops body messages after a disconnect silently,
                # so without this the whole file would still be read for nobody.
                tg.start_soon(_cancel_on_disconnect, receive, tg.cancel_scope)
                await send_file_body(send, scope.get("extensions") or {}, fd, start, count,
                                     lambda n: r.ctx.count("bytes_served", n))
                tg.cancel_scope.cancel()
        finally:
            r.active_streams -= 1

    async def _miss(self, scope: Scope, receive: Receive, send: Send, *, head: bool) -> None:
        r = self.routes
        mirror = r.ctx.mirror
        name = self.repo.name("latest")
        if mirror is not None and mirror.covers(name):
            try:
                got = await mirror.blob(name, self.digest)
            except RegistryError as exc:  # the upstream is down: try again later
                resp = oci_error(502, "UNAVAILABLE", f"upstream: {exc.message}",
                                 headers={**API_VERSION_HEADERS, "Retry-After": "5"})
                await resp(scope, receive, send)
                return
            if got is not None:
                r.ctx.count("mirror_hits")
                await self._send_mirrored(scope, receive, send, head, *got)
                return
            r.ctx.count("mirror_misses")
        resp = oci_error(404, "BLOB_UNKNOWN", "blob unknown to registry",
                         detail={"digest": str(self.digest)}, headers=API_VERSION_HEADERS)
        await resp(scope, receive, send)


    async def _send_mirrored(self, scope: Scope, receive: Receive, send: Send, head: bool,
                             size: int, stream: AsyncIterator[bytes]) -> None:
        """A mirrored blob while it arrives: whole (200) or one range (206, so a ranged
        client keeps its parallel connections). An upstream failure raises out of here: the
        server cuts the connection mid-body (Content-Length unmet), never wrong bytes."""
        r = self.routes
        headers = r.blob_headers(self.digest)
        status, count = 200, size
        rng = None if head else parse_range(_header(scope, b"range"), size)
        if rng == "unsatisfiable":
            await _aclose(stream)
            await _start(send, 416, {**headers, "Content-Range": f"bytes */{size}",
                                     "Content-Length": "0"})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        narrow = getattr(stream, "narrow", None)  # a FlightStream narrows to a range
        if isinstance(rng, tuple) and narrow is not None:
            stream = narrow(rng[0], rng[1] + 1)
            status, count = 206, rng[1] - rng[0] + 1
            headers["Content-Range"] = f"bytes {rng[0]}-{rng[1]}/{size}"
        headers["Content-Length"] = str(count)
        started = getattr(stream, "started", None)  # a FlightStream: wait for its fetch
        if not head and started is not None:
            try:
                await started()
            except BlobctlError as exc:
                # failed before its first byte: an OCI error, never a 200 head followed
                # by nothing (found from outside: a full disk gave 200 and 0 bytes)
                await _aclose(stream)
                await _fetch_failed(exc, self.digest)(scope, receive, send)
                return
        await _start(send, status, headers)
        if head:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            await _aclose(stream)  # the fetch itself goes on, for the GET that follows
            return
        r.active_streams += 1
        sent = 0
        spans = getattr(stream, "spans", None)
        zerocopy = spans is not None and ZEROCOPY in (scope.get("extensions") or {})
        failure: BlobctlError | OSError | None = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_cancel_on_disconnect, receive, tg.cancel_scope)
                try:
                    if zerocopy:
                        assert spans is not None
                        sent, gone = await _send_spans(
                            send, spans(), lambda n: r.ctx.count("bytes_served", n))
                        if gone:  # the client went away (the server closed the connection)
                            tg.cancel_scope.cancel()
                            return
                    else:
                        async for piece in stream:
                            sent += len(piece)
                            await send({"type": "http.response.body", "body": piece,
                                        "more_body": True})
                            r.ctx.count("bytes_served", len(piece))
                    if sent != count:
                        raise OSError(f"the stream ended at {sent} of {count} bytes")
                    await send({"type": "http.response.body", "body": b"",
                                "more_body": False})
                except (BlobctlError, OSError) as exc:  # the fetch failed: cut below
                    failure = exc
                tg.cancel_scope.cancel()
        finally:
            r.active_streams -= 1
            await _aclose(stream)
        if failure is not None:
            client = scope.get("client") or ("-", 0)
            log.warning("mirror: %s:%s cut after %d of %d bytes of blob %s: %s",
                        client[0], client[1], sent, count, self.digest.short,
                        getattr(failure, "message", None) or failure)
            await cut_response(scope, send)


async def _send_spans(send: Send, spans: AsyncIterator[Any],
                      served: Callable[[int], None]) -> tuple[int, bool]:
    """Send a mirrored blob's final file spans (``fd``, ``offset``, ``count``; see
    ``mirror.FlightStream.spans``) with the zero-copy extension, each before asking for
    the next. Returns (bytes sent, whether the client went away mid-span)."""
    sent = 0
    async for span in spans:
        message: dict[str, Any] = {"type": ZEROCOPY, "file": span.fd, "offset": span.offset,
                                   "count": span.count, "more_body": True}
        await send(message)
        n = int(message.get("sent", span.count))
        sent += n
        served(n)
        if n != span.count:
            return sent, True
    return sent, False


async def _aclose(stream: AsyncIterator[bytes]) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


def _fetch_failed(exc: BlobctlError, digest: Digest) -> Response:
    """A mirror fetch that failed before its first byte (spec/serve.md, "Mirror"): 507 for
    a full disk (as a push answers), else 502 ``UNAVAILABLE`` with ``Retry-After``."""
    cause = exc.__cause__
    log.warning("mirror: blob %s not served: %s", digest.short, exc.message)
    if isinstance(cause, InsufficientSpace):
        return oci_error(507, "UNKNOWN", cause.message, headers=API_VERSION_HEADERS)
    return oci_error(502, "UNAVAILABLE", f"upstream: {exc.message}",
                     headers={**API_VERSION_HEADERS, "Retry-After": "5"})


def _open_failed(exc: OSError, digest: Digest) -> Response:
    """The answer when a blob cannot be opened (spec/serve.md, "API"): out of file
    descriptors (EMFILE/ENFILE) is 503 with ``Retry-After``, a passing overload; any other
    OS error a 500; both OCI errors (found from outside: under ``ulimit -n 64`` a blob GET
    was uvicorn's bare text/plain 500 with a traceback)."""
    log.warning("cannot open blob %s: %s", digest.short, exc.strerror or exc)
    return os_error(exc, f"cannot open blob {digest.short}: {exc.strerror or exc}",
                    API_VERSION_HEADERS)


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k == name:
            return str(v.decode("latin-1"))
    return None


async def _start(send: Send, status: int, headers: Mapping[str, str]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(k.lower().encode("latin-1"), v.encode("latin-1"))
                            for k, v in headers.items()]})


def routes(ctx: ServerContext) -> tuple[OCIRoutes, list[BaseRoute]]:
    """The OCI API routes for ``ctx`` (and the object holding their state)."""
    oci = OCIRoutes(ctx)
    return oci, oci.routes()
