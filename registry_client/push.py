"""``push()``: upload a model from a store to an OCI registry (spec/push.md).

Order of events:

1. the model's manifest is read from the store (its bytes are what gets pushed);
2. for each blob (config first, then the layers in order): ``HEAD`` on the destination,
   skipped when the registry has it; else a cross-repository mount when the model came
   from the same registry (``POST …/blobs/uploads/?mount=<digest>&from=<repo>``); else
   an upload: one ``PUT`` for a blob up to ``chunk_size``, chunked ``PATCH``-es with
   ``Content-Range`` for larger ones, each chunk's new upload URL and offset recorded in
   ``.blobctl/push/`` so that a killed push resumes where the registry is (``GET`` on
   the upload URL, ``204`` with ``Range: 0-<last>``) instead of starting over;
3. the manifest, last, with its stored bytes and media type; the registry's
   ``Docker-Content-Digest`` must be the store's digest.

A registry that refuses the manifest (e.g. one that allows only standard media types)
raises :class:`UnsupportedManifest` naming the media types it was given.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec

from blobstore.decoding import decode
from blobstore.digest import Digest
from blobstore.errors import InvalidInput, InvalidOption, StoreDamaged
from blobstore.layout import write_atomic
from blobstore.manifest import Manifest
from blobstore.name import ModelName
from blobstore.store import Store
from blobstore.units import check_count
from registry_client.client import RegistryClient
from registry_client.client import safe_url as _safe
from registry_client.errors import (
    ProtocolError,
    RegistryError,
    RemoteNotFound,
    UnsupportedManifest,
)
from registry_client.retry import RetryPolicy

__all__ = ["PushOptions", "PushResult", "parse_destination", "push"]

log = logging.getLogger("blobctl.push")

# the OCI distribution spec's repository name (its "name" grammar), path components
_OCI_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_OCI_REPOSITORY = re.compile(rf"{_OCI_COMPONENT}(?:/{_OCI_COMPONENT})*", re.ASCII)

ProgressEvent = dict[str, Any]
_BLOCK = 1 << 20
_STANDARD_TYPES = ("application/vnd.oci.", "application/vnd.docker.")


@dataclass(frozen=True)
class PushOptions:
    insecure: bool = False
    chunk_size: int = 64 << 20    # blobs above this go in PATCH chunks of this size
    mount: bool = True            # try a cross-repository mount on the same registry
    # chunk index artifact (spec/delta.md): None = for layers of 8 MiB or more, True = for
    # every layer (and a refused index fails the push), False = never
    index: bool | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        """Raises InvalidOption for a value out of range, before any request."""
        check_count("PushOptions", "chunk_size", self.chunk_size, 1)
        if not isinstance(self.retry, RetryPolicy):
            raise InvalidOption("PushOptions", "retry", self.retry, "a RetryPolicy")


@dataclass
class PushResult:
    name: ModelName
    destination: ModelName
    manifest: Manifest
    blobs_total: int = 0
    blobs_present: int = 0        # the registry had them already
    blobs_mounted: int = 0        # mounted from the source repository
    blobs_uploaded: int = 0
    bytes_uploaded: int = 0       # sent in this run
    bytes_resumed: int = 0        # the registry had them from an earlier, killed run
    index_digest: Digest | None = None  # the chunk-index artifact pushed with it, if any
    index_blobs: int = 0
    index_bytes: int = 0
    seconds: float = 0.0


class _UploadState(msgspec.Struct):
    url: str
    offset: int
    digest: str
    destination: str


_STATE_DEC = msgspec.json.Decoder(_UploadState)


def parse_destination(dest: str, source: ModelName) -> ModelName:
    """``host[:port]/ns/repo[:tag]``; without a tag, the source's tag."""
    name = ModelName.parse(dest)
    if dest.rfind(":") <= dest.rfind("/"):
        name = name.with_tag(source.tag)
    return name


class _Running:
    """The hash of a blob's bytes ``[0, pos)``, fed in order; bytes sent again (a retried
    request) are not hashed twice."""

    __slots__ = ("digest", "hasher", "pos")

    def __init__(self, digest: Digest) -> None:
        self.digest = digest
        self.hasher = digest.new_hasher()
        self.pos = 0

    def take(self, at: int, block: bytes) -> None:
        """Bytes ``block`` at offset ``at`` (no gap may lie before them)."""
        if at > self.pos:
            raise AssertionError(f"hash gap: {self.pos} .. {at}")
        end = at + len(block)
        if end > self.pos:
            self.hasher.update(memoryview(block)[self.pos - at:])
            self.pos = end

    def matches(self, size: int) -> bool:
        return self.pos == size and self.hasher.hexdigest() == self.digest.hex


