"""Models as OCI image layouts: folder, ``.tar`` or ``.tar.zst`` (spec/archive.md).

Export writes ``oci-layout``, ``blobs/<alg>/<hex>`` (each blob once, manifests
included, bytes unchanged) and ``index.json`` with one descriptor per model: the
manifest's own media type, digest and size, and the annotation
``org.opencontainers.image.ref.name`` = the full name ``host/ns/repo:tag``. blobctl
adds ``index.json.sha256`` (the digest of ``index.json``), so that a damaged index is
refused like any damaged blob. Archives are written streaming (memory flat in model
size) to a temp name next to the target and renamed into place when complete.

Import (:func:`import_archive`) takes one pass over an archive: every blob is hashed
while it is read and committed with the store's writer only when it verifies; small
members (manifests, configs) stay in memory until ``index.json`` says what they are.
Manifests are written at the end, each only when every blob it names is present and
verified. Damage to a member's data skips the models that use it; damage to the tar
structure or the zstd stream stops the import before any manifest is written. Either
way :class:`ArchiveDamaged` (an ``IntegrityError``) is raised at the end, carrying the
result of what was imported.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import msgspec

from blobstore.digest import Digest, new_hasher
from blobstore.errors import (
    DigestMismatch,
    IntegrityError,
    InvalidDigest,
    InvalidInput,
    InvalidManifest,
    InvalidName,
    StoreDamaged,
)
from blobstore.ingest import BlobWriter, check_free_space
from blobstore.layout import fsync_dir
from blobstore.lease import Lease
from blobstore.manifest import MANIFEST_MEDIA_TYPES, MAX_MANIFEST_SIZE, OCI_INDEX, Manifest
from blobstore.name import ModelName
from blobstore.store import Store
from blobstore.tarstream import (
    Readable,
    TarDamaged,
    TarReader,
    copy_range,
    tar_header,
    tar_padding,
    tar_trailer,
)

__all__ = [
    "ANNOTATION_REF_NAME",
    "ArchiveDamaged",
    "ArchiveImportResult",
    "ExportResult",
    "ImportedModel",
    "SkippedEntry",
    "detect_archive",
    "export_models",
    "import_archive",
]

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
OCI_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
INDEX_CHECK = "index.json.sha256"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_SMALL = 4 << 20              # members up to this size wait in memory for index.json
_SMALL_BUDGET = 256 << 20     # ... up to this many bytes in all
_CHUNK = 1 << 20

Progress = Callable[[dict[str, Any]], None]


class ArchiveDamaged(IntegrityError):
    """An archive (or the models in it) failed verification; ``result`` says what was
    imported anyway (models whose every blob verified)."""

    def __init__(self, message: str, result: ArchiveImportResult | None = None) -> None:
        super().__init__(message, hint="the archive was changed or truncated; copy it again")
        self.result = result


@dataclass
class ExportResult:
    path: Path
    format: str                     # "dir", "tar" or "tar.zst"
    models: list[tuple[ModelName, Digest]]
    blobs: int = 0
    bytes_in: int = 0               # blob bytes read from the store
    bytes_out: int = 0              # bytes written (compressed for tar.zst)
    seconds: float = 0.0


@dataclass
class ImportedModel:
    name: ModelName
    digest: Digest
    size: int


@dataclass
class SkippedEntry:
    ref: str                        # the name in index.json (or the descriptor digest)
    reason: str
    damaged: bool = False           # refused for a damaged or missing blob


@dataclass
class ArchiveImportResult:
    format: str
    models: list[ImportedModel] = field(default_factory=list)
    skipped: list[SkippedEntry] = field(default_factory=list)
    blobs_added: int = 0
    blobs_present: int = 0
    bytes_read: int = 0
    seconds: float = 0.0


class _IndexDesc(msgspec.Struct):
    mediaType: str
    digest: str
    size: int
    annotations: dict[str, str] | None = None


class _IndexDoc(msgspec.Struct):
    schemaVersion: int
    manifests: list[_IndexDesc]
    mediaType: str = ""


_INDEX_DEC = msgspec.json.Decoder(_IndexDoc)


def _emit(progress: Progress | None, **event: Any) -> None:
    if progress is not None:
        progress(event)


# ====================================================================== export
def _export_format(dest: Path, fmt: str | None, as_dir: bool) -> str:
    if fmt is not None:
        if fmt not in ("dir", "tar", "tar.zst"):
            raise InvalidInput(f"unknown archive format {fmt!r}", hint="dir, tar or tar.zst")
        return fmt
    name = dest.name.lower()
    if as_dir or dest.is_dir():
        return "dir"
    if name.endswith((".tar.zst", ".tzst")):
        return "tar.zst"
    if name.endswith(".tar"):
        return "tar"
    raise InvalidInput(f"cannot tell the archive format from {dest.name!r}",
                       hint="name it FILE.tar or FILE.tar.zst, or DIR/ for a folder")


def _index_bytes(entries: list[tuple[ModelName, Manifest]]) -> bytes:
    doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": m.media_type, "digest": str(m.digest), "size": len(m.raw),
         "annotations": {ANNOTATION_REF_NAME: str(n)}} for n, m in entries]}
    return msgspec.json.encode(doc)


class _TarSink:
    """Writes tar members to a file descriptor, optionally through zstd."""

    def __init__(self, fd: int, zstd: bool, level: int) -> None:
        self.fd = fd
        self.written = 0  # uncompressed tar bytes
        self._z: Any = None
        self._file: BinaryIO | None = None
        if zstd:
            import zstandard

            self._file = os.fdopen(os.dup(fd), "wb", buffering=0)
            cctx = zstandard.ZstdCompressor(level=level, threads=-1, write_checksum=True)
            self._z = cctx.stream_writer(self._file, closefd=False)

    def write(self, data: bytes) -> None:
        if self._z is not None:
            self._z.write(data)
        else:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
        self.written += len(data)

    def member(self, name: str, src_fd: int | None, size: int, data: bytes = b"",
               is_dir: bool = False, tick: Callable[[int], None] | None = None) -> None:
        self.write(tar_header(name, size, is_dir=is_dir))
        if src_fd is None:
            self.write(data)
        elif self._z is None:
            copy_range(src_fd, self.fd, size)
            self.written += size
        else:
            done = 0
            buf = bytearray(_CHUNK)
            while done < size:
                n = os.readv(src_fd, [buf])
                if n <= 0:
                    raise OSError(f"blob shrank while it was exported: {name}")
                n = min(n, size - done)
                self._z.write(memoryview(buf)[:n])
                done += n
                self.written += n
                if tick is not None:
                    tick(done)
        if not is_dir:
            self.write(tar_padding(size))

    def close(self) -> None:
        self.write(tar_trailer(self.written))
        if self._z is not None:
            self._z.close()
        if self._file is not None:
            self._file.close()


def export_models(
    store: Store,
    names: Sequence[ModelName],
    dest: Path | str,
    *,
    format: str | None = None,
    zstd_level: int = 3,
    progress: Progress | None = None,
) -> ExportResult:
    """Write the models ``names`` as an OCI image layout at ``dest``.

    ``format``: ``dir``, ``tar`` or ``tar.zst``; by default from ``dest`` (``.tar``,
    ``.tar.zst``, an existing folder or a path given with a trailing ``/`` → ``dir``).
    A file is written under a temp name next to ``dest`` and renamed when complete; a
    folder gets ``index.json`` last. Raises ModelNotFound, StoreDamaged (a blob of a
    model is missing) and InvalidInput (unknown format, a non-empty folder). Blobs are
    copied as stored: ``blobctl verify`` checks them, and every importer re-hashes them.
    ``progress`` receives ``{"status": "exporting <12 hex>", "digest", "total",
    "completed"}`` events.
    """
    t0 = time.monotonic()
    as_dir = str(dest).endswith(("/", os.sep))
    dest = Path(dest).expanduser().absolute()
    fmt = _export_format(dest, format, as_dir)
    entries: list[tuple[ModelName, Manifest]] = []
    seen: set[ModelName] = set()
    for n in names:
        canonical = store.canonical_name(n)
        if canonical in seen:
            continue
        seen.add(canonical)
        m = store.get_manifest(canonical)
        missing = store.missing_blobs(m)
        if missing:
            raise StoreDamaged(canonical.display(), [str(d) for d in missing])
        entries.append((canonical, m))
    if not entries:
        raise InvalidInput("no model to export")
    blobs: dict[Digest, tuple[int, bytes | None]] = {}  # digest -> (size, manifest bytes)
    for _, m in entries:
        blobs.setdefault(m.digest, (len(m.raw), m.raw))
        for d in m.descriptors:
            blobs.setdefault(d.digest, (d.size, None))
    result = ExportResult(dest, fmt, [(n, m.digest) for n, m in entries], blobs=len(blobs))
    index = _index_bytes(entries)
    with Lease(store.layout, f"export {dest.name}", digests=set(blobs)):
        if fmt == "dir":
            _export_dir(store, dest, blobs, index, result, progress)
        else:
            _export_tar(store, dest, fmt, zstd_level, blobs, index, result, progress)
    result.seconds = time.monotonic() - t0
    _emit(progress, status="success")
    return result


def _open_blob_fd(store: Store, digest: Digest, size: int) -> int:
    fd = os.open(store.blob_path(digest), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    actual = os.fstat(fd).st_size
    if actual != size:
        os.close(fd)
        raise IntegrityError(f"blob {digest} has {actual} bytes, its manifest says {size}",
                             hint="run 'blobctl verify'")
    return fd


def _export_tar(store: Store, dest: Path, fmt: str, level: int,
                blobs: dict[Digest, tuple[int, bytes | None]], index: bytes,
                result: ExportResult, progress: Progress | None) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0),
                 0o644)
    try:
        sink = _TarSink(fd, fmt == "tar.zst", level)
        sink.member("oci-layout", None, len(OCI_LAYOUT), OCI_LAYOUT)
        sink.member("blobs/", None, 0, is_dir=True)
        for alg in sorted({d.algorithm for d in blobs}):
            sink.member(f"blobs/{alg}/", None, 0, is_dir=True)
        for d, (size, raw) in blobs.items():
            name = f"blobs/{d.algorithm}/{d.hex}"
            status = f"exporting {d.short}"

            def tick(done: int, d: Digest = d, size: int = size, status: str = status) -> None:
                _emit(progress, status=status, digest=str(d), total=size, completed=done)

            if raw is not None:
                sink.member(name, None, size, raw)
            else:
                src = _open_blob_fd(store, d, size)
                try:
                    sink.member(name, src, size, tick=tick)
                finally:
                    os.close(src)
            result.bytes_in += size
            tick(size)
        sink.member("index.json", None, len(index), index)
        check = (Digest.of_bytes(index).hex + "\n").encode()
        sink.member(INDEX_CHECK, None, len(check), check)
        sink.close()
        os.fsync(fd)
        result.bytes_out = os.fstat(fd).st_size
        os.close(fd)
        fd = -1
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _export_dir(store: Store, dest: Path, blobs: dict[Digest, tuple[int, bytes | None]],
                index: bytes, result: ExportResult, progress: Progress | None) -> None:
    if dest.exists() and any(dest.iterdir()):
        raise InvalidInput(f"{dest} is not empty", hint="export into a new or empty folder")
    check_free_space(dest.parent if not dest.exists() else dest,
                     sum(s for s, _ in blobs.values()))
    for d, (size, raw) in blobs.items():
        folder = dest / "blobs" / d.algorithm
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / d.hex
        tmp = folder / f".{d.hex}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if raw is not None:
                os.write(fd, raw)
            else:
                src = _open_blob_fd(store, d, size)
                try:
                    copy_range(src, fd, size)
                finally:
                    os.close(src)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        result.bytes_in += size
        result.bytes_out += size
        _emit(progress, status=f"exporting {d.short}", digest=str(d), total=size,
              completed=size)
    for name, data in (("oci-layout", OCI_LAYOUT),
                       (INDEX_CHECK, (Digest.of_bytes(index).hex + "\n").encode()),
                       ("index.json", index)):
        (dest / f".{name}.part").write_bytes(data)
        os.replace(dest / f".{name}.part", dest / name)
        result.bytes_out += len(data)
    for folder in {dest / "blobs" / d.algorithm for d in blobs}:
        fsync_dir(folder)
    fsync_dir(dest)


# ====================================================================== import
def detect_archive(path: Path | str) -> str | None:
    """``dir``, ``tar`` or ``tar.zst`` by content (whatever the name), else None."""
    p = Path(path)
    if p.is_dir():
        return "dir" if (p / "oci-layout").is_file() else None
    try:
        with open(p, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    if head[:4] == ZSTD_MAGIC:
        return "tar.zst"
    if len(head) == 512 and head[257:262] == b"ustar":
        return "tar"
    return None


class _Importer:
    """State of one archive import: blobs seen, small members kept, damage found."""

    def __init__(self, store: Store, lease: Lease, result: ArchiveImportResult,
                 progress: Progress | None, source: str) -> None:
        self.store = store
        self.lease = lease
        self.result = result
        self.progress = progress
        self.source = source
        self.small: dict[Digest, bytes] = {}
        self.small_bytes = 0
        self.have: set[Digest] = set()        # verified: in the store or in ``small``
        self.damaged: dict[Digest, str] = {}
        self.index: bytes | None = None
        self.index_check: bytes | None = None
        self.layout_seen = False

    def blob(self, digest: Digest, size: int, read: Callable[[int], bytes]) -> None:
        """Take one blob's bytes from ``read``; hash, and keep or commit if they verify."""
        status = f"importing {digest.short}"
        present = self.store.has_blob(digest)
        if size <= _SMALL and self.small_bytes + size <= _SMALL_BUDGET and not present:
            data = _read_all(read, size)
            self.result.bytes_read += size
            actual = Digest.of_bytes(data, digest.algorithm)
            if actual != digest:
                self.damaged[digest] = DigestMismatch(digest, actual, source=self.source).message
                return
            self.small[digest] = data
            self.small_bytes += size
            self.have.add(digest)
            return
        if present:
            h = new_hasher(digest.algorithm)
            done = 0
            while chunk := read(_CHUNK):
                h.update(chunk)
                done += len(chunk)
            self.result.bytes_read += done
            if h.hexdigest() != digest.hex:
                self.damaged[digest] = DigestMismatch(
                    digest, f"{digest.algorithm}:{h.hexdigest()}", source=self.source).message
                return
            self.lease.add(digests={digest})
            self.have.add(digest)
            self.result.blobs_present += 1
            _emit(self.progress, status=status, digest=str(digest), total=size,
                  completed=size)
            return
        try:
            with BlobWriter(self.store.layout, expected=digest, expected_size=size,
                            source=self.source, lease=self.lease) as w:
                done = 0
                last = 0.0
                while chunk := read(_CHUNK):
                    w.write(chunk)
                    done += len(chunk)
                    now = time.monotonic()
                    if now - last > 0.25:
                        last = now
                        _emit(self.progress, status=status, digest=str(digest), total=size,
                              completed=done)
                self.result.bytes_read += done
                w.commit()
        except IntegrityError as exc:  # digest or size mismatch: the member is damaged
            _drain(read)
            self.damaged[digest] = exc.message
            return
        self.have.add(digest)
        self.result.blobs_added += 1
        _emit(self.progress, status=status, digest=str(digest), total=size, completed=size)

    def file(self, name: str, size: int, read: Callable[[int], bytes]) -> None:
        """One member of the layout, by its path."""
        name = name.removeprefix("./")
        if name in ("index.json", INDEX_CHECK, "oci-layout"):
            if size > MAX_MANIFEST_SIZE:
                raise ArchiveDamaged(f"{self.source}: {name} is larger than "
                                     f"{MAX_MANIFEST_SIZE} bytes")
            data = _read_all(read, size)
            self.result.bytes_read += size
            if name == "index.json":
                self.index = data
            elif name == INDEX_CHECK:
                self.index_check = data
            else:
                try:
                    doc = msgspec.json.decode(data)
                except msgspec.DecodeError:
                    doc = None
                if doc != {"imageLayoutVersion": "1.0.0"}:
                    raise ArchiveDamaged(f"{self.source}: oci-layout is not "
                                         '{"imageLayoutVersion":"1.0.0"}')
                self.layout_seen = True
            return
        parts = name.split("/")
        if len(parts) == 3 and parts[0] == "blobs":
            try:
                digest = Digest(parts[1], parts[2])
            except InvalidDigest:
                return  # not a blob we can verify: ignored (never trusted)
            self.blob(digest, size, read)

    # ------------------------------------------------------------------ the end
    def finish(self, name: ModelName | None) -> None:
        if not self.layout_seen:
            raise ArchiveDamaged(f"{self.source}: not an OCI image layout (no oci-layout)")
        if self.index is None:
            raise ArchiveDamaged(f"{self.source}: the archive has no index.json")
        if self.index_check is not None:
            want = self.index_check.strip().decode("ascii", "replace")
            if Digest.of_bytes(self.index).hex != want:
                raise ArchiveDamaged(f"{self.source}: index.json does not match "
                                     f"{INDEX_CHECK}")
        try:
            doc = _INDEX_DEC.decode(self.index)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ArchiveDamaged(f"{self.source}: index.json does not decode: {exc}") from exc
        if doc.schemaVersion != 2 or doc.mediaType not in ("", OCI_INDEX):
            raise ArchiveDamaged(f"{self.source}: index.json is not an OCI image index")
        if name is not None and len(doc.manifests) != 1:
            raise InvalidInput(f"--name needs an archive with exactly one model; "
                               f"{self.source} has {len(doc.manifests)}")
        for desc in doc.manifests:
            ref = (desc.annotations or {}).get(ANNOTATION_REF_NAME, "")
            self._model(desc, ref, name)

    def _model(self, desc: _IndexDesc, ref: str, name: ModelName | None) -> None:
        label = ref or desc.digest
        skip = self.result.skipped
        try:
            target = name if name is not None else _model_name(ref)
        except InvalidName as exc:
            skip.append(SkippedEntry(label, exc.message))
            return
        if desc.mediaType not in MANIFEST_MEDIA_TYPES:
            skip.append(SkippedEntry(label, f"media type {desc.mediaType} is not an image "
                                            f"manifest"))
            return
        try:
            digest = Digest.parse(desc.digest)
        except InvalidDigest as exc:
            skip.append(SkippedEntry(label, exc.message))
            return
        raw = self._manifest_bytes(digest)
        if raw is None:
            reason = self.damaged.setdefault(digest,
                                             f"manifest {digest} is not in the archive")
            skip.append(SkippedEntry(label, reason, damaged=True))
            return
        try:
            manifest = Manifest.decode(raw, source=f"{self.source}:{digest}")
        except InvalidManifest as exc:
            skip.append(SkippedEntry(label, exc.message))
            return
        if manifest.media_type != desc.mediaType or len(raw) != desc.size:
            skip.append(SkippedEntry(label, "index.json disagrees with the manifest's media "
                                            "type or size", damaged=True))
            self.damaged.setdefault(digest, "index.json disagrees with the manifest")
            return
        for d in manifest.descriptors:
            if d.digest in self.damaged:
                skip.append(SkippedEntry(label, self.damaged[d.digest], damaged=True))
                return
            if d.digest not in self.have and not self.store.has_blob(d.digest):
                skip.append(SkippedEntry(label, f"blob {d.digest} is not in the archive",
                                         damaged=True))
                self.damaged.setdefault(d.digest, f"blob {d.digest} is missing")
                return
        for d in manifest.descriptors:
            self.lease.add(digests={d.digest})
            data = self.small.get(d.digest)
            if data is not None and not self.store.has_blob(d.digest):
                with BlobWriter(self.store.layout, expected=d.digest, expected_size=len(data),
                                source=self.source, lease=self.lease) as w:
                    w.write(data)
                    w.commit()
                self.result.blobs_added += 1
        try:
            self.store.put_manifest(target, manifest)
        except StoreDamaged as exc:  # a blob vanished (removed by hand meanwhile)
            skip.append(SkippedEntry(label, exc.message))
            return
        self.result.models.append(ImportedModel(self.store.canonical_name(target),
                                                manifest.digest, manifest.size))

    def _manifest_bytes(self, digest: Digest) -> bytes | None:
        if digest in self.damaged:
            return None
        data = self.small.get(digest)
        if data is not None:
            return data
        if digest in self.have or self.store.has_blob(digest):
            path = self.store.blob_path(digest)
            if path.stat().st_size <= MAX_MANIFEST_SIZE:
                return path.read_bytes()
        return None


