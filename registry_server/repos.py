"""The store's manifests seen as registry repositories (spec/serve.md, "Names").

Synchronous, thread-safe; routes call it through a worker thread. Parsed manifest facts
are cached per file and re-read when the file's (inode, size, mtime) changes, so a HEAD
of a tag costs one ``stat`` after the first request.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

from blobstore import Digest, InvalidDigest, InvalidName, Store
from blobstore.decoding import decode_any
from blobstore.errors import InvalidManifest
from blobstore.layout import read_small
from blobstore.manifest import (
    OCI_INDEX,
    OCI_MANIFEST,
    OLLAMA_MANIFEST_LIST,
    decode_stored,
    referenced_by,
)
from blobstore.name import ModelName
from registry_server.names import Repo, by_digest_tag

log = logging.getLogger("blobctl.serve")
_warned: set[str] = set()  # unreadable manifest paths already warned about

__all__ = ["ManifestInfo", "RepoIndex", "manifest_facts"]


@dataclass(frozen=True)
class ManifestInfo:
    """One stored manifest file: its bytes and what the routes need to know about it."""

    tag: str
    path: str
    raw: bytes
    digest: Digest
    media_type: str
    annotations: dict[str, str]
    refs: frozenset[Digest]
    subject: Digest | None
    artifact_type: str


def _lower_child(parent: str, name: str) -> str | None:
    exact = os.path.join(parent, name)
    if os.path.isdir(exact):
        return exact
    try:
        for e in os.scandir(parent):
            if e.name.lower() == name.lower() and e.is_dir():
                return e.path
    except OSError:
        return None
    return None


def manifest_facts(raw: bytes) -> tuple[str, dict[str, str], Digest | None, str]:
    """(media type, top-level annotations, subject digest, artifact type) of manifest
    bytes; defaults for what does not parse (the bytes are served as stored anyway)."""
    try:
        doc = decode_any(raw)
    except msgspec.DecodeError:
        return OCI_MANIFEST, {}, None, ""
    if not isinstance(doc, dict):
        return OCI_MANIFEST, {}, None, ""
    media = doc.get("mediaType")
    if not isinstance(media, str) or not media:
        media = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
    ann = doc.get("annotations")
    annotations = ({k: v for k, v in ann.items() if isinstance(k, str) and isinstance(v, str)}
                   if isinstance(ann, dict) else {})
    subject: Digest | None = None
    subj = doc.get("subject")
    if isinstance(subj, dict) and isinstance(subj.get("digest"), str):
        try:
            subject = Digest.parse(subj["digest"])
        except InvalidDigest:
            subject = None
    art = doc.get("artifactType")
    if not isinstance(art, str):
        cfg = doc.get("config")
        art = cfg.get("mediaType", "") if isinstance(cfg, dict) else ""
        art = art if isinstance(art, str) else ""
    return media, annotations, subject, art


def has_digest(info: ManifestInfo, digest: Digest) -> bool:
    """Whether the manifest's bytes have ``digest``, of whichever algorithm it names (a
    client may push and ask for a manifest by ``sha512:``; spec/names.md)."""
    if digest.algorithm == info.digest.algorithm:
        return info.digest == digest
    try:
        return Digest.of_bytes(info.raw, digest.algorithm) == digest
    except InvalidDigest:  # not computable here (blake3 without its package): no match
        return False


class RepoIndex:
    """Manifests of a store grouped by repository."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._cache: dict[str, tuple[tuple[int, int, int], ManifestInfo]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lookup
    def repo_dirs(self, repo: Repo) -> list[str]:
        """The repository's folders (case-insensitive): in ``manifests-v2/`` (newer
        Ollama's, read first, as Ollama does; the default registry spelt ``ollama.com``)
        and in ``manifests/``."""
        layout = self.store.layout
        v2 = layout.manifest_v2(repo.name("latest")).relative_to(layout.manifests_v2)
        out = []
        for root, parts in ((layout.manifests_v2, v2.parts[:3]),
                            (layout.manifests, (repo.host, repo.namespace, repo.model))):
            cur: str | None = str(root)
            for part in parts:
                assert cur is not None
                cur = _lower_child(cur, part)
                if cur is None:
                    break
            if cur is not None:
                out.append(cur)
        return out

    def _tag_files(self, repo: Repo) -> list[tuple[str, str]] | None:
        """(tag, path) of each tag, the ``manifests-v2/`` file where a tag is in both;
        None when the repository does not exist."""
        dirs = self.repo_dirs(repo)
        if not dirs:
            return None
        found: dict[str, str] = {}
        for d in dirs:
            v2 = self.store.layout.is_v2(d + os.sep)
            try:
                for e in os.scandir(d):
                    # a manifests-v2/ link that leads nowhere is the (broken) model, as
                    # for the store: it hides the manifests/ file, and has no tag here
                    if e.is_file() or (v2 and e.is_symlink() and not e.is_dir()):
                        found.setdefault(e.name, e.path)
            except OSError:
                continue
        return sorted((t, p) for t, p in found.items() if os.path.exists(p))

    def _load(self, path: str, tag: str) -> ManifestInfo | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            hit = self._cache.get(path)
        if hit is not None and hit[0] == key:
            return hit[1]
        try:
            raw, st = read_small(path)
        except OSError:
            return None
        if OLLAMA_MANIFEST_LIST.encode() in raw:  # newer Ollama's list: served as the
            # manifest Ollama would run here (a registry client knows no such list); one
            # that does not decode is served as stored
            with contextlib.suppress(InvalidManifest):
                raw = decode_stored(raw, source=path,
                                    read_blob=self.store.layout.read_small_blob).raw
        media, ann, subject, art = manifest_facts(raw)
        info = ManifestInfo(tag, path, raw, Digest.of_bytes(raw), media, ann,
                            frozenset(referenced_by(raw)), subject, art)
        with self._lock:
            if len(self._cache) > 50_000:
                self._cache.clear()
            self._cache[path] = ((st.st_ino, st.st_size, st.st_mtime_ns), info)
        return info

    def tags(self, repo: Repo) -> list[str] | None:
        """Sorted tags, or None when the repository does not exist."""
        files = self._tag_files(repo)
        return None if files is None else [t for t, _ in files]

    def manifests(self, repo: Repo) -> Iterator[ManifestInfo]:
        for tag, path in self._tag_files(repo) or []:
            info = self._load(path, tag)
            if info is not None:
                yield info

    def by_tag(self, repo: Repo, tag: str) -> ManifestInfo | None:
        path = self.store.find_manifest_path(repo.name(tag))
        if path is None:
            return None
        return self._load(str(path), Path(path).name)

    def by_digest(self, repo: Repo, digest: Digest) -> ManifestInfo | None:
        tag = by_digest_tag(digest)
        if tag is not None:
            hit = self.by_tag(repo, tag)
            if hit is not None and hit.digest == digest:
                return hit
        for info in self.manifests(repo):
            if has_digest(info, digest):
                return info
        return None

    def referencing(self, repo: Repo, digest: Digest) -> list[ManifestInfo]:
        """The repository's manifests that reference the blob."""
        return [m for m in self.manifests(repo) if digest in m.refs]

    def repositories(self) -> list[Repo]:
        """Every repository that holds at least one manifest file, sorted by URL name."""
        seen: dict[str, Repo] = {}

        def unreadable(path: str, reason: str) -> None:
            if path not in _warned:  # once per path, not at every request
                _warned.add(path)
                log.warning("cannot read %s: %s", path, reason)

        for (host, ns, model, tag), _path in self.store.layout.iter_manifest_files(
                unreadable):
            try:
                ModelName(host, ns, model, tag)
            except InvalidName:  # a foreign file under manifests/: not a repository
                continue
            r = Repo(host, ns, model)
            seen.setdefault(r.url_name.lower(), r)
        return sorted(seen.values(), key=lambda r: r.url_name)
