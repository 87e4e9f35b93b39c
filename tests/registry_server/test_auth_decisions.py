"""The decision table of AuthPolicy.authorize (spec/serve.md, "Decisions") searched by
hypothesis: random access files (token rights, tiers, anonymous rights) and random
requests, against an oracle written from the spec with a plain glob matcher."""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path

import tomli_w
from hypothesis import given, settings
from hypothesis import strategies as st

from registry_server.auth import AuthPolicy
from registry_server.auth.authfile import hash_token, new_token
from registry_server.context import TIERS, Action
from tests.registry_server.test_auth_patterns import oracle as glob_match

REPOS = ["library/a", "library/b", "team/a", "team/x/y", "hf.co/team/a", "hf.co/a/b"]
PATTERNS = ["**", "library/*", "team/**", "*/a", "*/*", "hf.co/*/*", "hf.co/**", "team/a",
            "*/*/*", "?eam/*", "library/?"]

rights = st.fixed_dictionaries({
    "read": st.lists(st.sampled_from(PATTERNS), max_size=3),
    "push": st.lists(st.sampled_from(PATTERNS), max_size=2),
    "tier": st.sampled_from(TIERS),
})


def rank(t: str) -> int:
    return TIERS.index(t)


def allowed(r: dict[str, object], repo: str | None, action: Action) -> bool:
    read, push = list(r["read"]), list(r["push"])  # type: ignore[call-overload]
    pats = read + push if action is Action.READ else push
    if repo is None:
        return True if action is Action.READ else bool(push)
    return any(glob_match(p, repo) for p in pats)


def expect(anon: dict[str, object], tok: dict[str, object] | None, valid: bool,
           repo: str | None, action: Action, tier: str | None) -> int:
    if not valid:
        return 401
    if tok is None:  # anonymous: every refusal asks for credentials
        if (repo is None and action is Action.READ) or not allowed(anon, repo, action):
            return 401
        return 401 if tier is not None and rank(tier) > rank(str(anon["tier"])) else 200
    if not allowed(tok, repo, action):
        return 403
    return 403 if tier is not None and rank(tier) > rank(str(tok["tier"])) else 200


@given(anon=rights, tokens=st.lists(rights, min_size=1, max_size=3),
       requests=st.lists(st.tuples(
           st.sampled_from(["none", "bearer", "basic", "wrong"]), st.integers(0, 2),
           st.sampled_from([None, *REPOS]), st.sampled_from(list(Action)),
           st.sampled_from([None, *TIERS])), min_size=1, max_size=12))
@settings(max_examples=150, deadline=None)
def test_authorize_follows_the_decision_table(
        anon: dict[str, object], tokens: list[dict[str, object]],
        requests: list[tuple[str, int, str | None, Action, str | None]]) -> None:
    secrets = [new_token() for _ in tokens]
    doc = {"anonymous": anon,
           "tokens": {f"t{i}": {**r, "hash": hash_token(s)}
                      for i, (r, s) in enumerate(zip(tokens, secrets, strict=True))}}
    with tempfile.TemporaryDirectory() as folder:
        f = Path(folder) / "auth.toml"
        f.write_text(tomli_w.dumps(doc))
        pol = AuthPolicy(f)
    for kind, which, repo, action, tier in requests:
        i = which % len(tokens)
        if kind == "none":
            headers: dict[str, str] = {}
        elif kind == "bearer":
            headers = {"authorization": f"Bearer {secrets[i]}"}
        elif kind == "basic":
            headers = {"authorization": "Basic " + base64.b64encode(
                f"user{i}:{secrets[i]}".encode()).decode()}
        else:
            headers = {"authorization": f"Bearer {secrets[i][:-1]}{'A' if secrets[i][-1] != 'A' else 'B'}"}
        d = pol.authorize(headers, repo, action, tier)
        want = expect(anon, None if kind == "none" else tokens[i], kind != "wrong", repo,
                      action, tier)
        assert d.status == want, (kind, i, repo, action, tier, d)
        assert (d.challenge is not None) == (d.status == 401)
        if repo is not None and d.status != 401:
            assert pol.visible(headers, repo) == allowed(
                anon if kind == "none" else tokens[i], repo, Action.READ)
