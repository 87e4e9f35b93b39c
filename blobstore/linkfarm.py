"""Link farms: a folder of links to models' GGUF blobs (spec/caches.md, "Link farms").

:func:`link_models` makes a folder of symlinks (or hardlinks) to models' GGUF blobs laid
out as LM Studio expects (``<publisher>/<repo>/<file>.gguf``) or flat
(``<model>-<tag>.gguf``). GC keeps blobs only through manifests: when a model is
evicted, its symlinks dangle (:func:`prune_links` removes them) and its hardlinks keep
the bytes alive outside the store until they are pruned or deleted.

What blobctl made is recorded in ``DIR/.blobctl-links.json`` by identity (a symlink's
text; a hardlink's device, inode, size and mtime). A recorded path is replaced or
removed only while what stands there is still exactly that, checked again after it was
renamed aside; anything else there is the user's and is left alone (spec/caches.md,
"What blobctl touches").
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from blobstore import pathjson
from blobstore.digest import Digest
from blobstore.errors import InvalidInput
from blobstore.manifest import LAYER_MODEL, LAYER_PROJECTOR, Descriptor
from blobstore.name import ModelName
from blobstore.store import Store

__all__ = ["LINKS_RECORD", "LinkEntry", "PruneResult", "SkippedLink", "link_models",
           "prune_links"]

LINKS_RECORD = ".blobctl-links.json"


@dataclass
class LinkEntry:
    name: ModelName
    path: Path          # the link
    target: Path        # the blob
    kind: str           # "symlink" or "hardlink"


@dataclass
class SkippedLink:
    path: Path
    reason: str


@dataclass
class PruneResult:
    removed: list[Path] = field(default_factory=list)
    relinked: list[Path] = field(default_factory=list)   # stale hardlinks, to the new blob
    skipped: list[SkippedLink] = field(default_factory=list)  # left alone, and why


class _Made(msgspec.Struct, omit_defaults=True):
    """What blobctl made at a path: a symlink's text, or a hardlink's identity."""

    digest: str
    kind: str               # "symlink" or "hardlink"
    target: str = ""        # symlink: os.readlink() of the link
    dev: int = 0            # hardlink: st_dev, st_ino, st_size, st_mtime_ns
    ino: int = 0
    size: int = 0
    mtime_ns: int = 0
    model: str = ""         # the model it was made for (full name; "" in older records)


class _Record(msgspec.Struct):
    # relative path -> what blobctl made there; a bare digest string is a record
    # written before identities were kept (treated conservatively, see _not_ours)
    links: dict[str, str | _Made] = msgspec.field(default_factory=dict)


_RECORD_DEC = msgspec.json.Decoder(_Record)


def _refuse_inside_store(store: Store, folder: Path,
                         mine: set[tuple[int, int]] | None = None) -> None:
    """InvalidInput when ``folder`` is in the store (``Layout.contains``: by identity,
    through symlinks and bind mounts): a link there would be read as the store's own
    file (found from outside: ``--to STORE/manifests/registry.ollama.ai`` made a GGUF the
    store listed as model ``m:m-latest.gguf``; verify then failed)."""
    if store.layout.contains(folder, mine):
        raise InvalidInput(f"{folder} is inside the store {store.root}: links there would be "
                           "read as the store's own files",
                           hint="give --to a folder outside the store")


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
                layout: str = "lmstudio", hardlink: bool = False,
                replace_others: bool = False) -> list[LinkEntry]:
    """Link the GGUF blobs of ``names`` into ``dest``; return the links made.

    ``lmstudio``: ``<namespace>/<model>/<model>-<tag>.gguf`` (publisher/repo/file, as
    LM Studio's models folder expects; projectors as ``mmproj-…``); ``flat``:
    ``<model>-<tag>.gguf``. Split models get ``-0000i-of-0000N`` parts. Symlinks point
    at absolute blob paths. Each link is recorded in ``dest/.blobctl-links.json`` with
    its identity, for :func:`prune_links`.

    A path is replaced only while it still holds exactly the link blobctl recorded there
    (or a symlink to the very blob); any other existing file is refused
    (:class:`InvalidInput`) before anything is linked, and is never changed. A link
    blobctl made there for another model (two names that map to one path, linked one
    after the other) is refused too, naming that model, unless ``replace_others``.
    Raises :class:`InvalidInput` too when hardlinks cross filesystems, and, before
    anything is linked, when ``dest`` (or a folder a link would go into) is inside the
    store, however reached (``Layout.contains``).
    """
    if layout not in ("lmstudio", "flat"):
        raise InvalidInput(f"unknown link layout {layout!r}", hint="lmstudio or flat")
    root = Path(dest).expanduser().absolute()
    mine = store.layout.folder_ids()  # (one walk of the store for every check below)
    _refuse_inside_store(store, root, mine)
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
                                   f"both be linked as {rel}", hint=_apart_hint(layout))
            taken[rel] = canonical
            plan.append((canonical, rel, store.blob_path(d.digest), d.digest))
    for name, rel, target, digest in plan:  # check first: refuse before changing anything
        path = root / rel
        # (a folder on the way may lead there)
        _refuse_inside_store(store, path.parent, mine)
        st = _lstat(path)
        if st is None:
            continue
        reason = _not_ours(path, st, _expected(record, rel, digest, target), store)
        if reason is not None:
            raise _refused(path, reason if str(rel) in record.links else None)
        made = record.links.get(str(rel))
        if isinstance(made, _Made) and made.model not in ("", str(name)) \
                and not replace_others:
            other = ModelName.parse(made.model).display()
            raise InvalidInput(
                f"{path} is the link blobctl made for {other}, not for {name.display()}",
                hint=f"{_apart_hint(layout)}; or --replace to point it at {name.display()}")
    out: list[LinkEntry] = []
    fresh = sorted({d for _, rel, _, _ in plan for d in [root, *(root / rel).parents]
                    if d.is_relative_to(root) and not d.exists()},
                   key=lambda d: len(d.parts), reverse=True)  # deepest first
    try:
        for name, rel, target, digest in plan:
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)

            def make(p: Path, target: Path = target) -> None:
                if hardlink:
                    os.link(target, p)
                else:
                    os.symlink(target, p)

            try:
                if _lstat(path) is None:
                    make(path)  # creates, never replaces: FileExistsError if taken
                    reason = None
                else:
                    reason = _swap(path, _expected(record, rel, digest, target), store, make)
            except FileExistsError:
                reason = "created meanwhile by another program"
            except OSError as exc:
                if hardlink:
                    raise InvalidInput(
                        f"cannot hardlink {target} into {root}: {exc.strerror or exc}",
                        hint="hardlinks need the same filesystem; use symlinks (no --hardlink)"
                    ) from exc
                raise
            if reason is not None:  # changed between the check above and now: left alone
                raise _refused(path, reason)
            record.links[str(rel)] = _identity(path, digest, str(name))
            out.append(LinkEntry(name, path, target, "hardlink" if hardlink else "symlink"))
    finally:
        if out:
            _save_record(root, record)
        else:  # nothing linked (refused, or hardlinks across filesystems): leave nothing
            for folder in fresh:
                with contextlib.suppress(OSError):  # not empty after all: not ours to force
                    folder.rmdir()
    return out


def _apart_hint(layout: str) -> str:
    """What keeps two models that map to one link path apart, in ``layout``."""
    if layout == "flat":  # flat drops host and namespace; lmstudio keeps the namespace
        return "use --layout lmstudio, or link them into different folders (--to)"
    return "link them into different folders (--to)"


def _refused(path: Path, reason: str | None) -> InvalidInput:
    hint = "move it away, or link into another folder"
    return InvalidInput(f"{path} exists and is not a link blobctl made",
                        hint=f"{reason}; {hint}" if reason else hint)


def _expected(record: _Record, rel: Path, digest: Digest, target: Path) -> list[str | _Made]:
    """What may stand at ``rel`` and be replaced: what blobctl recorded there, or a
    symlink to the very blob (made by hand, or by a blobctl whose record was lost)."""
    same: list[str | _Made] = [_Made(str(digest), "symlink", target=str(target))]
    recorded = record.links.get(str(rel))
    return same if recorded is None else [recorded, *same]


def _identity(path: Path, digest: Digest, model: str) -> _Made:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return _Made(str(digest), "symlink", target=os.readlink(path), model=model)
    return _Made(str(digest), "hardlink", dev=st.st_dev, ino=st.st_ino, size=st.st_size,
                 mtime_ns=st.st_mtime_ns, model=model)


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _not_ours(path: Path, st: os.stat_result, made: Sequence[str | _Made],
              store: Store | None) -> str | None:
    """None if what stands at ``path`` (``st``: its lstat) is one of ``made``, what
    blobctl made there; else why it is taken for the user's.

    A current record must match exactly: the symlink's text, or the file's device,
    inode, size and mtime (an inode number the user's new file got after blobctl's was
    deleted has another mtime). A record without identity (an older blobctl's: a bare
    digest) counts only what is provably blobctl's: a symlink to that digest's name in a
    ``blobs/`` folder, or a file that is the store's blob of that digest (same inode).
    """
    reasons = [_mismatch(path, st, m, store) for m in made]
    return None if None in reasons else reasons[0]


def _mismatch(path: Path, st: os.stat_result, made: str | _Made,
              store: Store | None) -> str | None:
    try:
        if isinstance(made, _Made):
            if made.kind == "symlink":
                if stat.S_ISLNK(st.st_mode) and os.readlink(path) == made.target:
                    return None
            elif stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino, st.st_size,
                                               st.st_mtime_ns) == (
                    made.dev, made.ino, made.size, made.mtime_ns):
                return None
            return f"it is not the {made.kind} blobctl made there (replaced since)"
        try:
            digest = Digest.parse(made)
        except InvalidInput:
            return "its record is unreadable"
        if stat.S_ISLNK(st.st_mode):
            target = Path(os.readlink(path))
            if target.parent.name == "blobs" and target.name in (digest.filename,
                                                                 digest.legacy_filename):
                return None
            return "it is not a symlink to a blob"
        blob = store.layout.existing_blob(digest) if store is not None else None
        if blob is not None and stat.S_ISREG(st.st_mode):
            b = os.stat(blob)
            if (b.st_dev, b.st_ino) == (st.st_dev, st.st_ino):
                return None
        return ("an older blobctl recorded it without its inode, so it cannot be told "
                "from a file of yours (delete it yourself if it is blobctl's hardlink)")
    except OSError as exc:
        return f"it changed while checked ({exc.strerror or exc})"


def _swap(path: Path, made: Sequence[str | _Made], store: Store | None,
          make: Callable[[Path], None] | None) -> str | None:
    """Replace (``make(path)``) or remove (``make`` None) what stands at ``path`` if it is
    what blobctl made there; return None when done, else why it was left alone.

    What stands there is renamed aside (atomic), checked there, and only then removed;
    what is not blobctl's is put back with link(2), which never replaces, so a file the
    user writes at ``path`` meanwhile is not lost either. ``make`` must create, never
    replace (os.symlink, os.link): a path taken meanwhile raises FileExistsError, after
    blobctl's old link is gone.
    """
    aside = path.with_name(f".{path.name}.blobctl-{os.getpid()}.aside")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        if make is not None:
            make(path)
        return None
    try:
        reason = _not_ours(aside, os.lstat(aside), made, store)
    except OSError as exc:
        reason = f"it changed while checked ({exc.strerror or exc})"
    if reason is not None:
        return reason + _put_back(aside, path)
    if make is not None:
        try:
            make(path)
        except FileExistsError:
            os.unlink(aside)
            raise
        except OSError:
            _put_back(aside, path)
            raise
    os.unlink(aside)
    return None


def _put_back(aside: Path, path: Path) -> str:
    """Move ``aside`` back to ``path`` without replacing anything; '' or what went wrong."""
    try:
        os.link(aside, path, follow_symlinks=False)
    except FileExistsError:
        return f"; it was moved to {aside}, as {path} was taken meanwhile"
    except OSError:  # a filesystem without hardlinks: rename, unless taken
        if os.path.lexists(path):
            return f"; it was moved to {aside}, as {path} was taken meanwhile"
        os.rename(aside, path)
        return ""
    os.unlink(aside)
    return ""


def _load_record(root: Path) -> _Record:
    try:
        return pathjson.decode((root / LINKS_RECORD).read_bytes(), _RECORD_DEC)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return _Record()


def _save_record(root: Path, record: _Record) -> None:
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{LINKS_RECORD}.{os.getpid()}.tmp"
    tmp.write_bytes(pathjson.encode(record))
    os.replace(tmp, root / LINKS_RECORD)


def prune_links(dest: Path | str, store: Store | None = None) -> PruneResult:
    """Remove the links in ``dest`` whose model is gone; report what was done.

    Removed: symlinks blobctl made whose blob is missing, and hardlinks blobctl made
    whose file is no longer linked from anywhere else (the store's blob was deleted:
    link count 1). With ``store``, such a hardlink whose digest is back in the store
    (the model was pulled or imported again) is re-linked to the store's file instead.
    Folders emptied by a removal go too.

    Nothing else is touched: paths blobctl did not record are never looked at; a
    recorded path that holds something else now (the user replaced the link) is left
    alone, listed in ``skipped`` with the reason and dropped from the record; a stale
    hardlink an older blobctl recorded without its inode is left and listed. Each
    removal is checked again after an atomic rename aside. A folder without a record
    (blobctl never linked into it) is left as it was: no record is written there.
    """
    root = Path(dest).expanduser().absolute()
    if not root.is_dir():
        raise InvalidInput(f"{root} is not a folder" if os.path.lexists(root)
                           else f"no folder {root}: nothing was linked there")
    recorded = os.path.lexists(root / LINKS_RECORD)
    record = _load_record(root)
    result = PruneResult()
    for rel, made in sorted(record.links.items()):
        path = root / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            del record.links[rel]  # not ours to follow out of the farm
            continue
        _prune_one(path, rel, made, record, store, result)
    for path in result.removed:  # folders left empty by a removal, up to the farm
        for parent in path.parents:
            if parent == root or root not in parent.parents:
                break
            try:
                os.rmdir(parent)  # only succeeds when empty
            except OSError:
                break
    if recorded:  # a folder blobctl never linked into is left as it was (spec/cli.md)
        _save_record(root, record)
    return result


def _prune_one(path: Path, rel: str, made: str | _Made, record: _Record,
               store: Store | None, result: PruneResult) -> None:
    st = _lstat(path)
    if st is None:  # the user deleted it: nothing of ours is left there
        del record.links[rel]
        return
    reason = _not_ours(path, st, [made], store)
    if reason is not None:
        if isinstance(made, _Made):  # provably replaced: the user's from now on
            result.skipped.append(SkippedLink(path, reason))
            del record.links[rel]
        elif (stat.S_ISLNK(st.st_mode) and not path.exists()) or (
                stat.S_ISREG(st.st_mode) and st.st_nlink == 1):  # stale, if it is ours
            result.skipped.append(SkippedLink(path, reason))
        return
    digest = made.digest if isinstance(made, _Made) else made
    model = made.model if isinstance(made, _Made) else ""
    if stat.S_ISLNK(st.st_mode):
        if path.exists():
            record.links[rel] = _identity(path, Digest.parse(digest), model)
            return
    elif st.st_nlink > 1:
        record.links[rel] = _identity(path, Digest.parse(digest), model)
        return
    else:
        blob = _store_blob(store, digest)
        if blob is not None:
            try:
                reason = _swap(path, [made], store, lambda p: os.link(blob, p))
            except OSError:
                reason = None  # not re-linkable (e.g. another filesystem): removed below
            else:
                if reason is None:
                    record.links[rel] = _identity(path, Digest.parse(digest), model)
                    result.relinked.append(path)
                else:
                    result.skipped.append(SkippedLink(path, reason))
                    del record.links[rel]
                return
    reason = _swap(path, [made], store, None)
    if reason is None:
        result.removed.append(path)
    else:
        result.skipped.append(SkippedLink(path, reason))
    del record.links[rel]


def _store_blob(store: Store | None, digest: str) -> Path | None:
    if store is None:
        return None
    try:
        return store.layout.existing_blob(Digest.parse(digest))
    except InvalidInput:
        return None

