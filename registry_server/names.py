"""Repository names and references in ``/v2/`` URLs (spec/serve.md, "Names").

A URL repository is Ollama's name without the tag: two path components
(``library/llama3``) name the default host ``registry.ollama.ai``; three name another
host first (``hf.co/org/repo``, ``127.0.0.1:5055/ns/repo``; ASGI servers hand us the path
percent-decoded). Everything is validated by :class:`blobstore.ModelName`, so a URL can
never address a file outside ``manifests/`` (no part may start with ``.`` or hold ``/``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from blobstore import Digest, InvalidName, ModelName
from blobstore.name import DEFAULT_HOST

__all__ = ["BY_DIGEST_PREFIX", "STORED_TAG_MAX", "Repo", "RouteMatch", "by_digest_tag",
           "match_route", "parse_reference", "parse_repo", "tag_invalid", "unstorable_tag"]

# A manifest pushed by digest (no tag) is stored under this tag (spec/serve.md).
BY_DIGEST_PREFIX = "sha256-"
# OCI distribution's tag grammar: at most 128 characters
_OCI_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
# the longest tag the store's names hold (spec/names.md, as Ollama's names)
STORED_TAG_MAX = 80


@dataclass(frozen=True)
class Repo:
    """A repository: the store's host/namespace/model and its URL form."""

    host: str
    namespace: str
    model: str

    @property
    def url_name(self) -> str:
        """The name as it appears in ``/v2/<name>/...`` URLs."""
        if self.host.lower() == DEFAULT_HOST:
            return f"{self.namespace}/{self.model}"
        return f"{self.host}/{self.namespace}/{self.model}"

    def name(self, tag: str) -> ModelName:
        return ModelName(self.host, self.namespace, self.model, tag)


def parse_repo(text: str) -> Repo:
    """``ns/model`` or ``host/ns/model`` → Repo; raise InvalidName."""
    parts = text.split("/")
    if len(parts) == 2:
        host, (ns, model) = DEFAULT_HOST, parts
    elif len(parts) == 3:
        host, ns, model = parts
    else:
        raise InvalidName(text, "a repository is NAMESPACE/MODEL or HOST/NAMESPACE/MODEL")
    ModelName(host, ns, model, "latest")  # validates every part
    return Repo(host, ns, model)


def by_digest_tag(digest: Digest) -> str | None:
    """The tag a manifest pushed by this digest is stored under (sha256 only)."""
    if digest.algorithm != "sha256":
        return None
    return BY_DIGEST_PREFIX + digest.hex


def parse_reference(text: str) -> str | Digest:
    """A manifest reference: a Digest (contains ``:``) or an OCI tag, which the store
    may still be unable to hold (:func:`unstorable_tag`); raise InvalidDigest /
    InvalidName (whose ``reason`` says what is wrong with the tag)."""
    if ":" in text:
        return Digest.parse(text)
    if not _OCI_TAG.fullmatch(text):
        raise InvalidName(text, "a tag is 1-128 letters, digits, '_', '.' or '-', not "
                                "starting with '.' or '-'")
    return text


def tag_invalid(repo: Repo, tag: str, reason: str) -> str:
    """The ``TAG_INVALID`` message for ``tag`` of ``repo``: the request's own name."""
    shown = tag if len(tag) <= 40 else f"{tag[:32]}…({len(tag)} characters)"
    return f"invalid tag {shown!r} of {repo.url_name}: {reason}"


def unstorable_tag(repo: Repo, tag: str) -> str | None:
    """Why the store cannot hold the OCI tag ``tag`` under ``repo`` (None: it can)."""
    if len(tag) > STORED_TAG_MAX:
        return (f"the store's names hold tags of at most {STORED_TAG_MAX} characters, "
                f"as Ollama's do; this one has {len(tag)}")
    try:
        repo.name(tag)
    except InvalidName as exc:
        return exc.reason
    return None


@dataclass(frozen=True)
class RouteMatch:
    """What a ``/v2/<rest>`` path asks for: ``kind`` is one of ``catalog``, ``tags``,
    ``manifest``, ``blob``, ``upload`` (``arg`` = upload id, "" for a new one),
    ``referrers``; ``name`` the raw repository text; ``arg`` the rest."""

    kind: str
    name: str
    arg: str


def match_route(rest: str) -> RouteMatch | None:
    """Split ``rest`` (the path after ``/v2/``) from the right, as distribution's router
    does; None when nothing matches."""
    if rest == "_catalog":
        return RouteMatch("catalog", "", "")
    parts = rest.split("/")
    if len(parts) >= 3 and parts[-2:] == ["tags", "list"]:
        return RouteMatch("tags", "/".join(parts[:-2]), "")
    if len(parts) >= 4 and parts[-3:-1] == ["blobs", "uploads"]:
        return RouteMatch("upload", "/".join(parts[:-3]), parts[-1])
    if len(parts) >= 3 and parts[-2] in ("manifests", "blobs", "referrers"):
        kind = {"manifests": "manifest", "blobs": "blob", "referrers": "referrers"}[parts[-2]]
        return RouteMatch(kind, "/".join(parts[:-2]), parts[-1])
    return None

