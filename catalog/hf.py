"""Hugging Face repository files: list GGUF variants, download one as a model.

Endpoints (``$HF_ENDPOINT``, default ``https://huggingface.co``; the shape is the one
``huggingface_hub.HfApi.list_repo_tree`` reads):

* ``GET {endpoint}/api/models/{org}/{repo}/tree/{revision}?recursive=true`` → a JSON list
  of ``{type: "file"|"directory", path, size, oid, lfs?: {oid, size, pointerSize}}``;
  ``lfs.oid`` is the file's sha256. Pages follow ``Link: <…>; rel="next"``; the whole
  listing is capped (``MAX_LIST_BYTES`` over all pages, ``MAX_LIST_PAGES``, no page twice).
* ``GET {endpoint}/{org}/{repo}/resolve/{revision}/{path}`` → the file (large files are
  redirected to a CDN; Range works across the redirect).

``HF_TOKEN`` is sent as a Bearer token to the endpoint's origin only (private repos).
The model made of a file is named ``hf.co/{org}/{repo}:{quant}``, the quantization read
from the file name (``…-Q5_K_M.gguf`` → ``Q5_K_M``), as Ollama names HF GGUF pulls.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import msgspec

from blobstore.decoding import decode
from blobstore.digest import Digest
from blobstore.errors import InvalidDigest, InvalidInput, NotFound
from blobstore.gguf import GGUFInfo
from blobstore.manifest import MAX_BLOB_SIZE
from blobstore.name import ModelName
from blobstore.store import Store
from catalog.fetch import FetchResult, fetch_file
from registry_client.client import RegistryClient
from registry_client.errors import ProtocolError
from registry_client.pull import PullOptions

__all__ = ["MAX_LIST_BYTES", "MAX_LIST_PAGES", "HFFile", "hf_endpoint", "list_files",
           "parse_repo", "pull_file", "quant_of", "variants"]

HF_HOST = "hf.co"
_HF_HOSTS = ("hf.co", "huggingface.co")
MAX_LIST_BYTES = 64 << 20  # the whole listing, all pages (spec/catalog.md)
MAX_LIST_PAGES = 1000
MAX_SHOWN = 8  # candidates named in the error for an ambiguous base name
_QUANT = re.compile(
    r"(?<![A-Za-z0-9])(I?Q[1-8](?:_[A-Z0-9]+)*|BF16|F16|F32|FP16|FP32|TQ[12]_0|MXFP4)"
    r"(?![A-Za-z0-9])", re.IGNORECASE | re.ASCII)
_SHARD = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE | re.ASCII)


class _Lfs(msgspec.Struct):
    oid: str = ""
    size: int = 0


class _TreeEntry(msgspec.Struct):
    type: str
    path: str
    size: int = 0
    oid: str = ""
    lfs: _Lfs | None = None


_TREE = msgspec.json.Decoder(list[_TreeEntry])


@dataclass(frozen=True)
class HFFile:
    path: str
    size: int
    sha256: Digest | None  # from LFS; None for a file stored in git itself
    quant: str | None

    @property
    def split(self) -> bool:
        """Part of a split GGUF (``-00001-of-00003.gguf``)."""
        return bool(_SHARD.search(self.path))

    @property
    def projector(self) -> bool:
        return "mmproj" in self.path.rsplit("/", 1)[-1].lower()

    def to_json(self) -> dict[str, Any]:
        return {"file": self.path, "size": self.size,
                "sha256": self.sha256.hex if self.sha256 else None, "quant": self.quant,
                "split": self.split, "projector": self.projector}


def hf_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def parse_repo(ref: str) -> tuple[str, str]:
    """``hf.co/ORG/REPO`` (also ``huggingface.co/…``, ``hf/…``, ``https://…``) → (org, repo).

    A ``:tag`` is ignored. Raises InvalidInput for anything that is not an HF repo.
    """
    name = ModelName.parse(ref)
    if name.host.lower() not in _HF_HOSTS or ref.count("/") < 2:
        raise InvalidInput(f"{ref!r} is not a Hugging Face repository",
                           hint="use hf.co/ORG/REPO, e.g. hf.co/bartowski/Qwen2.5-0.5B-"
                                "Instruct-GGUF")
    return name.namespace, name.model


def quant_of(filename: str) -> str | None:
    """The quantization named in a GGUF file name (last match, upper-cased), or None."""
    stem = filename.rsplit("/", 1)[-1]
    stem = _SHARD.sub("", stem)
    stem = re.sub(r"\.gguf$", "", stem, flags=re.IGNORECASE)
    found = _QUANT.findall(stem)
    return found[-1].upper() if found else None


def _tag_for(f: HFFile) -> str:
    if f.quant:
        return f.quant
    stem = re.sub(r"\.gguf$", "", f.path.rsplit("/", 1)[-1], flags=re.IGNORECASE)
    tag = re.sub(r"[^A-Za-z0-9_.-]", "-", stem).lstrip(".-")[:80]
    return tag or "latest"


def _next_link(header: str | None) -> str | None:
    if not header:
        return None
    for part in header.split(","):
        m = re.match(r'\s*<([^>]+)>\s*;.*rel="?next"?', part)
        if m:
            return m.group(1)
    return None


def list_files(client: RegistryClient, org: str, repo: str, revision: str = "main", *,
               max_bytes: int = MAX_LIST_BYTES, max_pages: int = MAX_LIST_PAGES
               ) -> list[HFFile]:
    """Every file of the repo at ``revision`` (all pages).

    The whole listing is bounded (spec/catalog.md, "Hugging Face files"): at most
    ``max_bytes`` over all pages and ``max_pages`` pages, and a next page that was
    already read (a loop) ends it. Each of these raises ProtocolError (exit 6); a
    missing repo RemoteNotFound, a refused one AuthError, a broken body TransferError.
    """
    what = f"Hugging Face repo {org}/{repo}"
    url: str | None = (f"{hf_endpoint()}/api/models/{org}/{repo}/tree/"
                       f"{quote(revision, safe='')}?recursive=true")
    seen: dict[str, int] = {}  # page URL -> page number
    total = 0
    out: list[HFFile] = []
    while url is not None:
        key = str(httpx.URL(url))
        if key in seen:
            raise ProtocolError(f"{what}: the file list's page {len(seen) + 1} is page "
                                f"{seen[key]} again (a loop of Link: rel=next)", url=url)
        if len(seen) >= max_pages:
            raise ProtocolError(f"{what}: the file list has more than {max_pages} pages",
                                url=url)
        seen[key] = len(seen) + 1
        # read whole within each try: a page cut short is retried (spec/pull.md, "Retries")
        resp, body = client.fetch("GET", url, scope="", what=what,
                                  headers={"Accept": "application/json"},
                                  limit=max_bytes - total,
                                  too_large=f"{what}: the file list is larger than "
                                            f"{max_bytes / (1 << 20):g} MiB (after "
                                            f"{len(seen)} pages)")
        total += len(body)
        out.extend(_page_files(body, url))
        nxt = _next_link(resp.headers.get("link"))
        url = str(resp.request.url.join(nxt)) if nxt else None
    return out


def _page_files(body: bytes, url: str) -> list[HFFile]:
    """The files of one page of the tree listing; ProtocolError for a body that is not."""
    try:
        entries = decode(body, _TREE)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"unexpected file list from the Hugging Face API: {exc}",
                            url=url) from exc
    out: list[HFFile] = []
    for e in entries:
        if e.type != "file":
            continue
        digest = None
        if e.lfs is not None and e.lfs.oid:
            try:
                digest = Digest.parse(f"sha256:{e.lfs.oid}")
            except InvalidDigest as exc:
                raise ProtocolError(f"bad LFS sha256 for {e.path}: {e.lfs.oid!r}",
                                    url=url) from exc
        size = e.lfs.size if e.lfs is not None and e.lfs.size else e.size
        if not 0 <= size <= MAX_BLOB_SIZE:  # (found from outside: -5 read as a store error)
            raise ProtocolError(f"the Hugging Face API lists {e.path} with a size of "
                                f"{size} bytes", url=url)
        out.append(HFFile(e.path, size, digest, quant_of(e.path)
                          if e.path.lower().endswith(".gguf") else None))
    return out


def variants(org: str, repo: str, revision: str = "main", *,
             options: PullOptions | None = None) -> list[HFFile]:
    """The repo's GGUF files, smallest first."""
    opts = options or PullOptions()
    with RegistryClient(insecure=opts.insecure, retry=opts.retry,
                        stall_timeout=opts.stall_timeout) as client:
        files = list_files(client, org, repo, revision)
    ggufs = [f for f in files if f.path.lower().endswith(".gguf")]
    return sorted(ggufs, key=lambda f: (f.size, f.path))


def _pick(files: list[HFFile], filename: str, repo: str, revision: str) -> HFFile:
    """The file ``filename`` names: the one at that path, else the one file with that
    base name. Several files with that base name: InvalidInput listing them (taking one
    would download a file the user did not choose); none: NotFound."""
    for f in files:
        if f.path == filename:
            return f
    match = sorted((f for f in files if f.path.rsplit("/", 1)[-1] == filename),
                   key=lambda f: f.path)
    if len(match) == 1:
        return match[0]
    if not match:
        raise NotFound(f"{repo} has no file {filename!r} at revision {revision}",
                       hint=f"'blobctl variants {repo}' lists its GGUF files")
    shown = ", ".join(f.path for f in match[:MAX_SHOWN])
    more = f" and {len(match) - MAX_SHOWN} more" if len(match) > MAX_SHOWN else ""
    raise InvalidInput(f"{repo} has {len(match)} files named {filename!r}: {shown}{more}",
                       hint=f"give the file's path in the repo, e.g. --file {match[0].path}")


def pull_file(
    store: Store,
    org: str,
    repo: str,
    filename: str,
    *,
    revision: str = "main",
    options: PullOptions | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> FetchResult:
    """Download ``filename`` of ``org/repo`` and make model ``hf.co/org/repo:<quant>``.

    ``filename`` is a path in the repo, or a base name that exactly one file has
    (spec/catalog.md). Verified against the file's LFS sha256 (mismatch: DigestMismatch,
    nothing visible). Raises NotFound for a file the repo does not have, InvalidInput for
    a base name several files have, a split GGUF, a file without LFS metadata or a vision
    projector (by its ``mmproj`` file name before the download, by its GGUF metadata
    after it: no manifest is written, so no model's tag is ever taken).
    """
    opts = options or PullOptions()
    with RegistryClient(insecure=opts.insecure, retry=opts.retry,
                        stall_timeout=opts.stall_timeout) as client:
        files = list_files(client, org, repo, revision)
    f = _pick(files, filename, f"hf.co/{org}/{repo}", revision)
    if f.split:
        raise InvalidInput(f"{f.path} is one part of a split GGUF; blobctl cannot make a "
                           "model of a split file yet", hint="pick a single-file variant")
    if f.sha256 is None:
        raise InvalidInput(f"{f.path} has no LFS sha256 to verify it against",
                           hint="use 'blobctl fetch URL --sha256 HEX --name REF'")
    ref = f"hf.co/{org}/{repo}"
    if f.projector:  # before a byte is fetched
        raise _projector_refused(f, ref)

    def accept(info: GGUFInfo) -> None:  # a projector by its metadata alone
        if info.is_projector:
            raise _projector_refused(f, ref)

    name = ModelName(HF_HOST, org, repo, _tag_for(f))
    url = f"{hf_endpoint()}/{org}/{repo}/resolve/{quote(revision, safe='')}/{quote(f.path)}"
    return fetch_file(store, url, f.sha256, name, size=f.size, options=opts,
                      progress=progress, accept=accept)


def _projector_refused(f: HFFile, ref: str) -> InvalidInput:
    """A vision projector is never made a model (spec/catalog.md), as HF-cache adoption
    skips one (spec/caches.md): its quant tag is the model's (``mmproj-x-f16.gguf`` and
    ``x-F16.gguf`` share ``F16``), and a projector-only manifest under it would replace
    the model, which then cannot run and whose blobs GC deletes (found from outside)."""
    return InvalidInput(
        f"{f.path} is a vision projector, not a model; 'pull --file' makes models only",
        hint=f"pull a model file ('blobctl variants {ref}' lists them); to keep the "
             "projector under a name of your own: blobctl fetch URL --sha256 HEX --name REF")
