"""Link farms: a folder of links to models' GGUF blobs (spec/caches.md, "Link farms").

:func:`link_models` makes a folder of symlinks (or hardlinks) to models' GGUF blobs laid
out as LM Studio expects (``<publisher>/<repo>/<file>.gguf``) or flat
(``<model>-<tag>.gguf``). GC keeps blobs only through manifests: when a model is
evicted, its symlinks dangle (:func:`prune_links` removes them) and its hardlinks keep
the bytes alive outside the store until they are pruned or deleted.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec

from blobstore.digest import Digest
from blobstore.errors import InvalidInput
from blobstore.manifest import LAYER_MODEL, LAYER_PROJECTOR, Descriptor
from blobstore.name import ModelName
from blobstore.store import Store

__all__ = ["LINKS_RECORD", "LinkEntry", "link_models", "prune_links"]

LINKS_RECORD = ".blobctl-links.json"


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