def _emit(progress: Callable[[ProgressEvent], None] | None, **event: Any) -> None:
    if progress is not None:
        progress(event)


class _Pusher:
    def __init__(self, client: RegistryClient, store: Store, src: ModelName, dest: ModelName,
                 opts: PushOptions, progress: Callable[[ProgressEvent], None] | None,
                 result: PushResult) -> None:
        self.client = client
        self.store = store
        self.src = src
        self.dest = dest
        self.opts = opts
        self.progress = progress
        self.result = result
        self.scope = f"repository:{dest.repository}:pull,push"
        self.state_dir = store.layout.state_dir / "push"
        self._warned = False
        # per blob being uploaded: the hash of its bytes read so far, in order (every
        # byte sent is hashed once, whatever the tries; the last block goes out only
        # once the whole blob proved to be its digest)
        self._hashing: dict[Digest, _Running] = {}

    # ------------------------------------------------------------------ helpers
    def _url(self, path: str) -> str:
        return f"{self.client.base_url(self.dest)}/v2/{self.dest.repository}/{path}"

    def _join(self, resp: httpx.Response) -> str:
        loc = resp.headers.get("location")
        if not loc:
            raise ProtocolError(f"the registry sent no upload Location ({resp.status_code})",
                                url=_safe(resp.request.url))
        return str(resp.request.url.join(loc))

    def _state_path(self, digest: Digest) -> Path:
        key = hashlib.sha256(f"{self.dest.host}/{self.dest.repository}@{digest}".encode())
        return self.state_dir / f"{key.hexdigest()[:32]}.json"

    def _save(self, digest: Digest, url: str, offset: int) -> None:
        doc = _UploadState(url, offset, str(digest), f"{self.dest.host}/{self.dest.repository}")
        try:
            write_atomic(self._state_path(digest), msgspec.json.encode(doc),
                         self.store.layout.ingest)
        except OSError as exc:  # a store we may read but not write: push without resume
            if not self._warned:
                self._warned = True
                log.warning("cannot record the upload state in %s (%s): a killed push "
                            "will start this blob over", self.state_dir,
                            exc.strerror or exc)

    def _forget(self, digest: Digest) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self._state_path(digest))

    def _tick(self, digest: Digest, total: int, done: int) -> None:
        _emit(self.progress, status=f"pushing {digest.short}", digest=str(digest),
              total=total, completed=done)

    # ------------------------------------------------------------------ blobs
    def has_blob(self, digest: Digest) -> bool:
        try:
            resp = self.client.request("HEAD", self._url(f"blobs/{digest}"), scope=self.scope,
                                       what=f"blob {digest.short}")
        except RemoteNotFound:
            return False
        resp.close()
        return True

    def blob(self, digest: Digest, size: int) -> None:
        if self.has_blob(digest):
            self.result.blobs_present += 1
            self._forget(digest)
            self._tick(digest, size, size)
            return
        for attempt in (1, 2):
            try:
                self._upload(digest, size)
                return
            except _SessionLost as lost:
                exc = lost.error
                # The registry no longer knows the upload session: a response was lost
                # after the registry had applied the request (the last PUT committed
                # the blob; a PATCH moved the offset), and the retry met a closed or
                # moved session (found from outside: exit 3, "not found", with a hint
                # about model names). Done if the blob is there; else once more afresh.
                self._forget(digest)
                if self.has_blob(digest):
                    self.result.blobs_uploaded += 1
                    self._tick(digest, size, size)
                    return
                if attempt == 2:
                    raise RegistryError(
                        f"the upload of blob {digest.short} was lost twice by the registry "
                        f"({exc.message})", url=exc.url, status=exc.status,
                        hint="the registry or a proxy in front of it drops uploads; "
                             "try again later") from exc
                log.warning("the registry lost the upload of %s (%s); starting it over",
                            digest.short, exc.message)

    def _upload(self, digest: Digest, size: int) -> None:
        path = self.store.blob_path(digest)
        self._hashing[digest] = _Running(digest)
        resumed = self._resume(digest, size)
        if resumed is not None:
            url, offset = resumed
            self.result.bytes_resumed += offset
            self._hash_prefix(path, digest, offset)
        else:
            start = self._start(digest)
            if start is None:  # mounted
                self.result.blobs_mounted += 1
                self._tick(digest, size, size)
                return
            url, offset = start, 0
        try:  # (only the session's own requests: a 404 on the POST is a missing repo)
            if size <= self.opts.chunk_size and offset == 0:
                self._put(url, digest, path, 0, size)
            else:
                self._chunks(url, digest, path, offset, size)
        except RemoteNotFound as exc:
            raise _SessionLost(exc) from exc
        self.result.blobs_uploaded += 1
        self._forget(digest)
        self._tick(digest, size, size)

    def _start(self, digest: Digest) -> str | None:
        """Open an upload session (or mount): the upload URL, or None if mounted."""
        url = self._url("blobs/uploads/")
        same_registry = (self.src.host.lower() == self.dest.host.lower()
                         and self.src.repository != self.dest.repository)
        if self.opts.mount and same_registry:
            resp = self.client.request(
                "POST", f"{url}?mount={digest}&from={self.src.repository}", scope=self.scope,
                what=f"mount of blob {digest.short}", headers={"Content-Length": "0"})
            resp.close()
            if resp.status_code == 201:
                return None
            if resp.status_code == 202:
                return self._join(resp)
        resp = self.client.request("POST", url, scope=self.scope,
                                   what=f"upload of blob {digest.short}",
                                   headers={"Content-Length": "0"})
        resp.close()
        if resp.status_code != 202:
            raise ProtocolError(f"starting an upload answered {resp.status_code}, not 202",
                                url=_safe(url))
        return self._join(resp)

    def _resume(self, digest: Digest, size: int) -> tuple[str, int] | None:
        """A recorded upload of this blob the registry still holds: (URL, offset)."""
        try:
            doc = decode(self._state_path(digest).read_bytes(), _STATE_DEC)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            return None
        try:
            resp = self.client.request("GET", doc.url, scope=self.scope,
                                       what=f"upload status of blob {digest.short}")
        except RegistryError as exc:
            log.info("recorded upload of %s is gone (%s); starting over", digest.short, exc)
            self._forget(digest)
            return None
        resp.close()
        rng = resp.headers.get("range", "")
        try:
            offset = int(rng.split("-", 1)[1]) + 1 if rng else 0
        except (IndexError, ValueError):
            offset = -1
        if resp.status_code != 204 or not 0 <= offset <= size:
            log.info("upload of %s cannot be resumed (%s, Range %r); starting over",
                     digest.short, resp.status_code, rng)
            self._forget(digest)
            return None
        url = self._join(resp) if resp.headers.get("location") else doc.url
        log.info("resuming upload of %s at byte %d", digest.short, offset)
        return url, offset

    def _hash_prefix(self, path: Path, digest: Digest, offset: int) -> None:
        """Hash the bytes ``[0, offset)`` a resumed upload sent in an earlier run."""
        run = self._hashing[digest]
        with open(path, "rb") as f:
            while run.pos < offset:
                block = f.read(min(_BLOCK, offset - run.pos))
                if not block:
                    raise StoreDamaged(self.src.display(), [], [str(digest)])
                run.take(run.pos, block)

    def _body(self, path: Path, start: int, end: int,
              digest: Digest, size: int) -> Callable[[], Iterator[bytes]]:
        """The bytes ``[start, end)`` of the blob, hashed on the way: the block that ends
        the blob is sent only if the whole blob hashes to ``digest``; else StoreDamaged
        (exit 5) breaks the request off, so a registry never commits damaged bytes, even
        one that does not check them (found from outside: the bytes went out whole and
        the registry's 400 read as a registry error, exit 6)."""
        run = self._hashing[digest]

        def gen() -> Iterator[bytes]:
            if size == 0 and not run.matches(0):
                raise StoreDamaged(self.src.display(), [], [str(digest)])
            with open(path, "rb") as f:
                f.seek(start)
                pos = start
                while pos < end:
                    block = f.read(min(_BLOCK, end - pos))
                    if not block:
                        raise StoreDamaged(self.src.display(), [], [str(digest)])
                    run.take(pos, block)
                    pos += len(block)
                    if pos == size and not run.matches(size):
                        raise StoreDamaged(self.src.display(), [], [str(digest)])
                    yield block
                    self._tick(digest, size, pos)
        return gen

    def _put(self, url: str, digest: Digest, path: Path, start: int, size: int) -> None:
        target = str(httpx.URL(url).copy_merge_params({"digest": str(digest)}))
        resp = self.client.request(
            "PUT", target, scope=self.scope, what=f"upload of blob {digest.short}",
            headers={"Content-Type": "application/octet-stream",
                     "Content-Length": str(size - start)},
            body=self._body(path, start, size, digest, size))
        resp.close()
        self.result.bytes_uploaded += size - start
        self._check_committed(resp, digest)

    def _chunks(self, url: str, digest: Digest, path: Path, offset: int, size: int) -> None:
        chunk = self.opts.chunk_size
        while offset < size:
            end = min(size, offset + chunk)
            resp = self.client.request(
                "PATCH", url, scope=self.scope, what=f"upload of blob {digest.short}",
                headers={"Content-Type": "application/octet-stream",
                         "Content-Range": f"{offset}-{end - 1}",
                         "Content-Length": str(end - offset)},
                body=self._body(path, offset, end, digest, size))
            resp.close()
            if resp.status_code != 202:
                raise ProtocolError(f"a chunk upload answered {resp.status_code}, not 202",
                                    url=_safe(url))
            rng = resp.headers.get("range", "")
            if rng and rng != f"0-{end - 1}":
                raise ProtocolError(f"the registry holds {rng!r} of blob {digest.short} after "
                                    f"a chunk ending at {end - 1}", url=_safe(url))
            url = self._join(resp)
            self.result.bytes_uploaded += end - offset
            offset = end
            self._save(digest, url, offset)
        # (every byte is hashed by now: sent above, or by _upload for a resumed prefix)
        if not self._hashing[digest].matches(size):
            raise StoreDamaged(self.src.display(), [], [str(digest)])
        target = str(httpx.URL(url).copy_merge_params({"digest": str(digest)}))
        resp = self.client.request("PUT", target, scope=self.scope,
                                   what=f"upload of blob {digest.short}",
                                   headers={"Content-Length": "0"})
        resp.close()
        self._check_committed(resp, digest)

    @staticmethod
    def _check_committed(resp: httpx.Response, digest: Digest) -> None:
        if resp.status_code not in (201, 204):
            raise ProtocolError(f"finishing the upload of {digest.short} answered "
                                f"{resp.status_code}, not 201", url=_safe(resp.request.url))
        got = resp.headers.get("docker-content-digest")
        if got and got != str(digest):
            raise ProtocolError(f"the registry stored blob {digest.short} as {got}",
                                url=_safe(resp.request.url))

    # ------------------------------------------------------------------ manifest
    def manifest(self, manifest: Manifest) -> None:
        url = self._url(f"manifests/{self.dest.tag}")
        try:
            resp = self.client.request(
                "PUT", url, scope=self.scope, what=f"manifest {self.dest}",
                headers={"Content-Type": manifest.media_type,
                         "Content-Length": str(len(manifest.raw))},
                body=lambda: manifest.raw)
        except RegistryError as exc:
            if exc.status in (400, 415) or "MANIFEST_INVALID" in exc.message.upper():
                odd = sorted({d.mediaType for d in manifest.descriptors
                              if not d.mediaType.startswith(_STANDARD_TYPES)})
                types = ", ".join([manifest.media_type, *odd])
                raise UnsupportedManifest(
                    f"{self.dest.host} refused the manifest of {self.src.display()} "
                    f"(media types {types}): {exc.message}", url=exc.url, status=exc.status,
                    hint="this registry does not accept these media types; push to one "
                         "that stores any OCI artifact (e.g. CNCF distribution, zot)") from exc
            raise
        resp.close()
        if resp.status_code not in (200, 201, 202):
            raise ProtocolError(f"manifest upload answered {resp.status_code}", url=_safe(url))
        got = resp.headers.get("docker-content-digest")
        if got and got != str(manifest.digest):
            raise ProtocolError(f"the registry stored the manifest as {got}, not "
                                f"{manifest.digest}", url=_safe(url))


