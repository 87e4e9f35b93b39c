"""Repository patterns and tiers (spec/serve.md, "Access control").

A repository is named as in the URL: ``ns/repo`` for the default host
(``registry.ollama.ai``) and ``HOST/ns/repo`` for any other. :func:`canonical_repository`
folds the spellings of one repository into one (lower case, the default host dropped,
a bare ``repo`` is ``library/repo``), as Ollama compares names case-insensitively.

A pattern is a glob over that form: ``*`` matches within one path segment (never a
``/``), ``?`` one character of a segment, ``**`` any run of characters across segments;
everything else is literal; matching ignores case. ``**`` matches every repository of
every host; ``*/*`` only the default host's (its repositories have two segments, others
three), as does a pattern spelled ``registry.ollama.ai/...``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from blobstore.errors import InvalidInput
from blobstore.name import DEFAULT_HOST, DEFAULT_NAMESPACE

__all__ = ["Pattern", "canonical_repository", "check_tier", "tier_rank"]

TIERS = ("lite", "standard", "professional")
_RANK = {t: i for i, t in enumerate(TIERS)}
_PATTERN_CHARS = re.compile(r"[A-Za-z0-9_.:*?/-]+")
_DEFAULT_PREFIX = DEFAULT_HOST + "/"


def tier_rank(tier: str) -> int:
    """``lite`` 0 < ``standard`` 1 < ``professional`` 2; KeyError for anything else."""
    return _RANK[tier]


def check_tier(tier: str) -> str:
    """The tier, lower-cased, or InvalidInput naming the three tiers."""
    t = tier.strip().lower()
    if t not in _RANK:
        raise InvalidInput(f"unknown tier {tier!r}", hint=f"tiers: {', '.join(TIERS)}")
    return t


def canonical_repository(repository: str) -> str:
    """The one spelling of a repository that patterns are matched against."""
    r = repository.strip("/").lower()
    if r.startswith(_DEFAULT_PREFIX):
        r = r[len(_DEFAULT_PREFIX):]
    if "/" not in r:
        r = f"{DEFAULT_NAMESPACE}/{r}"
    return r


def _to_regex(glob: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(glob):
        ch = glob[i]
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
            while i < len(glob) and glob[i] == "*":  # "***" is "**"
                i += 1
            continue
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out)


@dataclass(frozen=True)
class Pattern:
    """A validated, compiled repository glob."""

    text: str
    regex: re.Pattern[str]
    default_only: bool = False   # written as "registry.ollama.ai/...": default host only

    @classmethod
    def parse(cls, text: str) -> Pattern:
        """Validate and compile; InvalidInput says what is wrong with the pattern."""
        raw = text
        hint = "patterns look like 'library/*', 'myteam/**', 'hf.co/org/*' or '**'"
        if not raw or not _PATTERN_CHARS.fullmatch(raw):
            raise InvalidInput(f"invalid repository pattern {text!r}: use letters, digits, "
                               "'._-:' and the wildcards '*', '**', '?' between '/'", hint=hint)
        if raw.startswith("/") or raw.endswith("/") or "//" in raw:
            raise InvalidInput(f"invalid repository pattern {text!r}: empty path segment",
                               hint=hint)
        norm = raw.lower()
        default_only = norm.startswith(_DEFAULT_PREFIX)
        body = norm[len(_DEFAULT_PREFIX):] if default_only else norm
        return cls(norm, re.compile(_to_regex(body), re.IGNORECASE), default_only)

    def matches(self, canonical: str) -> bool:
        """Whether the pattern matches a repository given in :func:`canonical_repository`
        form."""
        if self.default_only and canonical.count("/") != 1:
            return False
        return self.regex.fullmatch(canonical) is not None

    def __str__(self) -> str:
        return self.text