def _model_name(ref: str) -> ModelName:
    if not ref:
        raise InvalidName(ref, "no org.opencontainers.image.ref.name annotation")
    if "/" not in ref and ":" not in ref:
        raise InvalidName(ref, "a bare tag is not a model name (want host/ns/repo:tag)")
    return ModelName.parse(ref)


def _read_all(read: Callable[[int], bytes], size: int) -> bytes:
    parts = []
    while chunk := read(min(_CHUNK, size)):
        parts.append(chunk)
    return b"".join(parts)


def _drain(read: Callable[[int], bytes]) -> None:
    while read(_CHUNK):
        pass


def _zstd_errors(fmt: str) -> tuple[type[Exception], ...]:
    if fmt != "tar.zst":
        return ()
    import zstandard

    return (zstandard.ZstdError,)


@contextlib.contextmanager
def _tar_stream(path: Path, fmt: str) -> Iterator[Readable]:
    with open(path, "rb") as f:
        if fmt == "tar":
            yield f
            return
        import zstandard

        dctx = zstandard.ZstdDecompressor()
        with dctx.stream_reader(f, read_across_frames=True, closefd=False) as z:
            yield z


def import_archive(
    store: Store,
    source: Path | str,
    *,
    name: ModelName | None = None,
    progress: Progress | None = None,
) -> ArchiveImportResult:
    """Add every model an OCI image layout (folder, ``.tar``, ``.tar.zst``) names.

    Detects the format by content. One pass; each blob is hashed while it is read and
    committed only when it verifies; a model's manifest is written only when all of its
    blobs are present and verified. ``name`` names the model of a one-model archive.
    Entries without a valid model name are listed in ``result.skipped``. Raises
    ArchiveDamaged (with ``.result``) if any member was damaged or missing (the models
    it touches are not written; a damaged tar structure or zstd stream stops the import
    before any manifest is written), InvalidInput for something that is not an archive.
    """
    t0 = time.monotonic()
    path = Path(source).expanduser()
    fmt = detect_archive(path)
    if fmt is None:
        raise InvalidInput(f"{path} is not an OCI image layout (a folder with oci-layout, "
                           f"a .tar or a .tar.zst)")
    result = ArchiveImportResult(fmt)
    with Lease(store.layout, f"import {path.name}") as lease:
        imp = _Importer(store, lease, result, progress, str(path))
        if fmt == "dir":
            _import_dir(imp, path)
        else:
            try:
                with _tar_stream(path, fmt) as stream:
                    reader = TarReader(stream, source=str(path))
                    for member in reader:
                        if member.is_file:
                            imp.file(member.name, member.size, reader.read)
            except TarDamaged as exc:
                raise ArchiveDamaged(exc.message, result) from exc
            except _zstd_errors(fmt) as exc:
                raise ArchiveDamaged(f"{path}: damaged zstd stream: {exc}", result) from exc
        try:
            imp.finish(name)
        except ArchiveDamaged as exc:
            exc.result = result
            raise
    result.seconds = time.monotonic() - t0
    if imp.damaged:
        first = next(iter(imp.damaged.values()))
        raise ArchiveDamaged(
            f"{path}: {len(imp.damaged)} damaged or missing blob(s) ({first}); "
            f"{len(result.models)} model(s) imported, "
            f"{sum(1 for s in result.skipped if s.damaged)} refused",
            result)
    _emit(progress, status="success")
    return result


