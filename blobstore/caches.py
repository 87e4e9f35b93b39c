"""One copy on disk shared with other tools: HF-cache adoption and link farms
(spec/caches.md).

:func:`adopt_hf_cache` turns the GGUF files of a Hugging Face hub cache
(``models--ORG--REPO/snapshots/<rev>/<file>``, symlinks into ``blobs/<sha256 hex>``)
into models ``hf.co/ORG/REPO:<quant>``, built as ``ollama create`` builds a model from
a GGUF. Each file is hardlinked into the store (copied across filesystems) and hashed
once, from the store's own link, before it gets its digest name: a file whose content
does not match its sha256 name is skipped and named, the rest is adopted.

:func:`link_models` does the reverse: a folder of symlinks (or hardlinks) to models'
GGUF blobs laid out as LM Studio expects (``<publisher>/<repo>/<file>.gguf``) or flat
(``<model>-<tag>.gguf``). GC keeps blobs only through manifests: when a model is
evicted, its symlinks dangle (``prune_links`` removes them) and its hardlinks keep the
bytes alive outside the store until they are pruned or deleted.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from blobstore.digest import Digest
from blobstore.errors import (
    BlobctlError,
    GGUFError,
    IntegrityError,
    InvalidInput,
    InvalidName,
)
from blobstore.gguf import GGUFInfo, read_gguf
from blobstore.ingest import BlobWriter, link_in
from blobstore.lease import Lease
from blobstore.manifest import LAYER_MODEL, LAYER_PROJECTOR, Descriptor
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
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TAG_BAD = re.compile(r"[^A-Za-z0-9_.-]")
LINKS_RECORD = ".blobctl-links.json"


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


def _candidates(cache: Path, result: AdoptResult) -> list[_Candidate]:
    out: dict[ModelName, _Candidate] = {}
    try:
        repos = sorted(p for p in cache.iterdir() if p.name.startswith("models--"))
    except OSError as exc:
        raise InvalidInput(f"cannot read the Hugging Face cache {cache}: "
                           f"{exc.strerror or exc}") from exc
    for repo in repos:
        org, _, name = repo.name[len("models--"):].partition("--")
        for rev in _revisions(repo):
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
            for files in groups:
                try:
                    model = ModelName("hf.co", org, name, quant_from_filename(files[0].name))
                except InvalidName as exc:
                    result.skipped.append(SkippedFile(files[0], exc.message))
                    continue
                if model not in out:  # refs/main first, then the newest snapshot
                    out[model] = _Candidate(model, files, rev.name)
    return list(out.values())


def _link_or_copy(store: Store, path: Path, lease: Lease,
                  result: AdoptResult) -> tuple[Digest, int, bool]:
    """Put one cache file in the store, verified against its sha256 blob name."""
    real = path.resolve()
    expected = Digest("sha256", real.name) if _HEX64.match(real.name) else None
    if expected is not None and store.has_blob(expected):
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
    to a verified copy across filesystems) or ``copy``. Idempotent. Files that are not
    usable GGUF models (adapters, projectors, unreadable) are listed in
    ``result.skipped``; files whose content does not match their sha256 name are
    skipped too, and then :class:`CacheDamaged` (exit 5) is raised at the end with the
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
    first = cand.files[0]
    try:
        infos = [read_gguf(p) for p in cand.files]
    except GGUFError as exc:
        result.skipped.append(SkippedFile(first, exc.message))
        return
    info: GGUFInfo = infos[0]
    if info.is_adapter:
        result.skipped.append(SkippedFile(first, "a LoRA adapter, not a model"))
        return
    media = LAYER_PROJECTOR if info.is_projector else LAYER_MODEL
    if store.has_model(cand.name) and _already(store, cand, result):
        return
    layers: list[Descriptor] = []
    linked = True
    for path in cand.files:
        total = path.stat().st_size
        _emit(progress, status=f"adopting {path.name}", total=total, completed=0)
        try:
            if mode == "copy":
                with open(path, "rb") as f:
                    real = path.resolve()
                    want = Digest("sha256", real.name) if _HEX64.match(real.name) else None
                    digest = store.put_blob(f, expected=want, size=total, source=str(path),
                                            lease=lease)
                    size = total
                    result.bytes_hashed += total
                ok = False
            else:
                digest, size, ok = _link_or_copy(store, path, lease, result)
        except IntegrityError as exc:
            result.skipped.append(SkippedFile(path, exc.message, damaged=True))
            return
        except OSError as exc:
            result.skipped.append(SkippedFile(path, f"cannot read: {exc.strerror or exc}"))
            return
        linked = linked and ok
        layers.append(Descriptor(mediaType=media, digest=digest, size=size))
        _emit(progress, status=f"adopting {path.name}", total=total, completed=total)
    from blobstore.importer import write_model

    manifest = write_model(store, cand.name, info, layers, lease,
                           parameter_count=sum(i.parameter_count for i in infos))
    result.models.append(AdoptedModel(store.canonical_name(cand.name), manifest.digest,
                                      manifest.size, cand.files, linked))


def _already(store: Store, cand: _Candidate, result: AdoptResult) -> bool:
    """True if ``cand.name`` exists: the same files (reported, nothing hashed again) or
    another model (skipped: adoption never replaces a model it did not make from these
    files)."""
    try:
        existing = store.get_manifest(cand.name)
    except BlobctlError:
        return False
    names = [p.resolve().name for p in cand.files]
    have = [d.digest for d in existing.layers if d.mediaType in (LAYER_MODEL, LAYER_PROJECTOR)]
    if [d.hex for d in have] == names and all(d.algorithm == "sha256" for d in have) \
            and not store.missing_blobs(existing):
        linked = all(os.path.samefile(store.blob_path(d), p)
                     for d, p in zip(have, cand.files, strict=True))
        result.models.append(AdoptedModel(store.canonical_name(cand.name), existing.digest,
                                          existing.size, cand.files, linked))
        return True
    result.skipped.append(SkippedFile(cand.files[0], f"{cand.name.display()} is already in "
                                                     "the store with other content; 'blobctl "
                                                     "rm' it to adopt this file"))
    return True


# ====================================================================== link farms
@dataclass
class LinkEntry:
    name: ModelName
    path: Path          # the link
    target: Path        # the blob
    kind: str           # "symlink" or "hardlink"


class _Record(msgspec.Struct):
    links: dict[str, str] = msgspec.field(default_factory=dict)  # relative path -> digest


def _link_paths(name: ModelName, layers: list[Descriptor], layout: str) -> list[Path]:
    models = [d for d in layers if d.mediaType == LAYER_MODEL]
    projectors = [d for d in layers if d.mediaType == LAYER_PROJECTOR]
    base = f"{name.model}-{name.tag}"
    folder = Path(name.namespace, name.model) if layout == "lmstudio" else Path()
    out = []
    for i, _ in enumerate(models, 1):
        suffix = f"-{i:05d}-of-{len(models):05d}" if len(models) > 1 else ""
        out.append(folder / f"{base}{suffix}.gguf")
    for i, _ in enumerate(projectors, 1):
        suffix = f"-{i}" if len(projectors) > 1 else ""
        out.append(folder / f"mmproj-{base}{suffix}.gguf")
    return out


def link_models(store: Store, names: Sequence[ModelName], dest: Path | str, *,
                layout: str = "lmstudio", hardlink: bool = False) -> list[LinkEntry]:
    """Link the GGUF blobs of ``names`` into ``dest``; return the links made.

    ``lmstudio``: ``<namespace>/<model>/<model>-<tag>.gguf`` (publisher/repo/file, as
    LM Studio's models folder expects; projectors as ``mmproj-…``); ``flat``:
    ``<model>-<tag>.gguf``. Split models get ``-0000i-of-0000N`` parts. A link blobctl
    made earlier is replaced; any other existing file is refused (InvalidInput) and
    nothing is linked. Symlinks point at absolute blob paths. Links are recorded in
    ``dest/.blobctl-links.json`` for :func:`prune_links`.
    """
    if layout not in ("lmstudio", "flat"):
        raise InvalidInput(f"unknown link layout {layout!r}", hint="lmstudio or flat")
    root = Path(dest).expanduser().absolute()
    record = _load_record(root)
    plan: list[tuple[ModelName, Path, Path, Digest]] = []
    taken: dict[Path, ModelName] = {}
    for n in names:
        canonical = store.canonical_name(n)
        resolved = store.resolve(canonical, record=False)
        layers = [d for d in resolved.manifest.layers
                  if d.mediaType in (LAYER_MODEL, LAYER_PROJECTOR)]
        layers.sort(key=lambda d: d.mediaType != LAYER_MODEL)
        if not layers:
            raise InvalidInput(f"model {canonical.display()!r} has no GGUF layer")
        for rel, d in zip(_link_paths(canonical, layers, layout), layers, strict=True):
            if taken.get(rel, canonical) != canonical:
                raise InvalidInput(f"{canonical.display()} and {taken[rel].display()} would "
                                   f"both be linked as {rel}",
                                   hint="use --layout lmstudio, or link them separately")
            taken[rel] = canonical
            plan.append((canonical, rel, store.blob_path(d.digest), d.digest))
    for _, rel, target, _ in plan:  # check first: refuse before changing anything
        path = root / rel
        if not (path.exists() or path.is_symlink()) or str(rel) in record.links:
            continue
        if not (path.is_symlink() and Path(os.readlink(path)) == target):
            raise InvalidInput(f"{path} exists and is not a link blobctl made",
                               hint="move it away, or link into another folder")
    out = []
    for name, rel, target, digest in plan:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if hardlink:
            try:
                os.link(target, tmp)
            except OSError as exc:
                raise InvalidInput(
                    f"cannot hardlink {target} into {root}: {exc.strerror or exc}",
                    hint="hardlinks need the same filesystem; use symlinks (no --hardlink)"
                ) from exc
        else:
            os.symlink(target, tmp)
        os.replace(tmp, path)
        record.links[str(rel)] = str(digest)
        out.append(LinkEntry(name, path, target, "hardlink" if hardlink else "symlink"))
    _save_record(root, record)
    return out


def _load_record(root: Path) -> _Record:
    try:
        return msgspec.json.decode((root / LINKS_RECORD).read_bytes(), type=_Record)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return _Record()


def _save_record(root: Path, record: _Record) -> None:
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{LINKS_RECORD}.{os.getpid()}.tmp"
    tmp.write_bytes(msgspec.json.encode(record))
    os.replace(tmp, root / LINKS_RECORD)


def prune_links(dest: Path | str, store: Store | None = None) -> list[Path]:
    """Remove links in ``dest`` whose model is gone; return what was removed.

    Removed: symlinks whose target is missing and is a blob name (``<alg>-<hex>``), and
    hardlinks blobctl recorded whose file is no longer linked from anywhere else (the
    store's blob was deleted: link count 1). With ``store``, such a hardlink whose digest
    is back in the store (the model was pulled or imported again) is re-linked to the
    store's file instead. Empty folders left behind go too. Other files are never touched.
    """
    root = Path(dest).expanduser().absolute()
    if not root.is_dir():
        raise InvalidInput(f"{root} is not a folder")
    record = _load_record(root)
    removed: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        for fn in filenames + dirnames:
            path = Path(dirpath) / fn
            rel = str(path.relative_to(root))
            if path.is_symlink():
                target = Path(os.readlink(path))
                if not path.exists() and _is_blob_name(target.name):
                    path.unlink()
                    removed.append(path)
                    record.links.pop(rel, None)
            elif rel in record.links and path.is_file() and path.stat().st_nlink == 1:
                if store is not None and _relink(store, path, record.links[rel]):
                    continue
                path.unlink()
                removed.append(path)
                record.links.pop(rel, None)
    for dirpath, _, _ in sorted(os.walk(root), key=lambda t: -len(t[0])):
        if Path(dirpath) != root:
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)  # only succeeds when empty
    _save_record(root, record)
    return removed


def _relink(store: Store, path: Path, digest_text: str) -> bool:
    """Point a stale hardlink at the store's blob of the same digest, if there is one."""
    try:
        blob = store.layout.existing_blob(Digest.parse(digest_text))
    except InvalidInput:
        return False
    if blob is None:
        return False
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        os.link(blob, tmp)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return False
    return True


def _is_blob_name(name: str) -> bool:
    try:
        Digest.from_filename(name)
    except InvalidInput:
        return False
    return True
