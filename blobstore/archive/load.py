"""Import an OCI image layout in one verified pass (spec/archive.md)."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import msgspec

from blobstore.archive.common import (
    ANNOTATION_REF_NAME,
    CHUNK,
    INDEX_CHECK,
    INDEX_DEC,
    SMALL,
    SMALL_BUDGET,
    ZSTD_MAGIC,
    ArchiveDamaged,
    ArchiveImportResult,
    ImportedModel,
    IndexDesc,
    Progress,
    SkippedEntry,
    emit,
    file_kind,
)
from blobstore.decoding import decode, decode_any
from blobstore.digest import Digest, new_hasher
from blobstore.errors import (
    DigestMismatch,
    IntegrityError,
    InvalidDigest,
    InvalidInput,
    InvalidManifest,
    InvalidName,
    SizeMismatch,
    StoreDamaged,
)
from blobstore.ingest import BlobWriter
from blobstore.lease import Lease
from blobstore.manifest import MANIFEST_MEDIA_TYPES, MAX_MANIFEST_SIZE, OCI_INDEX, Manifest
from blobstore.name import ModelName
from blobstore.store import Store
from blobstore.tarstream import (
    Readable,
    TarDamaged,
    TarReader,
)

__all__ = ["detect_archive", "import_archive"]


def _not_regular(path: Path, mode: int) -> ArchiveDamaged:
    return ArchiveDamaged(f"{path} is {file_kind(mode)}, not a regular file")


def _open_regular(path: Path) -> BinaryIO:
    """``path`` (symlinks followed) opened for reading, if it is a regular file.

    Anything else raises ArchiveDamaged naming it: a FIFO, a device, a socket, a folder,
    a symlink loop (reading a FIFO or a device could block forever or never end). The
    type is checked before the open, so no device is ever opened, and again on the open
    file (``O_NONBLOCK``, so a FIFO swapped in meanwhile cannot block the open either).
    Raises FileNotFoundError if nothing is there, OSError for other failures.
    """
    try:
        if not stat.S_ISREG(mode := os.stat(path).st_mode):
            raise _not_regular(path, mode)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ArchiveDamaged(f"{path} is a symlink loop, not a regular file") from exc
        raise
    try:
        if not stat.S_ISREG(mode := os.fstat(fd).st_mode):
            raise _not_regular(path, mode)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def detect_archive(path: Path | str) -> str | None:
    """``dir``, ``tar`` or ``tar.zst`` by content (whatever the name), else None.
    Never opens anything but a regular file (a FIFO could block forever)."""
    p = Path(path)
    if p.is_dir():  # (an oci-layout that is not a regular file is damage, found later)
        return "dir" if os.path.lexists(p / "oci-layout") else None
    try:
        with _open_regular(p) as f:
            head = f.read(512)
    except (OSError, ArchiveDamaged):
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
        self.have: dict[Digest, int] = {}     # verified (in the store or in ``small``):
                                              # its size
        self.damaged: dict[Digest, str] = {}
        self.index: bytes | None = None
        self.index_check: bytes | None = None
        self.layout_seen = False
        self.members: set[str] = set()      # names of the top-level members seen

    def blob(self, digest: Digest, size: int, read: Callable[[int], bytes]) -> None:
        """Take one blob of ``size`` bytes from ``read``; hash, and keep or commit if the
        bytes verify (their digest, and exactly ``size`` of them)."""
        status = f"importing {digest.short}"
        present = self.store.has_blob(digest, size)  # (another size: damaged, replaced)
        if size <= SMALL and self.small_bytes + size <= SMALL_BUDGET and not present:
            data = _read_all(read, size)
            self.result.bytes_read += len(data)
            if len(data) != size:
                self.damaged[digest] = SizeMismatch(str(digest), size, len(data),
                                                    source=self.source).message
                return
            actual = Digest.of_bytes(data, digest.algorithm)
            if actual != digest:
                self.damaged[digest] = DigestMismatch(digest, actual, source=self.source).message
                return
            self.small[digest] = data
            self.small_bytes += size
            self.have[digest] = size
            return
        if present:
            self.lease.add(digests={digest})  # GC keeps it from now on
            h = new_hasher(digest.algorithm)
            done = 0
            while chunk := read(CHUNK):
                h.update(chunk)
                done += len(chunk)
            self.result.bytes_read += done
            if h.hexdigest() != digest.hex or done != size:
                self.damaged[digest] = DigestMismatch(
                    digest, f"{digest.algorithm}:{h.hexdigest()}", source=self.source).message
                return
            self.have[digest] = size
            self.result.blobs_present += 1
            emit(self.progress, status=status, digest=str(digest), total=size,
                 completed=size)
            return
        try:
            with BlobWriter(self.store.layout, expected=digest, expected_size=size,
                            source=self.source, lease=self.lease) as w:
                done = 0
                last = 0.0
                while chunk := read(CHUNK):
                    w.write(chunk)
                    done += len(chunk)
                    now = time.monotonic()
                    if now - last > 0.25:
                        last = now
                        emit(self.progress, status=status, digest=str(digest), total=size,
                             completed=done)
                self.result.bytes_read += done
                w.commit()
        except IntegrityError as exc:  # digest or size mismatch: the member is damaged
            _drain(read)
            self.damaged[digest] = exc.message
            return
        self.have[digest] = size
        self.result.blobs_added += 1
        emit(self.progress, status=status, digest=str(digest), total=size, completed=size)

    def file(self, name: str, size: int, read: Callable[[int], bytes]) -> None:
        """One member of the layout, by its path."""
        name = name.removeprefix("./")
        self.members.add(name.split("/", 1)[0])
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
                    doc = decode_any(data)
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
            self._not_oci()
        if self.index is None:
            raise ArchiveDamaged(f"{self.source}: the archive has no index.json")
        if self.index_check is not None:
            want = self.index_check.strip().decode("ascii", "replace")
            if Digest.of_bytes(self.index).hex != want:
                raise ArchiveDamaged(f"{self.source}: index.json does not match "
                                     f"{INDEX_CHECK}")
        try:
            doc = decode(self.index, INDEX_DEC)
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

    def _not_oci(self) -> None:
        """No oci-layout: an OCI layout that lost it is damaged (exit 5); a tar with
        nothing of one is another kind of archive (InvalidInput, exit 4)."""
        if self.members & {"index.json", INDEX_CHECK, "blobs"}:
            raise ArchiveDamaged(f"{self.source}: not an OCI image layout (no oci-layout)")
        if "manifest.json" in self.members:  # docker save, skopeo's docker-archive:
            raise InvalidInput(
                f"{self.source} is a docker-archive (docker save), not an OCI image layout",
                hint=f"convert it: skopeo copy docker-archive:{self.source} "
                     f"oci-archive:OUT.tar")
        raise InvalidInput(f"{self.source} is a tar archive but not an OCI image layout "
                           "(no oci-layout, index.json or blobs/)")

    def _model(self, desc: IndexDesc, ref: str, name: ModelName | None) -> None:
        """Import one index entry, or list it as skipped: as no model blobctl imports
        (no or a bad name, another media type, a digest it cannot verify: decided by
        the entry alone), or as damaged (exit 5: the manifest, or a blob it names, is
        missing, damaged, or disagrees with its descriptor)."""
        label = ref or desc.digest
        skip = self.result.skipped
        try:
            target = name if name is not None else _model_name(ref)
        except InvalidName as exc:
            skip.append(SkippedEntry(label, exc.message, "bad-name" if ref else "no-name"))
            return
        if desc.mediaType not in MANIFEST_MEDIA_TYPES:
            skip.append(SkippedEntry(label, f"media type {desc.mediaType} is not an image "
                                            f"manifest", "not-a-model"))
            return
        try:
            digest = Digest.parse(desc.digest)
        except InvalidDigest as exc:
            skip.append(SkippedEntry(label, exc.message, "not-a-model"))
            return
        manifest = self._checked(desc, digest)
        if isinstance(manifest, str):
            skip.append(SkippedEntry(label, manifest, "damaged"))
            return
        # GC keeps them from now on: one lease update for the model, not one per blob
        self.lease.add(digests={d.digest for d in manifest.descriptors})
        for d in manifest.descriptors:
            data = self.small.get(d.digest)
            if data is not None and not self.store.has_blob(d.digest, d.size):
                with BlobWriter(self.store.layout, expected=d.digest, expected_size=len(data),
                                source=self.source, lease=self.lease) as w:
                    w.write(data)
                    w.commit()
                self.result.blobs_added += 1
        try:
            self.store.put_manifest(target, manifest)
        except StoreDamaged as exc:  # a blob vanished (removed by hand meanwhile)
            skip.append(SkippedEntry(label, exc.message, "damaged"))
            self.damaged.setdefault(digest, exc.message)
            return
        self.result.models.append(ImportedModel(self.store.canonical_name(target),
                                                manifest.digest, manifest.size))

    def _checked(self, desc: IndexDesc, digest: Digest) -> Manifest | str:
        """The entry's manifest, if it and every blob it names verified at the sizes
        its descriptors give; else why not (recorded in ``damaged``)."""
        if digest in self.damaged:
            return self.damaged[digest]
        raw = self._manifest_bytes(digest)
        if isinstance(raw, str):
            return self.damaged.setdefault(digest, raw)
        try:
            manifest = Manifest.decode(raw, source=f"{self.source}:{digest}")
        except InvalidManifest as exc:  # it verified: the archive holds a broken model
            return self.damaged.setdefault(digest, exc.message)
        if manifest.media_type != desc.mediaType or len(raw) != desc.size:
            self.damaged.setdefault(digest, "index.json disagrees with the manifest")
            return "index.json disagrees with the manifest's media type or size"
        for d in manifest.descriptors:
            if d.digest in self.damaged:
                return self.damaged[d.digest]
            size = self.have.get(d.digest)
            if size is not None and size != d.size:
                # (the bytes verified, so no blob of the manifest's size can exist)
                return self.damaged.setdefault(
                    digest, f"manifest {digest} names blob {d.digest} with {d.size} bytes; "
                            f"the archive's has {size}")
            if size is None and not self.store.has_blob(d.digest, d.size):
                self.damaged.setdefault(d.digest, f"blob {d.digest} is missing")
                return f"blob {d.digest} is not in the archive"
        return manifest

    def _manifest_bytes(self, digest: Digest) -> bytes | str:
        """A manifest's verified bytes, or why there are none."""
        data = self.small.get(digest)
        if data is not None:
            return data
        if digest in self.have or self.store.has_blob(digest):
            path = self.store.blob_path(digest)
            if (size := path.stat().st_size) > MAX_MANIFEST_SIZE:
                return (f"manifest {digest} has {size} bytes, more than a manifest may "
                        f"({MAX_MANIFEST_SIZE})")
            return path.read_bytes()
        return f"manifest {digest} is not in the archive"