def _import_dir(imp: _Importer, path: Path) -> None:
    """A folder layout: read the index, then only the blobs it reaches."""
    for meta in ("oci-layout", INDEX_CHECK, "index.json"):
        p = path / meta
        if p.is_file():
            with open(p, "rb") as f:
                imp.file(meta, os.fstat(f.fileno()).st_size, f.read)
    if imp.index is None:
        return
    try:
        doc = _INDEX_DEC.decode(imp.index)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return  # finish() reports it
    wanted: list[Digest] = []
    for desc in doc.manifests:
        with contextlib.suppress(InvalidDigest):
            wanted.append(Digest.parse(desc.digest))
    for d in list(wanted):  # the manifests first: they say which blobs to read
        _dir_blob(imp, path, d)
        raw = imp.small.get(d)
        if raw is not None:
            with contextlib.suppress(InvalidManifest):
                wanted.extend(x.digest for x in Manifest.decode(raw).descriptors)
    done: set[Digest] = set()
    for d in wanted:
        if d not in done and d not in imp.have and d not in imp.damaged:
            _dir_blob(imp, path, d)
        done.add(d)


def _dir_blob(imp: _Importer, path: Path, d: Digest) -> None:
    p = path / "blobs" / d.algorithm / d.hex
    with contextlib.suppress(FileNotFoundError, IsADirectoryError), open(p, "rb") as f:
        st = os.fstat(f.fileno())
        if stat.S_ISREG(st.st_mode):
            imp.blob(d, st.st_size, f.read)