def _push_index(client: RegistryClient, st: Store, dest: ModelName, manifest: Manifest,
                opts: PushOptions, progress: Callable[[ProgressEvent], None] | None,
                result: PushResult) -> None:
    """Attach the chunk index of the large layers (spec/delta.md). With the default
    (``index=None``) a registry that refuses the artifact only costs a warning: the model
    itself is pushed."""
    from registry_client.delta.artifact import push_indexes
    from registry_client.delta.local import local_index
    from registry_client.delta.plan import MIN_BLOB

    seen: set[Digest] = set()
    layers = []
    for layer in manifest.layers:
        if layer.digest not in seen and (opts.index or layer.size >= MIN_BLOB):
            seen.add(layer.digest)
            layers.append(layer)
    if not layers:
        return
    _emit(progress, status="pushing chunk index")
    indexes = []
    for layer in layers:
        idx = local_index(st, layer.digest, layer.size)
        assert idx is not None  # no probe: never stops early
        indexes.append(idx)
    try:
        result.index_digest = push_indexes(client, dest, manifest, indexes)
    except RegistryError as exc:
        if opts.index:
            raise
        log.warning("pushed %s, but the registry refused its chunk index (%s): delta "
                    "updates of it will fetch whole blobs", dest, exc.message)
        return
    result.index_blobs = len(indexes)
    result.index_bytes = sum(len(i.encode()) for i in indexes)


