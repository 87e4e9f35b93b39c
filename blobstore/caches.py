"""One copy on disk shared with other tools: HF-cache adoption and link farms
(spec/caches.md).

:func:`adopt_hf_cache` turns the GGUF files of a Hugging Face hub cache
(``models--ORG--REPO/snapshots/<rev>/<file>``, symlinks into ``blobs/<sha256 hex>``)
into models ``hf.co/ORG/REPO:<quant>``, built as ``ollama create`` builds a model from
a GGUF. Each file is hardlinked into the store (copied across filesystems) and hashed
once, from the store's own link, before it gets its digest name: a file whose content
does not match its sha256 name is skipped and named, the rest is adopted.

Link farms (the reverse: a folder of links to models' GGUF blobs) live in
:mod:`blobstore.linkfarm`; their names are re-exported here.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blobstore.digest import Digest
from blobstore.errors import (
    BlobctlError,
    GGUFError,
    IntegrityError,
    InvalidInput,
    InvalidName,
)
from blobstore.gguf import GGUFInfo, read_gguf
from blobstore.ingest import BlobWriter, hash_file, link_in
from blobstore.lease import Lease
from blobstore.linkfarm import LinkEntry, link_models, prune_links
from blobstore.manifest import LAYER_MODEL, LAYER_PROJECTOR, Descriptor, Manifest
from blobstore.name import ModelName
from blobstore.store import Store

__all__ = [
    "AdoptResult",
    "AdoptedModel",
    "CacheDamaged",
    "LinkEntry",
    "SkippedFile",
    "adopt_hf_cache",
    "default_hf_cache",
    "link_models",
    "prune_links",
    "quant_from_filename",
]

Progress = Callable[[dict[str, Any]], None]

_SPLIT = re.compile(r"^(?P<base>.+)-(?P<part>\d{5})-of-(?P<total>\d{5})\.gguf$",
                    re.I | re.ASCII)
_QUANT = re.compile(
    r"(?<![A-Za-z0-9])(?P<q>(?:I?Q\d+(?:_[A-Z0-9]{1,4})*)|BF16|F16|F32|FP16|FP32|MXFP4)"
    r"(?![A-Za-z0-9])", re.I | re.ASCII)
_HEX64 = re.compile(r"^[0-9a-f]{64}$", re.I | re.ASCII)
_TAG_BAD = re.compile(r"[^A-Za-z0-9_.-]")


class CacheDamaged(IntegrityError):
    """Some cache files did not match their sha256 names; ``result`` has the rest."""

    def __init__(self, message: str, result: AdoptResult) -> None:
        super().__init__(message, hint="the Hugging Face cache is damaged: delete the named "
                                       "files (or run 'huggingface-cli download' again)")
        self.result = result


@dataclass
class AdoptedModel:
    name: ModelName
    digest: Digest          # of the manifest
    size: int
    files: list[Path]       # the snapshot files, in layer order
    linked: bool            # every layer hardlinked (else some were copied)


@dataclass
class SkippedFile:
    file: Path
    reason: str
    damaged: bool = False


@dataclass
class AdoptResult:
    cache: Path
    models: list[AdoptedModel] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    bytes_hashed: int = 0
    seconds: float = 0.0


def default_hf_cache() -> Path:
    """``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def quant_from_filename(filename: str) -> str:
    """The quantisation as written in a GGUF file name (``Q4_K_M``), else the stem.

    The last quantisation-looking token wins; a split suffix (``-00001-of-00003``) is
    ignored. The result is made a valid tag (other characters become ``-``).
    """
    m = _SPLIT.match(filename)
    stem = m.group("base") if m else re.sub(r"\.gguf$", "", filename, flags=re.I)
    found = list(_QUANT.finditer(stem))
    tag = found[-1].group("q") if found else stem
    tag = _TAG_BAD.sub("-", tag).lstrip(".-")[:80]
    return tag or "latest"


def _emit(progress: Progress | None, **event: Any) -> None:
    if progress is not None:
        progress(event)


# ====================================================================== adoption
@dataclass
class _Candidate:
    name: ModelName
    files: list[Path]          # snapshot paths in part order
    rev: str
    infos: list[GGUFInfo]      # of each file


def _revisions(repo: Path) -> list[Path]:
    snaps = repo / "snapshots"
    try:
        revs = [p for p in snaps.iterdir() if p.is_dir()]
    except OSError:
        return []
    main = None
    with contextlib.suppress(OSError):
        main = (repo / "refs" / "main").read_text().strip()
    revs.sort(key=lambda p: (p.name != main, -p.stat().st_mtime))
    return revs


