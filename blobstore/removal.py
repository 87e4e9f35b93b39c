"""Removing a model (``blobctl rm``): its manifest first, then the blobs no other
manifest uses (spec/gc.md, "rm"); and forgetting the state of removed models.

``Store.remove_model`` and ``Store.forget_removed`` are the public entry points; GC's
apply step (``blobstore.gc``) shares :func:`forget_removed` and :func:`prune_empty_dirs`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from blobstore.blobfiles import unlink_names
from blobstore.digest import Digest
from blobstore.errors import (
    InvalidManifest,
    ManifestsUnreadable,
    ModelNotFound,
    ModelPinned,
    StoreUnwritable,
)
from blobstore.index import mentioned
from blobstore.layout import fsync_dir, read_small
from blobstore.lease import live_leases
from blobstore.manifest import decode_stored
from blobstore.name import ModelName

if TYPE_CHECKING:
    from collections.abc import Callable

    from blobstore.inuse import InUse
    from blobstore.store import Store

__all__ = [
    "RemoveResult",
    "forget_removed",
    "prune_empty_dirs",
    "remove_model",
    "remove_models",
]

log = logging.getLogger("blobctl.store")


@dataclass
class RemoveResult:
    name: ModelName
    removed_blobs: list[Digest]
    freed_bytes: int
    kept_shared: list[Digest]
    kept_leased: list[Digest]
    kept_in_use: list[Digest] = field(default_factory=list)
    leased_by: list[str] = field(default_factory=list)  # what holds kept_leased: "pull X"



def remove_model(store: Store, name: ModelName, *, force: bool = False) -> RemoveResult:
    """Remove a model: its manifest first, then blobs no other manifest uses.

    A pinned model is refused with ModelPinned unless ``force``. Blobs held by a
    live lease (a running pull) or open/mapped by a running process (this one
    too) are kept. Runs under the store lock (reentrant: callable inside
    ``with store.lock():``).
    """
    return remove_models(store, [name], force=force)[0]


@dataclass
class _Target:
    """One model of a removal: its files, and the blobs they use (None: unknown)."""

    name: ModelName
    canonical: ModelName
    paths: list[Path]
    candidates: set[Digest] | None = None


def remove_models(store: Store, names: list[ModelName], *,
                  force: bool = False) -> list[RemoveResult]:
    """Remove models as :func:`remove_model` removes one, at the cost of about one walk
    of the manifests (two: before, and after the manifests went), one read of the leases
    and one scan of the files in use, however many models go (found from outside: 1,000
    names of a 3,000-model store took 207 s, two walks and a /proc scan each).

    Every name is checked first (ModelNotFound, ModelPinned unless ``force``,
    ManifestsUnreadable for another manifest): a refused one removes nothing. Names of
    the same files count once (the first one's result). A blob that several of them
    use is listed once: as removed by the last of them that uses it, as shared by the
    others (as removing them one after another would). Runs under the store lock."""
    from blobstore.inuse import files_in_use

    with store.lock():
        targets: list[_Target] = []
        own: set[str] = set()
        for name in names:
            paths = store.manifest_paths(name)
            if not paths:
                raise ModelNotFound(name.display())
            canonical = store.canonical_name(name)
            if not force and store.is_pinned(canonical):
                raise ModelPinned(canonical.display())
            keys = {os.path.normpath(p) for p in paths}
            if keys <= own:  # (the same files by another name)
                continue
            own |= keys
            targets.append(_Target(name, canonical, paths))
        if not targets:
            return []
        store._check_writable()

        def others_readable(where: str, reason: str) -> None:
            if os.path.normpath(where) not in own:
                raise ManifestsUnreadable(where, reason)

        # every other manifest must be readable before these go: the blobs removed
        # below are those no other manifest uses (ManifestsUnreadable)
        store.referenced_digests(on_problem=others_readable)
        for t in targets:
            t.candidates = _candidates(store, t)
        for t in targets:
            for path in t.paths:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                fsync_dir(path.parent)
                prune_empty_dirs(store, path.parent)
        results = [RemoveResult(t.canonical, [], 0, [], [], []) for t in targets]
        if any(t.candidates is not None for t in targets):
            _remove_blobs(store, targets, results, files_in_use)
        with contextlib.suppress(StoreUnwritable):
            forget_removed(store, [t.canonical for t in targets])
    return results


def _candidates(store: Store, t: _Target) -> set[Digest] | None:
    """The blobs the model's files use; None where one cannot be read (its blobs are
    kept). Raises ModelNotFound when its first file is gone meanwhile."""
    candidates: set[Digest] | None = set()
    for path in t.paths:
        try:
            raw = read_small(str(path))[0]
            m = decode_stored(raw, source=str(path),
                              read_blob=store.layout.read_small_blob)
            used = set(m.blob_digests)
            if m.raw is not raw:  # an Ollama manifest list: every runner's manifest
                used |= mentioned(store.layout, raw)
        except InvalidManifest:
            candidates = None
            continue
        except FileNotFoundError as exc:
            if path.is_symlink():  # a manifests-v2/ link whose blob is gone: it goes
                continue
            if path == t.paths[0]:
                raise ModelNotFound(t.name.display()) from exc
            continue
        except OSError as exc:  # its own manifest cannot be read: it goes, its
            log.warning("cannot read %s (%s): its blobs are kept", path,  # blobs stay
                        exc.strerror or exc)
            candidates = None
            continue
        if candidates is not None:
            candidates |= used
            if store.layout.is_v2(path):  # newer Ollama's: the manifest is a blob too
                candidates.add(Digest.of_bytes(raw))
    return candidates


def _remove_blobs(store: Store, targets: list[_Target], results: list[RemoveResult],
                  files_in_use: Callable[..., InUse]) -> None:
    """Delete the blobs of the removed models that nothing keeps: no manifest still
    there, no live lease, no running process (one look at each for all models)."""
    unknown: list[str] = []
    still = store.referenced_digests(on_problem=lambda where, _: unknown.append(where))
    if unknown:  # became unreadable meanwhile: what it uses is unknown, keep all
        for t, result in zip(targets, results, strict=True):
            if t.candidates is not None:
                log.warning("cannot read %s: the blobs of %s are kept", unknown[0],
                            t.canonical.display())
                result.kept_shared.extend(sorted(t.candidates))
        return
    leased: dict[Digest, set[str]] = {}
    for lease in live_leases(store.layout):
        for d in lease.digests:
            leased.setdefault(d, set()).add(lease.purpose or "blobctl command")
    in_use = files_in_use(str(store.layout.blobs))
    real = os.path.realpath(store.layout.blobs)
    last: dict[Digest, int] = {}  # which removed model a blob goes with: the last
    for i, t in enumerate(targets):
        for d in t.candidates or ():
            last[d] = i
    for i, (t, result) in enumerate(zip(targets, results, strict=True)):
        if t.candidates is None:
            continue
        for d in sorted(t.candidates):
            if d in still or last[d] != i:
                result.kept_shared.append(d)
                continue
            if d in leased:
                result.kept_leased.append(d)
                result.leased_by = sorted(set(result.leased_by) | leased[d])
                continue
            if in_use.of_blob(real, d):
                result.kept_in_use.append(d)
                continue
            removed, freed = unlink_names([str(store.layout.blob(d)),
                                           str(store.layout.legacy_blob(d))])
            if removed:  # once, under whichever names it had (found from outside:
                result.removed_blobs.append(d)  # listed twice when it had both)
                result.freed_bytes += freed
    fsync_dir(store.layout.blobs)



def forget_removed(store: Store, names: list[ModelName]) -> None:
    """Drop the state (pin, last use) of models whose manifests were removed, except
    where a manifest whose name differs only in case is still there: state is keyed
    case-insensitively, so that model's pin is this row too. Call under the store
    lock. Raises StoreUnwritable."""
    st = store.state
    if st is None or st.readonly or not names:
        return
    if len(names) <= 8:  # (rm): a lookup each
        gone = [n for n in names if store.find_manifest_path(n) is None]
    else:  # (gc): one walk, not a folder scan per name (E x N)
        unread: list[str] = []
        left = {f"{h}/{ns}/{m}:{t}".lower()
                for (h, ns, m, t), _ in store.layout.iter_manifest_files(
                    lambda where, _: unread.append(where))}
        if unread:  # a name there may still be: forget none (rows are harmless)
            return
        gone = [n for n in names if n.key not in left]
    if gone:
        st.forget_many(gone)



def prune_empty_dirs(store: Store, start: Path) -> None:
    """Remove ``start`` and its parents while empty, up to (not including) the root of
    the manifest tree it is in."""
    for root in (store.layout.manifests, store.layout.manifests_v2):
        if root in start.parents:
            break
    else:
        return
    cur = start
    while cur != root:
        try:
            cur.rmdir()
        except OSError:
            return
        cur = cur.parent