class _SessionLost(Exception):
    """A request on an upload session answered 404: the registry no longer knows it."""

    def __init__(self, error: RemoteNotFound) -> None:
        super().__init__(error.message)
        self.error = error


def push(
    ref: str | ModelName,
    dest: str | ModelName,
    *,
    store: Store | str | Path,
    progress: Callable[[ProgressEvent], None] | None = None,
    options: PushOptions | None = None,
) -> PushResult:
    """Push model ``ref`` from ``store`` to ``dest`` (``host[:port]/ns/repo[:tag]``).

    Idempotent: blobs the registry has are skipped, and pushing the same model again
    transfers nothing but the manifest. The manifest goes last, byte for byte as stored.
    An interrupted chunked upload resumes on the next call. ``progress`` receives
    ``{"status": "pushing <12 hex>", "digest", "total", "completed"}`` events, then
    ``"pushing manifest"`` and ``"success"``. Raises ModelNotFound, StoreDamaged,
    AuthError, UnsupportedManifest and other RegistryErrors (spec/cli.md exit codes).
    """
    opts = options or PushOptions()
    if opts.chunk_size < 1:
        raise InvalidInput("chunk size must be positive")
    name = ref if isinstance(ref, ModelName) else ModelName.parse(ref)
    target = dest if isinstance(dest, ModelName) else parse_destination(dest, name)
    repository = f"{target.namespace}/{target.model}"
    if repository != repository.lower():
        # the OCI distribution spec's repository names are lower case: a registry answers
        # an upper-case one with a bare 404, which reads as "not found" (found from outside)
        lower = ModelName(target.host, target.namespace.lower(), target.model.lower(),
                          target.tag).display()
        raise InvalidInput(f"cannot push to {target.display()}: OCI repository names are "
                           "lower case", hint=f"push to {lower}")
    if not _OCI_REPOSITORY.fullmatch(repository):
        # also a bare 404 from the registry, read as "not found" (found from outside)
        raise InvalidInput(f"cannot push to {target.display()}: {repository!r} is not an "
                           "OCI repository name (each part lower-case letters and digits, "
                           "joined by '.', '_', '__' or dashes, none at its start or end)")
    st = store if isinstance(store, Store) else Store(store, create=False)
    t0 = time.monotonic()
    manifest = st.get_manifest(name)
    st.check_blobs(name, manifest)
    result = PushResult(name, target, manifest)
    from blobstore.archive.common import reader_lease  # late: pulls need none of it

    with reader_lease(st.layout, f"push {name}", manifest.blob_digests), \
            RegistryClient(insecure=opts.insecure, retry=opts.retry) as client:
        pusher = _Pusher(client, st, name, target, opts, progress, result)
        seen: set[Digest] = set()
        for desc in manifest.descriptors:  # config first, then layers in order
            if desc.digest in seen:
                continue
            seen.add(desc.digest)
            result.blobs_total += 1
            pusher.blob(desc.digest, desc.size)
        _emit(progress, status="pushing manifest")
        pusher.manifest(manifest)
        if opts.index is not False:
            _push_index(client, st, target, manifest, opts, progress, result)
    result.seconds = time.monotonic() - t0
    _emit(progress, status="success")
    return result