def _snapshot_groups(rev: Path, result: AdoptResult) -> list[list[Path]]:
    """The GGUF files of one snapshot: single files, and complete split sets in part
    order (an incomplete set is skipped)."""
    singles: list[Path] = []
    splits: dict[tuple[Path, str, int], dict[int, Path]] = {}
    for path in sorted(rev.rglob("*")):
        if not path.name.lower().endswith(".gguf"):
            continue
        m = _SPLIT.match(path.name)
        if m:
            key = (path.parent, m.group("base"), int(m.group("total")))
            splits.setdefault(key, {})[int(m.group("part"))] = path
        else:
            singles.append(path)
    groups: list[list[Path]] = [[p] for p in singles]
    for (_, _, total), parts in splits.items():
        if sorted(parts) != list(range(1, total + 1)):
            first = parts[min(parts)]
            result.skipped.append(SkippedFile(
                first, f"incomplete split GGUF ({len(parts)} of {total} parts)"))
            continue
        groups.append([parts[i] for i in range(1, total + 1)])
    return groups


def _not_a_model(path: Path, info: GGUFInfo | None) -> str | None:
    """Why a GGUF is not adopted as a model (spec/caches.md: adapters and projectors are
    skipped), else None. A projector is known by ``general.type`` (``mmproj``,
    ``projector``), architecture ``clip``, or an ``mmproj`` file name."""
    if path.name.lower().startswith("mmproj") or (info is not None and info.is_projector):
        return "a vision projector, not a model (projectors are not adopted)"
    if info is not None and info.is_adapter:
        return "a LoRA adapter, not a model"
    return None


def _candidates(cache: Path, result: AdoptResult) -> list[_Candidate]:
    """One candidate per model name; every GGUF file not chosen is in ``result.skipped``.

    A name is settled by the snapshot ``refs/main`` names, else the newest one that has
    it: the same name in older snapshots is skipped as superseded, and two model files
    of one name in that snapshot are a conflict (both skipped, neither is chosen).
    """
    out: dict[ModelName, _Candidate] = {}
    settled: dict[ModelName, Path] = {}  # name -> the file of the snapshot that has it
    try:
        repos = sorted(p for p in cache.iterdir() if p.name.startswith("models--"))
    except OSError as exc:
        raise InvalidInput(f"cannot read the Hugging Face cache {cache}: "
                           f"{exc.strerror or exc}") from exc
    for repo in repos:
        org, _, name = repo.name[len("models--"):].partition("--")
        for rev in _revisions(repo):
            found: dict[ModelName, list[_Candidate]] = {}
            for files in _snapshot_groups(rev, result):
                if (why := _not_a_model(files[0], None)) is not None:
                    result.skipped.append(SkippedFile(files[0], why))
                    continue
                try:
                    model = ModelName("hf.co", org, name, quant_from_filename(files[0].name))
                except InvalidName as exc:
                    result.skipped.append(SkippedFile(files[0], exc.message))
                    continue
                try:
                    infos = [read_gguf(p) for p in files]
                except GGUFError as exc:
                    result.skipped.append(SkippedFile(files[0], exc.message))
                    settled.setdefault(model, files[0])  # unusable, but the newest
                    continue
                if (why := _not_a_model(files[0], infos[0])) is not None:
                    result.skipped.append(SkippedFile(files[0], why))
                    continue
                found.setdefault(model, []).append(_Candidate(model, files, rev.name, infos))
            for model, cands in found.items():
                if model in settled:
                    for c in cands:
                        result.skipped.append(SkippedFile(c.files[0], (
                            f"{model.display()} comes from {settled[model]} (the "
                            "snapshot refs/main names, else the newest)")))
                    continue
                settled[model] = cands[0].files[0]
                if len(cands) > 1:
                    both = ", ".join(c.files[0].name for c in cands)
                    for c in cands:
                        result.skipped.append(SkippedFile(c.files[0], (
                            f"{len(cands)} files would be {model.display()} ({both}); "
                            "import the one you want: blobctl import FILE --name REF")))
                    continue
                out[model] = cands[0]
    return list(out.values())


def _named_digest(real: Path) -> Digest | None:
    """The sha256 a cache blob's name claims (``blobs/<64 hex>``, any case), else None (a
    plain snapshot file, a git blob's 40-hex sha1 name)."""
    return Digest("sha256", real.name.lower()) if _HEX64.match(real.name) else None