def _model_name(ref: str) -> ModelName:
    if not ref:
        raise InvalidName(ref, "no org.opencontainers.image.ref.name annotation")
    if "/" not in ref and ":" not in ref:
        raise InvalidName(ref, "a bare tag is not a model name (want host/ns/repo:tag)")
    return ModelName.parse(ref)


def _read_all(read: Callable[[int], bytes], size: int) -> bytes:
    parts = []
    while chunk := read(min(CHUNK, size)):
        parts.append(chunk)
    return b"".join(parts)


def _drain(read: Callable[[int], bytes]) -> None:
    while read(CHUNK):
        pass


def _zstd_errors(fmt: str) -> tuple[type[Exception], ...]:
    if fmt != "tar.zst":
        return ()
    import zstandard

    return (zstandard.ZstdError,)


@contextlib.contextmanager
def _tar_stream(path: Path, fmt: str) -> Iterator[tuple[Readable, int | None]]:
    """The tar stream of ``path`` and its length when known (a plain tar)."""
    with _open_regular(path) as f:
        if fmt == "tar":
            yield f, os.fstat(f.fileno()).st_size
            return
        import zstandard

        dctx = zstandard.ZstdDecompressor()
        with dctx.stream_reader(f, read_across_frames=True, closefd=False) as z:
            yield z, None


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
    Entries that are no model (no or a bad name, another media type) are listed in
    ``result.skipped``. Raises ArchiveDamaged (with ``.result``) if any member was
    damaged or missing, or a model's manifest does not decode or disagrees with its
    blobs (those models are listed with kind ``damaged`` and not written; a damaged tar
    structure or zstd stream stops the import before any manifest is written),
    InvalidInput for something that is not an archive or not an OCI layout (e.g. a
    docker-archive).
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
            try:
                _import_dir(imp, path)
            except ArchiveDamaged as exc:
                exc.result = result
                raise
        else:
            try:
                with _tar_stream(path, fmt) as (stream, length):
                    reader = TarReader(stream, source=str(path), length=length)
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
    if result.models:  # (none: the caller says so; "success" before its error misled)
        emit(progress, status="success")
    return result


