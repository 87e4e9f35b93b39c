"""Pushing into ``serve --push``: upload sessions, mounts, manifest PUT/DELETE
(spec/serve.md, "Uploads").

An upload session is a :class:`blobstore.ingest.BlobWriter` (the store's one ingest
writer: an ``up-<token>`` folder in the ingest area, named in the session's lease before
it exists; the hash runs while bytes are written; commit = fsync, verify the digest the
client names, read-only, one rename).
Sessions live in the server's memory between requests (each keeps its ingest open): at
most ``max_sessions`` in all and ``max_per_subject`` per caller (anonymous callers: per
client address; beyond: 429 ``TOOMANYREQUESTS``); one idle for ``idle_timeout`` seconds
is dropped (folder deleted, lease released) by a reaper task that runs while sessions
exist. A write that fails (ENOSPC: 507, else 500) drops its session and its folder. Each
PATCH ends with a durable checkpoint, and a session's id is its ingest folder's key: a
restarted server (stopped, or killed) re-opens a session it does not know from its
folder, holding the bytes of every answered PATCH, for the same caller and repository
only. At shutdown sessions are closed, not dropped; GC collects a folder nobody resumes
once its heartbeat is older than the ingest grace.
A blob becomes visible only through a verified commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio.to_thread
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from blobstore import (
    Digest,
    DigestMismatch,
    InsufficientSpace,
    InvalidDigest,
    InvalidManifest,
    InvalidName,
    Lease,
    Manifest,
    ModelNotFound,
    ModelPinned,
    SizeMismatch,
    StoreDamaged,
    StoreUnwritable,
)
from blobstore.digest import new_hasher
from blobstore.ingest import BlobWriter, is_upload_key
from blobstore.manifest import MAX_MANIFEST_SIZE
from registry_server.context import Action, ServerContext
from registry_server.names import (
    Repo,
    by_digest_tag,
    parse_reference,
    parse_repo,
    tag_invalid,
    unstorable_tag,
)
from registry_server.repos import ManifestInfo, has_digest, manifest_facts
from registry_server.responses import CHUNK, oci_error

if TYPE_CHECKING:
    from registry_server.oci import OCIRoutes

__all__ = ["Session", "Uploads"]


@dataclass
class Session:
    id: str
    repo: Repo
    writer: BlobWriter
    lease: Lease
    subject: str = ""
    quota: str = ""  # whose share of the per-caller limit it is (see _quota)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    touched: float = field(default_factory=time.monotonic)
    done: bool = False

    @property
    def offset(self) -> int:
        return self.writer.size


GENERIC_TYPES = ("application/json", "application/octet-stream")


def _subject(request: Request) -> str:
    """The caller the route's authorization named (``OCIRoutes.authorize``)."""
    from registry_server.oci import SUBJECT_KEY

    return str(request.scope.get(SUBJECT_KEY) or "")


def _quota(request: Request) -> str:
    """Whose share of the per-caller session limit a request draws on: its subject; for
    anonymous callers (every client of a server without ``--auth``) the subject and the
    client's address, so one client's abandoned sessions do not lock the others out."""
    subject = _subject(request)
    if subject in ("", "anonymous") and request.client is not None:
        return f"anonymous@{request.client.host}"
    return subject


def _repo_key(repo: Repo | str) -> str:
    """A repository's name as compared (hosts and names are case-insensitive here, as
    :meth:`Uploads.grant` keys them)."""
    return (repo if isinstance(repo, str) else repo.url_name).lower()


def _same_owner(meta: dict[str, str], repo: Repo, subject: str) -> bool:
    """Whether a session made with ``meta`` may be used by ``subject`` on ``repo``: the
    one rule for sessions in memory and re-opened ones."""
    return (meta.get("subject") == subject
            and _repo_key(meta.get("repo", "")) == _repo_key(repo))


def _range_length(cr: str | None) -> int | None:
    """The byte count a (checked) ``Content-Range: a-b`` names, or None."""
    if cr is None:
        return None
    a, _, b = cr.strip().removeprefix("bytes ").split("/")[0].partition("-")
    return int(b) - int(a) + 1 if a.isdigit() and b.isdigit() else None