def _link_or_copy(store: Store, path: Path, lease: Lease,
                  result: AdoptResult) -> tuple[Digest, int, bool]:
    """Put one cache file in the store, verified against its sha256 blob name."""
    real = path.resolve()
    expected = _named_digest(real)
    if expected is not None and store.has_blob(expected, real.stat().st_size):
        lease.add(digests={expected})
        existing = store.blob_path(expected)
        return expected, existing.stat().st_size, os.path.samefile(existing, real)
    # the store's own link is hashed: what gets the name, whatever the cache does
    digest = link_in(store.layout, real, expected=expected, lease=lease, source=str(path))
    if digest is not None:
        size = store.blob_path(digest).stat().st_size
        result.bytes_hashed += size
        return digest, size, True
    # another filesystem: a verified copy, hashed while copying
    with open(real, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        with BlobWriter(store.layout, expected=expected, expected_size=size,
                        source=str(path), lease=lease) as w:
            w.copy_from(f)
            digest = w.commit()
    result.bytes_hashed += size
    return digest, size, False


def adopt_hf_cache(
    store: Store,
    cache: Path | str | None = None,
    *,
    mode: str = "hardlink",
    progress: Progress | None = None,
) -> AdoptResult:
    """Adopt every GGUF model of a Hugging Face hub cache into ``store``.

    ``cache`` defaults to :func:`default_hf_cache`. ``mode``: ``hardlink`` (falls back
    to a verified copy across filesystems) or ``copy``. Idempotent. Every GGUF file is
    either adopted or listed in ``result.skipped`` with its reason: adapters and
    projectors (never a model layer), older revisions of a name, two files for one name
    in a snapshot (a conflict: neither is adopted), unreadable files; files whose
    content does not match their sha256 name are skipped too, and then
    :class:`CacheDamaged` (exit 5) is raised at the end with the
    result of what was adopted. ``progress`` receives ``{"status": "adopting <file>",
    "total", "completed"}`` events.
    """
    if mode not in ("hardlink", "copy"):
        raise InvalidInput(f"unknown adoption mode {mode!r}", hint="hardlink or copy")
    t0 = time.monotonic()
    root = Path(cache).expanduser() if cache is not None else default_hf_cache()
    if not root.is_dir():
        raise InvalidInput(f"no Hugging Face cache at {root}",
                           hint="pass the folder: blobctl import --hf-cache DIR")
    result = AdoptResult(root)
    with Lease(store.layout, f"adopt {root}") as lease:
        for cand in _candidates(root, result):
            _adopt_one(store, cand, mode, lease, result, progress)
    result.seconds = time.monotonic() - t0
    damaged = [s for s in result.skipped if s.damaged]
    if damaged:
        raise CacheDamaged(f"{len(damaged)} file(s) in {root} do not match their sha256 "
                           f"names (first: {damaged[0].file}); {len(result.models)} "
                           f"model(s) adopted", result)
    _emit(progress, status="success")
    return result


def _adopt_one(store: Store, cand: _Candidate, mode: str, lease: Lease,
               result: AdoptResult, progress: Progress | None) -> None:
    infos = cand.infos
    info: GGUFInfo = infos[0]
    if store.has_model(cand.name) and _already(store, cand, mode, lease, result, progress):
        return
    layers: list[Descriptor] = []
    linked = True
    for path in cand.files:
        placed = _place_reported(store, path, mode, lease, result, progress)
        if placed is None:
            return
        digest, size, ok = placed
        linked = linked and ok
        layers.append(Descriptor(mediaType=LAYER_MODEL, digest=digest, size=size))
    from blobstore.importer import write_model

    manifest = write_model(store, cand.name, info, layers, lease,
                           parameter_count=sum(i.parameter_count for i in infos))
    result.models.append(AdoptedModel(store.canonical_name(cand.name), manifest.digest,
                                      manifest.size, cand.files, linked))


def _place(store: Store, path: Path, mode: str, lease: Lease,
           result: AdoptResult) -> tuple[Digest, int, bool]:
    """Put one cache file in the store (linked, else copied; verified against its sha256
    blob name): (digest, size, hardlinked). Raises IntegrityError, OSError."""
    if mode != "copy":
        return _link_or_copy(store, path, lease, result)
    with open(path, "rb") as f:
        total = os.fstat(f.fileno()).st_size
        digest = store.put_blob(f, expected=_named_digest(path.resolve()), size=total,
                                source=str(path), lease=lease)
    result.bytes_hashed += total
    return digest, total, False


def _place_reported(store: Store, path: Path, mode: str, lease: Lease, result: AdoptResult,
                    progress: Progress | None) -> tuple[Digest, int, bool] | None:
    """:func:`_place` with progress events; None when the file is skipped (its reason in
    ``result.skipped``: content that does not match its name, an unreadable file)."""
    total = path.stat().st_size
    _emit(progress, status=f"adopting {path.name}", total=total, completed=0)
    try:
        placed = _place(store, path, mode, lease, result)
    except IntegrityError as exc:
        result.skipped.append(SkippedFile(path, exc.message, damaged=True))
        return None
    except OSError as exc:
        result.skipped.append(SkippedFile(path, f"cannot read: {exc.strerror or exc}"))
        return None
    _emit(progress, status=f"adopting {path.name}", total=total, completed=total)
    return placed


def _is_adoption(existing: Manifest, cand: _Candidate, have: list[Descriptor]) -> bool:
    """Whether ``existing`` is exactly the manifest adopting these files writes (its
    bytes: a pulled model with the same GGUF has another config and other layers)."""
    from blobstore.importer import gguf_manifest

    layers = [Descriptor(mediaType=LAYER_MODEL, digest=d.digest, size=d.size) for d in have]
    _, built = gguf_manifest(cand.infos[0], layers,
                             sum(i.parameter_count for i in cand.infos))
    return built.raw == existing.raw


def _already(store: Store, cand: _Candidate, mode: str, lease: Lease, result: AdoptResult,
             progress: Progress | None) -> bool:
    """True if ``cand.name`` exists and is settled here, never replaced: the same files,
    all present (reported as is); the same files as its model layers but some of those
    blobs missing or damaged (the files are linked back under the manifest as it is, so
    a model pulled from hf.co keeps its template and params); blobs of it that are not
    these files missing (skipped: only the registry has them); or another model
    (skipped: adoption never replaces a model it did not make from these files). False
    when there is no such model, or when it is exactly what adopting these files writes
    and some of its blobs are missing or damaged: the caller adopts them again, which
    links the files back and writes the same manifest."""
    try:
        existing = store.get_manifest(cand.name)
    except BlobctlError:
        return False
    have = [d for d in existing.layers if d.mediaType in (LAYER_MODEL, LAYER_PROJECTOR)]
    if len(have) != len(cand.files) or not all(
            _same_content(store, d, p, result) for d, p in zip(have, cand.files, strict=True)):
        result.skipped.append(SkippedFile(cand.files[0], (
            f"{cand.name.display()} is already in the store with other content; "
            "'blobctl rm' it to adopt this file")))
        return True
    missing = set(store.missing_blobs(existing))
    if missing and _is_adoption(existing, cand, have):
        return False
    for d, path in zip(have, cand.files, strict=True):
        if d.digest not in missing:
            continue
        placed = _place_reported(store, path, mode, lease, result, progress)
        if placed is None:
            return True
        if placed[0] != d.digest:  # a plain snapshot file that changed since it was looked at
            result.skipped.append(SkippedFile(path, (
                f"{path} changed while it was adopted ({placed[0]}, the model's layer is "
                f"{d.digest}); adopt it again")))
            return True
        missing.discard(d.digest)
    if missing:
        result.skipped.append(SkippedFile(cand.files[0], (
            f"{cand.name.display()} is in the store with blobs this cache does not hold, "
            f"missing or damaged: {', '.join(sorted(str(x) for x in missing))}; they come "
            f"from the registry: 'blobctl pull {cand.name.display()}' (its manifest is "
            "kept; 'blobctl rm' it to adopt this file instead)")))
        return True
    linked = all(os.path.samefile(store.blob_path(d.digest), p)
                 for d, p in zip(have, cand.files, strict=True))
    result.models.append(AdoptedModel(store.canonical_name(cand.name), existing.digest,
                                      existing.size, cand.files, linked))
    return True


def _same_content(store: Store, layer: Descriptor, path: Path, result: AdoptResult) -> bool:
    """Whether the cache file ``path`` holds the layer's bytes, from the cheapest evidence
    there is (spec/caches.md): another size is other content; the store's blob itself
    (one inode: what a hardlink adoption made) or a sha256 blob name equal to the layer's
    digest is the same (a name that lies is caught when the bytes are linked in again);
    anything else (a snapshot file that is not a symlink to a sha256 name, copied into
    the store) is hashed."""
    real = path.resolve()
    try:
        st = real.stat()
    except OSError:
        return False
    if st.st_size != layer.size:
        return False
    blob = store.layout.existing_blob(layer.digest, layer.size)
    if blob is not None:
        with contextlib.suppress(OSError):
            if os.path.samefile(blob, real):
                return True
    named = _named_digest(real)
    if named is not None and named.algorithm == layer.digest.algorithm:
        return named == layer.digest
    try:
        digest, size = hash_file(real, layer.digest.algorithm)
    except (OSError, BlobctlError):
        return False
    result.bytes_hashed += size
    return digest == layer.digest and size == layer.size