def _import_dir(imp: _Importer, path: Path) -> None:
    """A folder layout: read the index, then only the blobs it reaches. Only regular
    files are read: ``oci-layout`` or an index that is anything else is damage to the
    layout (raised), a blob that is anything else is a damaged blob."""
    for meta in ("oci-layout", INDEX_CHECK, "index.json"):
        try:
            f = _open_regular(path / meta)
        except FileNotFoundError:
            continue  # finish() says what is missing (index.json.sha256 is optional)
        with f:
            imp.file(meta, os.fstat(f.fileno()).st_size, f.read)
    if imp.index is None:
        return
    try:
        doc = decode(imp.index, INDEX_DEC)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return  # finish() reports it
    sizes: dict[Digest, set[int]] = {}  # every blob reached, and the sizes it is named at

    def want(digest: Digest, size: int) -> None:
        sizes.setdefault(digest, set()).add(size)

    for desc in doc.manifests:
        with contextlib.suppress(InvalidDigest):
            want(Digest.parse(desc.digest), desc.size)
    for d in list(sizes):  # the manifests first: they say which blobs to read
        _dir_blob(imp, path, d, sizes[d])
        raw = imp.small.get(d)
        if raw is not None:
            with contextlib.suppress(InvalidManifest):
                for x in Manifest.decode(raw).descriptors:
                    want(x.digest, x.size)
    for d, named in sizes.items():
        if d not in imp.have and d not in imp.damaged:
            _dir_blob(imp, path, d, named)


def _dir_blob(imp: _Importer, path: Path, d: Digest, sizes: set[int]) -> None:
    """Read one blob file of a folder layout, if its size is one its descriptors name.
    A file of another size is a damaged blob, refused before a byte of it is read (a
    sparse file could be terabytes), and never more than its size + 1 bytes are read
    (one that grows meanwhile is a size mismatch)."""
    file = path / "blobs" / d.algorithm / d.hex
    try:
        f = _open_regular(file)
    except FileNotFoundError:
        return  # missing: the models that need it are refused at the end
    except ArchiveDamaged as exc:
        imp.damaged[d] = exc.message
        return
    with f:
        actual = os.fstat(f.fileno()).st_size
        if actual not in sizes:
            imp.damaged[d] = SizeMismatch(str(d), min(sizes), actual,
                                          source=str(file)).message
            return
        imp.blob(d, actual, _bounded(f, actual + 1))


def _bounded(f: BinaryIO, limit: int) -> Callable[[int], bytes]:
    """``f.read`` that ends after ``limit`` bytes in all."""
    left = limit

    def read(n: int) -> bytes:
        nonlocal left
        data = f.read(min(n, left)) if left > 0 else b""
        left -= len(data)
        return data

    return read
