"""Repository globs and tiers (spec/serve.md, "Access control")."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blobstore.errors import InvalidInput
from registry_server.auth.patterns import Pattern, canonical_repository, check_tier, tier_rank
from registry_server.context import TIERS

SEG_CHARS = "abcxyz019_.-"
segment = st.text(SEG_CHARS, min_size=1, max_size=6).filter(lambda s: s[0] not in ".-")
repo_2 = st.lists(segment, min_size=2, max_size=2).map("/".join)
host = st.sampled_from(["hf.co", "127.0.0.1:5055", "example.org", "reg.lan:443"])
repo_3 = st.tuples(host, segment, segment).map("/".join)
repository = st.one_of(repo_2, repo_3)


def oracle(pattern: str, subject: str) -> bool:
    """Glob matching written as a plain recursive matcher (no regular expressions)."""
    if not pattern:
        return not subject
    if pattern.startswith("**"):
        rest = pattern.lstrip("*")
        return any(oracle(rest, subject[i:]) for i in range(len(subject) + 1))
    if pattern[0] == "*":
        rest = pattern[1:]
        i = 0
        while True:
            if oracle(rest, subject[i:]):
                return True
            if i >= len(subject) or subject[i] == "/":
                return False
            i += 1
    if not subject:
        return False
    if pattern[0] == "?":
        return subject[0] != "/" and oracle(pattern[1:], subject[1:])
    return pattern[0] == subject[0] and oracle(pattern[1:], subject[1:])


pattern_piece = st.one_of(st.sampled_from(["*", "**", "?", "/", "a", "b", ".", "x/", "/*"]),
                          segment)


@st.composite
def glob(draw: st.DrawFn) -> str:
    text = "".join(draw(st.lists(pattern_piece, min_size=1, max_size=6)))
    text = re.sub("/+", "/", text).strip("/")
    return text or "*"


@given(glob(), repository)
def test_glob_agrees_with_a_plain_matcher(pattern: str, repo: str) -> None:
    p = Pattern.parse(pattern)
    assert p.matches(canonical_repository(repo)) == oracle(p.text, canonical_repository(repo))


@given(st.lists(st.sampled_from(["*", "?*", "a*", "*b", "x"]), min_size=1, max_size=4),
       repository)
def test_single_star_never_crosses_a_slash(segments: list[str], repo: str) -> None:
    p = Pattern.parse("/".join(segments))
    if p.matches(canonical_repository(repo)):
        assert canonical_repository(repo).count("/") == len(segments) - 1


@given(repository)
def test_double_star_crosses_segments(repo: str) -> None:
    c = canonical_repository(repo)
    assert Pattern.parse("**").matches(c)
    first = c.split("/")[0]
    assert Pattern.parse(f"{first}/**").matches(c)
    assert not Pattern.parse(f"{first}/*").matches(c) or c.count("/") == 1


@given(repo_2)
def test_default_host_forms_are_one_repository(repo: str) -> None:
    spelled = [repo, "registry.ollama.ai/" + repo, repo.upper(), "/" + repo + "/"]
    assert {canonical_repository(s) for s in spelled} == {repo.lower()}
    for pat in (repo, "registry.ollama.ai/" + repo, repo.upper()):
        assert all(Pattern.parse(pat).matches(canonical_repository(s)) for s in spelled)


def test_default_host_and_other_hosts() -> None:
    c = canonical_repository
    assert c("llama3") == "library/llama3"
    assert c("hf.co/Org/Repo") == "hf.co/org/repo"
    assert Pattern.parse("*/*").matches(c("library/llama3"))
    assert not Pattern.parse("*/*").matches(c("hf.co/org/repo"))
    assert Pattern.parse("*/*/*").matches(c("hf.co/org/repo"))
    assert Pattern.parse("hf.co/org/*").matches(c("hf.co/org/repo"))
    assert not Pattern.parse("hf.co/*").matches(c("hf.co/org/repo"))
    assert Pattern.parse("hf.co/**").matches(c("hf.co/org/repo"))
    assert Pattern.parse("127.0.0.1:5055/ns/*").matches(c("127.0.0.1:5055/ns/m"))
    assert not Pattern.parse("library/*").matches(c("hf.co/library/x"))
    # a pattern spelled with the default host covers the default host only
    assert Pattern.parse("registry.ollama.ai/**").matches(c("library/x"))
    assert not Pattern.parse("registry.ollama.ai/**").matches(c("hf.co/org/repo"))
    assert Pattern.parse("**").matches(c("hf.co/org/repo"))
    assert Pattern.parse("library/llama?").matches(c("library/llama3"))
    assert not Pattern.parse("library/llama?").matches(c("library/llama31"))


@pytest.mark.parametrize("bad", ["", " ", "/library/*", "library/", "a//b", "lib rary/*",
                                 "library/[ab]", 'x"y', "a/b\n", "ns/{a,b}"])
def test_bad_patterns_are_refused(bad: str) -> None:
    with pytest.raises(InvalidInput):
        Pattern.parse(bad)


def test_tier_order() -> None:
    assert [tier_rank(t) for t in TIERS] == [0, 1, 2]
    assert tier_rank("lite") < tier_rank("standard") < tier_rank("professional")
    assert check_tier(" Standard ") == "standard"
    for bad in ("gold", "", "pro"):
        with pytest.raises(InvalidInput):
            check_tier(bad)