def _verifiable(text: str) -> Digest:
    """``text`` as a digest this server can verify. Raises InvalidDigest (400
    ``DIGEST_INVALID``, what distribution answers an unsupported algorithm) for bad
    grammar, an unknown algorithm, or one whose hash is not available here (``blake3``
    where its package cannot be imported): refused before any byte is stored."""
    digest = Digest.parse(text)
    try:
        new_hasher(digest.algorithm)
    except InvalidDigest as exc:
        raise InvalidDigest(str(digest), exc.reason) from exc
    return digest


def _range_header(offset: int) -> str:
    # distribution: "0-<last byte>", and "0-0" for an empty upload
    return f"0-{max(0, offset - 1)}"


class Uploads:
    """The push side of the API for one server."""

    def __init__(self, ctx: ServerContext, oci: OCIRoutes) -> None:
        self.ctx = ctx
        self.oci = oci
        self.sessions: dict[str, Session] = {}
        self.idle_timeout = 3600.0
        self.max_sessions = 256
        self.max_per_subject = 32
        self._reaper: asyncio.Task[None] | None = None
        # (caller subject, repository key, digest) a caller pushed or mounted here: with
        # --auth, a manifest may reference only blobs the caller pushed or mounted into its
        # repository, or blobs of the repository it may read at their tier.
        self._granted: set[tuple[str, str, Digest]] = set()
        self._granted_lock = threading.Lock()

    # ------------------------------------------------------------------ helpers
    def _api(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        from registry_server.oci import API_VERSION_HEADERS

        return {**API_VERSION_HEADERS, **(extra or {})}

    def _session_headers(self, s: Session) -> dict[str, str]:
        return self._api({"Location": f"/v2/{s.repo.url_name}/blobs/uploads/{s.id}",
                          "Range": _range_header(s.offset), "Docker-Upload-UUID": s.id,
                          "Content-Length": "0"})

    def grant(self, repo: Repo, digest: Digest, subject: str) -> None:
        with self._granted_lock:
            self._granted.add((subject, repo.url_name.lower(), digest))

    def granted(self, repo: Repo, digest: Digest, subject: str) -> bool:
        with self._granted_lock:
            return (subject, repo.url_name.lower(), digest) in self._granted

    def _refuse_push(self, request: Request, repo: Repo) -> Response | None:
        if not self.ctx.options.push:
            return oci_error(405, "UNSUPPORTED",
                             "this server is read-only (start 'blobctl serve --push')",
                             headers=self._api())
        return self.oci.authorize(request, repo.url_name, Action.PUSH, None)

    def _leased(self, open_writer: Callable[[Lease], BlobWriter | None]
                ) -> tuple[BlobWriter, Lease] | None:
        """A writer opened under a fresh lease (released again if none comes of it)."""
        lease = Lease(self.ctx.store.layout, "serve-upload").acquire()
        try:
            writer = open_writer(lease)
        except BaseException:
            lease.release()
            raise
        if writer is None:
            lease.release()
            return None
        return writer, lease

    def _new_writer(self, repo: Repo, subject: str,
                    algorithm: str | None = None) -> tuple[BlobWriter, Lease]:
        found = self._leased(lambda lease: BlobWriter(
            self.ctx.store.layout, lease=lease, algorithm=algorithm,
            meta={"repo": repo.url_name, "subject": subject}))
        assert found is not None
        return found

    def _reopen_writer(self, sid: str, repo: Repo,
                       subject: str) -> tuple[BlobWriter, Lease] | None:
        """The session ``sid`` of an earlier run of the server (its ingest folder kept
        what was checkpointed after each PATCH), if it was this caller's, for ``repo``.
        Another caller's or repository's folder is only read, never claimed or changed."""
        layout = self.ctx.store.layout
        meta = BlobWriter.peek_meta(layout, sid)
        if meta is None or not _same_owner(meta, repo, subject):
            return None
        return self._leased(lambda lease: BlobWriter.reopen(layout, sid, lease,
                                                            expect_meta=meta))

    def _keep(self, s: Session) -> None:
        """Close a session keeping its bytes (checkpointed) for a later run (thread)."""
        s.done = True
        s.writer.close()
        s.lease.release()

    def _drop(self, s: Session) -> None:
        """Abort a session: temp file deleted, lease released (thread)."""
        s.done = True
        s.writer.abort()
        s.lease.release()

    async def reap(self) -> None:
        """Drop sessions idle for longer than ``idle_timeout`` (file work in a thread)."""
        now = time.monotonic()
        stale = [s for s in self.sessions.values()
                 if not s.lock.locked() and now - s.touched > self.idle_timeout]
        for s in stale:
            del self.sessions[s.id]
            s.done = True
        def drop_all() -> None:
            for s in stale:
                self._drop(s)

        if stale:
            await anyio.to_thread.run_sync(drop_all)

    async def _reap_loop(self) -> None:
        """Reap idle sessions on a timer while any exist (ends when none are left)."""
        try:
            while self.sessions:
                await asyncio.sleep(max(0.05, min(60.0, self.idle_timeout / 2)))
                await self.reap()
        finally:
            self._reaper = None

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap_loop())

    def _too_many(self, quota: str) -> Response | None:
        """429 when the server holds ``max_sessions`` or this caller (``quota``, see
        :func:`_quota`) ``max_per_subject`` sessions; the message says which, and counts
        as the caller's only sessions that are."""
        n = len(self.sessions)
        mine = sum(1 for s in self.sessions.values() if s.quota == quota)
        if mine >= self.max_per_subject:
            who = (f"from your address {quota.partition('@')[2]}"
                   if quota.startswith("anonymous@") else "of yours")
            message = (f"too many upload sessions {who} ({mine} open, at most "
                       f"{self.max_per_subject}); finish or cancel some first")
        elif n >= self.max_sessions:
            message = (f"too many upload sessions on this server ({n} open, at most "
                       f"{self.max_sessions}, {mine} of them yours); try again later")
        else:
            return None
        return oci_error(429, "TOOMANYREQUESTS", message,
                         headers=self._api({"Retry-After": "10"}))

    def _write_failed(self, exc: OSError) -> Response:
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        return oci_error(507 if full else 500, "BLOB_UPLOAD_INVALID" if full else "UNKNOWN",
                         f"cannot write the upload: {exc.strerror or exc}",
                         headers=self._api())

    def _store_error(self, exc: InsufficientSpace | SizeMismatch | StoreUnwritable
                     ) -> Response:
        if isinstance(exc, StoreUnwritable):
            return oci_error(500, "UNKNOWN", exc.message, headers=self._api())
        return oci_error(507 if isinstance(exc, InsufficientSpace) else 400,
                         "BLOB_UPLOAD_INVALID", exc.message, headers=self._api())

    def close(self) -> None:
        """Server shutdown: keep every open session for a restarted server. A PATCH still
        writing finishes its write first (the writer's close waits for it); its next
        write fails, and the client resumes from the checkpointed offset."""
        if self._reaper is not None:
            with contextlib.suppress(RuntimeError):  # its loop may be gone already
                self._reaper.get_loop().call_soon_threadsafe(self._reaper.cancel)
        for s in list(self.sessions.values()):
            self._keep(s)  # a restarted server re-opens them by their id
        self.sessions.clear()

    async def _write_body(self, request: Request, writer: BlobWriter) -> int:
        """Stream the request body into ``writer`` in ~1 MiB writes (worker thread)."""
        buf = bytearray()
        total = 0
        try:
            async for piece in request.stream():
                buf += piece
                if len(buf) >= CHUNK:
                    data, buf = bytes(buf), bytearray()
                    await anyio.to_thread.run_sync(writer.write, data)
                    total += len(data)
                    self.ctx.count("upload_bytes", len(data))
        except ClientDisconnect:
            if buf:  # what arrived before a disconnect is kept (the Range says so)
                await anyio.to_thread.run_sync(writer.write, bytes(buf))
            raise
        if buf:
            await anyio.to_thread.run_sync(writer.write, bytes(buf))
            total += len(buf)
            self.ctx.count("upload_bytes", len(buf))
        return total

    # ------------------------------------------------------------------ router
    async def upload(self, request: Request, repo: Repo, sid: str) -> Response:
        refused = self._refuse_push(request, repo)
        if refused is not None:
            return refused
        method = request.method
        if sid == "":
            if method == "POST":
                return await self._post(request, repo)
            return oci_error(405, "UNSUPPORTED", f"{method} needs an upload id")
        if not is_upload_key(sid):  # before any lookup, lease or file work
            return oci_error(404, "BLOB_UPLOAD_UNKNOWN", "blob upload unknown to registry",
                             detail={"uuid": sid[:80]}, headers=self._api())
        s = self.sessions.get(sid)
        if s is None:
            s = await self._resume(request, repo, sid)
        if s is None or s.done or not _same_owner(s.writer.meta, repo, _subject(request)):
            return oci_error(404, "BLOB_UPLOAD_UNKNOWN", "blob upload unknown to registry",
                             detail={"uuid": sid}, headers=self._api())
        async with s.lock:
            if s.done:
                return oci_error(404, "BLOB_UPLOAD_UNKNOWN", "blob upload unknown to registry",
                                 detail={"uuid": sid}, headers=self._api())
            s.touched = time.monotonic()
            try:
                if method in ("GET", "HEAD"):
                    return Response(b"", 204, headers=self._session_headers(s))
                if method == "PATCH":
                    return await self._patch(request, s)
                if method == "PUT":
                    return await self._put(request, s)
                if method == "DELETE":
                    del self.sessions[sid]
                    await anyio.to_thread.run_sync(self._drop, s)
                    return Response(b"", 204, headers=self._api({"Content-Length": "0"}))
                return oci_error(405, "UNSUPPORTED", f"{method} is not supported here")
            finally:
                s.touched = time.monotonic()

    async def _resume(self, request: Request, repo: Repo, sid: str) -> Session | None:
        """A session the server had before a restart, re-opened from its ingest folder."""
        subject = _subject(request)
        if self._too_many(_quota(request)) is not None:
            return None
        found = await anyio.to_thread.run_sync(self._reopen_writer, sid, repo, subject)
        if found is None:
            return None
        if sid in self.sessions:  # another request re-opened it meanwhile
            await anyio.to_thread.run_sync(found[0].close)
            await anyio.to_thread.run_sync(found[1].release)
            return self.sessions[sid]
        s = Session(sid, repo, found[0], found[1], subject, _quota(request))
        self.sessions[sid] = s
        self._ensure_reaper()
        return s

    async def _post(self, request: Request, repo: Repo) -> Response:
        q = request.query_params
        if "mount" in q:
            mounted = await self._mount(request, repo, q["mount"], q.get("from", ""))
            if mounted is not None:
                return mounted
        await self.reap()
        if "digest" in q:  # monolithic: POST ?digest= with the whole body
            return await self._monolithic(request, repo, q["digest"])
        subject = _subject(request)
        busy = self._too_many(_quota(request))
        if busy is not None:
            return busy
        writer, lease = await anyio.to_thread.run_sync(self._new_writer, repo, subject)
        s = Session(writer.key, repo, writer, lease, subject, _quota(request))
        self.sessions[s.id] = s
        self._ensure_reaper()
        return Response(b"", 202, headers=self._session_headers(s))

    async def _mount(self, request: Request, repo: Repo, digest_text: str,
                     source: str) -> Response | None:
        """201 when the blob is in the store and the caller may read it from ``source``
        (the ``from`` repository; with --auth it must be referenced there); else None
        (an ordinary session follows, as distribution does)."""
        try:
            digest = Digest.parse(digest_text)
        except InvalidDigest as exc:
            return oci_error(400, "DIGEST_INVALID", exc.message, headers=self._api())
        if not self.oci.open_access:
            try:
                src = parse_repo(source)
            except InvalidName:
                return None
            referenced, tier = await anyio.to_thread.run_sync(self.oci.blob_tier, src, digest)
            if not referenced:
                return None
            if not self.ctx.policy.authorize(request.headers, src.url_name, Action.READ,
                                             tier).allowed:
                return None
        if not await anyio.to_thread.run_sync(self.ctx.store.has_blob, digest):
            return None
        self.grant(repo, digest, _subject(request))
        return Response(b"", 201, headers=self._api({
            "Location": f"/v2/{repo.url_name}/blobs/{digest}",
            "Docker-Content-Digest": str(digest), "Content-Length": "0"}))

    async def _monolithic(self, request: Request, repo: Repo, digest_text: str) -> Response:
        try:
            digest = _verifiable(digest_text)
        except InvalidDigest as exc:
            return oci_error(400, "DIGEST_INVALID", exc.message, headers=self._api())
        subject = _subject(request)
        # hashed with the digest's own algorithm while written (sha512 too: spec/names.md)
        writer, lease = await anyio.to_thread.run_sync(self._new_writer, repo, subject,
                                                       digest.algorithm)
        s = Session("monolithic", repo, writer, lease, subject)
        try:
            try:
                await self._write_body(request, writer)
            except ClientDisconnect:
                await anyio.to_thread.run_sync(self._drop, s)
                return Response(b"", 400)
            except (InsufficientSpace, SizeMismatch, StoreUnwritable) as exc:
                await anyio.to_thread.run_sync(self._drop, s)
                return self._store_error(exc)
            except OSError as exc:
                await anyio.to_thread.run_sync(self._drop, s)
                return self._write_failed(exc)
            return await self._commit(s, digest)
        finally:
            if not s.done:
                await anyio.to_thread.run_sync(self._drop, s)

    def _content_range(self, request: Request, s: Session) -> Response | None:
        """Check a PATCH's ``Content-Range: <start>-<end>`` against the session: the start
        must be the current offset (416 otherwise), the length the body's (400)."""
        cr = request.headers.get("content-range")
        if cr is None:
            return None
        text = cr.strip().removeprefix("bytes ").split("/")[0]
        a, sep, b = text.partition("-")
        if not sep or not a.isdigit() or not b.isdigit() or int(b) < int(a):
            return oci_error(400, "BLOB_UPLOAD_INVALID", f"bad Content-Range {cr!r}",
                             headers=self._api())
        start, end = int(a), int(b)
        if start != s.offset:
            return oci_error(416, "BLOB_UPLOAD_INVALID",
                             f"chunk starts at {start}, the upload holds {s.offset} bytes",
                             headers=self._session_headers(s))
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) != end - start + 1:
            return oci_error(400, "BLOB_UPLOAD_INVALID",
                             "Content-Range and Content-Length disagree",
                             headers=self._api())
        return None

    async def _patch(self, request: Request, s: Session) -> Response:
        failed = await self._append(request, s)
        if failed is not None:
            return failed
        await anyio.to_thread.run_sync(s.writer.checkpoint)  # the bytes survive a restart
        return Response(b"", 202, headers=self._session_headers(s))

    async def _append(self, request: Request, s: Session) -> Response | None:
        """Append a PATCH's (or a final PUT's) body after its ``Content-Range`` check;
        the error response, or None when the bytes are in."""
        bad = self._content_range(request, s)
        if bad is not None:
            return bad
        return await self._write_session(request, s)

    async def _write_session(self, request: Request, s: Session) -> Response | None:
        """The request body appended to the session; on a failed write the session and
        its temp file are gone and the answer says why. A body (chunked, so not checked
        before) whose length is not the one its ``Content-Range`` named is 400, and the
        session is dropped too: its bytes are no longer what the client meant."""
        expect = _range_length(request.headers.get("content-range"))
        try:
            total = await self._write_body(request, s.writer)
        except ClientDisconnect:
            # the prefix that arrived is kept, durably: a restarted server resumes it
            await anyio.to_thread.run_sync(s.writer.checkpoint)
            return Response(b"", 400)
        except (InsufficientSpace, SizeMismatch, StoreUnwritable) as exc:
            self.sessions.pop(s.id, None)
            await anyio.to_thread.run_sync(self._drop, s)
            return self._store_error(exc)
        except OSError as exc:
            self.sessions.pop(s.id, None)
            await anyio.to_thread.run_sync(self._drop, s)
            return self._write_failed(exc)
        if expect is not None and total != expect:
            self.sessions.pop(s.id, None)
            await anyio.to_thread.run_sync(self._drop, s)
            return oci_error(400, "BLOB_UPLOAD_INVALID",
                             f"Content-Range names {expect} bytes, the body had {total}; "
                             "the upload is dropped", headers=self._api())
        return None

    async def _put(self, request: Request, s: Session) -> Response:
        digest_text = request.query_params.get("digest")
        if digest_text is None:
            return oci_error(400, "DIGEST_INVALID", "PUT needs ?digest=", headers=self._api())
        try:
            digest = _verifiable(digest_text)  # before the body: the session stays as it is
        except InvalidDigest as exc:
            return oci_error(400, "DIGEST_INVALID", exc.message, headers=self._api())
        failed = await self._append(request, s)
        if failed is not None:
            return failed
        del self.sessions[s.id]
        return await self._commit(s, digest)

    async def _commit(self, s: Session, digest: Digest) -> Response:
        """Verify and give the bytes their blob name; a mismatch leaves nothing."""
        s.writer.expected = digest
        try:
            await anyio.to_thread.run_sync(s.writer.commit)
        except (DigestMismatch, SizeMismatch) as exc:
            return oci_error(400, "DIGEST_INVALID", exc.message,
                             detail={"digest": str(digest)}, headers=self._api())
        except (InsufficientSpace, StoreUnwritable) as exc:  # fsync/rename: ENOSPC, EIO
            return self._store_error(exc)
        except OSError as exc:
            return self._write_failed(exc)
        finally:
            await anyio.to_thread.run_sync(self._drop, s)  # lease released, temp gone
        self.grant(s.repo, digest, s.subject)
        return Response(b"", 201, headers=self._api({
            "Location": f"/v2/{s.repo.url_name}/blobs/{digest}",
            "Docker-Content-Digest": str(digest), "Content-Length": "0"}))

    # ------------------------------------------------------------------ manifests
    async def manifest_write(self, request: Request, repo: Repo, ref_text: str) -> Response:
        refused = self._refuse_push(request, repo)
        if refused is not None:
            return refused
        try:
            ref = parse_reference(ref_text)
            if isinstance(ref, Digest) and request.method == "PUT":
                ref = _verifiable(str(ref))
        except InvalidDigest as exc:
            return oci_error(400, "DIGEST_INVALID", exc.message, headers=self._api())
        except InvalidName as exc:
            return oci_error(400, "TAG_INVALID", tag_invalid(repo, ref_text, exc.reason),
                             headers=self._api())
        unstorable = None if isinstance(ref, Digest) else unstorable_tag(repo, ref)
        if request.method == "DELETE":
            if unstorable:  # never stored here
                return oci_error(404, "MANIFEST_UNKNOWN", f"manifest unknown ({unstorable})",
                                 headers=self._api())
            return await self._manifest_delete(repo, ref)
        if unstorable:
            return oci_error(400, "TAG_INVALID", tag_invalid(repo, ref_text, unstorable),
                             headers=self._api())
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > MAX_MANIFEST_SIZE:
                return oci_error(413, "SIZE_INVALID", "manifest too large", headers=self._api())
        raw = bytes(body)
        try:
            manifest = Manifest.decode(raw)
        except InvalidManifest as exc:
            return oci_error(400, "MANIFEST_INVALID", exc.message, headers=self._api())
        # The store keeps bytes only: the media type served later is the body's. A
        # Content-Type that says otherwise could not be kept, so it is refused.
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body_type, _ann, subject_digest, _art = manifest_facts(raw)
        if ctype and ctype not in GENERIC_TYPES and ctype != body_type.lower():
            return oci_error(400, "MANIFEST_INVALID",
                             f"Content-Type {ctype} differs from the manifest's media type "
                             f"{body_type}", headers=self._api())
        if isinstance(ref, Digest):
            if ref != Digest.of_bytes(raw, ref.algorithm):
                return oci_error(400, "DIGEST_INVALID", "the manifest's digest differs",
                                 headers=self._api())
            tag = by_digest_tag(manifest.digest)
            assert tag is not None
        else:
            tag = ref

        subject = _subject(request)

        def put() -> tuple[list[str], list[str]]:
            # A blob of a chunk-index artifact this server built (the empty config `{}`,
            # an index) is answered by HEAD/GET though not in blobs/: a client that was
            # told it exists does not upload it, so its manifest may name it (found from
            # outside: a pushed index artifact was refused MANIFEST_BLOB_UNKNOWN). Its
            # bytes go into the store with the manifest.
            built: dict[Digest, tuple[bytes, ManifestInfo]] = {}
            missing: list[str] = []
            sizes = {desc.digest: desc.size for desc in manifest.descriptors}
            for d, size in sizes.items():
                # at the size the manifest gives (a blob of another size is not the one it
                # names: the store's one rule, Store.has_blob)
                if self.ctx.store.has_blob(d, size):
                    continue
                found = self.oci.derived(repo, d, None)
                if found is not None and len(found[0].blobs.get(d, b"")) == size:
                    built[d] = (found[0].blobs[d], found[1])
                else:
                    missing.append(str(d))
            if missing:
                return missing, []
            if not self.oci.open_access:
                # A blob the caller did not push or mount here must be one of the
                # repository's that the caller may read at its tier now: a manifest
                # (whatever its annotation) never lends a blob a lower tier.
                denied: list[str] = []
                for d in manifest.blob_digests:
                    if self.granted(repo, d, subject):
                        continue
                    if d in built:  # read with its model's access, as HEAD/GET answer it
                        if self.oci.derived_readable(request, repo, built[d][1]):
                            continue
                        denied.append(str(d))
                        continue
                    referenced, tier = self.oci.blob_tier(repo, d)
                    if not referenced:
                        missing.append(str(d))
                    elif not self.ctx.policy.authorize(request.headers, repo.url_name,
                                                       Action.READ, tier).allowed:
                        denied.append(str(d))
                if missing or denied:
                    return missing, denied
            for data, _ in built.values():
                self.ctx.store.put_bytes(data)
            try:
                self.ctx.store.put_manifest(repo.name(tag), manifest)
            except StoreDamaged as exc:  # (found by review: a blob of another size,
                # `damaged`, was answered 201 with nothing stored)
                return [*exc.missing, *exc.damaged], []
            return [], []

        missing, denied = await anyio.to_thread.run_sync(put)
        if denied and not missing:
            return oci_error(403, "DENIED", "the manifest references blobs above your tier",
                             detail={"denied": sorted(denied)}, headers=self._api())
        if missing:
            return oci_error(400, "MANIFEST_BLOB_UNKNOWN", "blob unknown to registry",
                             detail={"missing": sorted(missing)}, headers=self._api())
        # pushed by digest: answered with that digest (a sha512 one too; GET by it works)
        pushed = ref if isinstance(ref, Digest) else manifest.digest
        headers = {"Location": f"/v2/{repo.url_name}/manifests/{pushed}",
                   "Docker-Content-Digest": str(pushed), "Content-Length": "0"}
        if subject_digest is not None:
            # OCI distribution 1.1: the referrers API lists it (clients need not keep a
            # referrers tag)
            headers["OCI-Subject"] = str(subject_digest)
        return Response(b"", 201, headers=self._api(headers))

    async def _manifest_delete(self, repo: Repo, ref: str | Digest) -> Response:
        def remove() -> int:
            store = self.ctx.store
            with store.lock():  # all or nothing: no pin or tag changes meanwhile
                if isinstance(ref, Digest):
                    tags = [m.tag for m in self.oci.repos.manifests(repo)
                            if has_digest(m, ref)]
                else:
                    tags = [ref] if self.oci.repos.by_tag(repo, ref) is not None else []
                for t in tags:  # (found from outside: tags before a pinned one went)
                    if store.is_pinned(repo.name(t)):
                        raise ModelPinned(store.canonical_name(repo.name(t)).display())
                for t in tags:
                    store.remove_model(repo.name(t))
            return len(tags)

        try:
            n = await anyio.to_thread.run_sync(remove)
        except ModelNotFound:
            n = 0
        except ModelPinned as exc:
            return oci_error(409, "DENIED", exc.message, headers=self._api())
        if n == 0:
            return oci_error(404, "MANIFEST_UNKNOWN", "manifest unknown", headers=self._api())
        return Response(b"", 202, headers=self._api({"Content-Length": "0"}))

    async def blob_delete(self, request: Request, repo: Repo, ref: str) -> Response:
        refused = self._refuse_push(request, repo)
        if refused is not None:
            return refused
        return oci_error(405, "UNSUPPORTED",
                         "blobs are removed by 'blobctl gc' once no manifest needs them",
                         headers=self._api())
