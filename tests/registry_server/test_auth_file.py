"""The access file and the live-reloading policy (registry_server/auth)."""

from __future__ import annotations

import base64
import logging
import os
import stat
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from registry_server.auth import (
    AuthFileError,
    AuthPolicy,
    TokenExists,
    TokenNotFound,
    add_token,
    list_tokens,
    load_policy,
    remove_token,
)
from registry_server.auth.authfile import hash_token, load
from registry_server.context import Action


def mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}", "host": "127.0.0.1:5050"}


def test_add_creates_0600_keeps_it_and_keeps_other_keys(tmp_path: Path) -> None:
    f = tmp_path / "sub" / "auth.toml"
    t1 = add_token(f, "alice", read=["library/*"], push=[], tier="standard")
    assert mode(f) == 0o600
    text = f.read_text()
    assert t1 not in text and hash_token(t1) in text and "secret = " in text
    secret = load(f).secret
    # hand edits survive a rewrite: anonymous rights, tiers, an unknown key, loose mode
    f.write_text('future_key = 7\n' + text + '\n[anonymous]\nread = ["library/*"]\n'
                 '[tiers]\n"hf.co/**" = "professional"\n')
    os.chmod(f, 0o644)
    t2 = add_token(f, "bob", read=[], push=["team/**"], tier="lite")
    assert mode(f) == 0o600
    doc = load(f)
    assert doc.secret == secret and doc.raw["future_key"] == 7
    assert [p.text for p in doc.anonymous.read] == ["library/*"]
    assert [(p.text, t) for p, t in doc.tiers] == [("hf.co/**", "professional")]
    assert sorted(doc.tokens) == ["alice", "bob"] and t1 != t2
    assert [e.name for e in list_tokens(f)] == ["alice", "bob"]
    assert not [p for p in f.parent.iterdir() if p.name != "auth.toml"]  # no temp files left
    remove_token(f, "alice")
    assert mode(f) == 0o600 and sorted(load(f).tokens) == ["bob"]


def test_duplicate_and_unknown_names_and_bad_input(tmp_path: Path) -> None:
    f = tmp_path / "auth.toml"
    add_token(f, "alice", read=["**"], push=[], tier="lite")
    before = f.read_bytes()
    with pytest.raises(TokenExists):
        add_token(f, "alice", read=["**"], push=[], tier="lite")
    with pytest.raises(TokenNotFound):
        remove_token(f, "carol")
    with pytest.raises(TokenNotFound):
        remove_token(tmp_path / "none.toml", "alice")
    for kw in ({"read": ["bad pattern"]}, {"push": ["/x"]}, {"tier": "gold"}):
        args = {"read": [], "push": [], "tier": "lite", **kw}
        with pytest.raises(Exception) as ei:
            add_token(f, "dave", **args)  # type: ignore[arg-type]
        assert getattr(ei.value, "message", "")
    with pytest.raises(Exception, match="invalid token name"):
        add_token(f, "a b", read=[], push=[], tier="lite")
    assert f.read_bytes() == before


@pytest.mark.parametrize("text, where", [
    ("secret = \n", "not valid TOML"),
    ("[anonymous]\nread = [1]\n", "anonymous"),
    ("[tiers]\n'lib/*' = 'gold'\n", "tiers"),
    ("[tokens.x]\nhash = 'md5:00'\n", "hash"),
    ("[tokens.x]\nhash = 'sha256:" + "0" * 64 + "'\ntier = 'pro'\n", "tier"),
    ("realm = 'javascript:x'\n", "realm"),
])
def test_invalid_files_name_the_problem(tmp_path: Path, text: str, where: str) -> None:
    f = tmp_path / "auth.toml"
    f.write_text(text)
    with pytest.raises(AuthFileError, match=where):
        load_policy(f)


def test_live_reload_keeps_last_good_and_warns_once(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    f = tmp_path / "auth.toml"
    alice = add_token(f, "alice", read=["library/*"], push=[], tier="lite")
    pol = AuthPolicy(f, check_interval=0.05)
    assert pol.authorize(bearer(alice), "library/a", Action.READ, None).status == 200
    bob = add_token(f, "bob", read=["**"], push=[], tier="lite")
    deadline = time.monotonic() + 5
    while pol.authorize(bearer(bob), "library/a", Action.READ, None).status != 200:
        assert time.monotonic() < deadline, "new token not picked up"
        time.sleep(0.01)
    good = f.read_bytes()
    caplog.set_level(logging.WARNING, "blobctl.serve.auth")
    f.write_text("this is [not toml")
    for _ in range(20):
        time.sleep(0.06)
        assert pol.authorize(bearer(bob), "library/a", Action.READ, None).status == 200
    warnings = [r for r in caplog.records if "not reloaded" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    f.unlink()
    time.sleep(0.06)
    assert pol.authorize(bearer(alice), "library/a", Action.READ, None).status == 200
    f.write_bytes(good)
    remove_token(f, "alice")
    deadline = time.monotonic() + 5
    while pol.authorize(bearer(alice), "library/a", Action.READ, None).status != 401:
        assert time.monotonic() < deadline, "removed token still accepted"
        time.sleep(0.01)
    assert pol.authorize(bearer(bob), "library/a", Action.READ, None).status == 200


class FileVersusPolicy(RuleBasedStateMachine):
    """Random edits of the file (token add/rm, corrupt writes, hand edits of rights);
    after each the policy, refreshed, answers exactly as the last valid file says."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens: dict[str, tuple[str, str, str]] = {}  # name -> (token, read, tier)

    @initialize(folder=st.just(None))
    def setup(self, folder: None) -> None:
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="authsm"))
        self.f = self.dir / "auth.toml"
        t = add_token(self.f, "root", read=["**"], push=["**"], tier="professional")
        self.tokens["root"] = (t, "**", "professional")
        self.pol = AuthPolicy(self.f, check_interval=3600)  # refreshed by hand below

    def teardown(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(name=st.sampled_from(["a", "b", "c"]), read=st.sampled_from(["library/*", "x/**"]),
          tier=st.sampled_from(["lite", "standard", "professional"]))
    def add(self, name: str, read: str, tier: str) -> None:
        if name in self.tokens:
            with pytest.raises(TokenExists):
                add_token(self.f, name, read=[read], push=[], tier=tier)
        else:
            self.tokens[name] = (add_token(self.f, name, read=[read], push=[], tier=tier),
                                 read, tier)
        self.pol.refresh()

    @rule(name=st.sampled_from(["a", "b", "c"]))
    def rm(self, name: str) -> None:
        if name in self.tokens:
            remove_token(self.f, name)
            del self.tokens[name]
        else:
            with pytest.raises(TokenNotFound):
                remove_token(self.f, name)
        self.pol.refresh()

    @rule(junk=st.binary(max_size=40))
    def corrupt_and_restore(self, junk: bytes) -> None:
        good = self.f.read_bytes()
        self.f.write_bytes(b"[tokens\n" + junk)
        self.pol.refresh()  # bad file: the last good one stays
        self.check()
        self.f.write_bytes(good)
        self.pol.refresh()

    @invariant()
    def check(self) -> None:
        if not hasattr(self, "pol"):
            return
        for name, (tok, read, tier) in self.tokens.items():
            for repo in ("library/m", "x/y/z"):
                for model_tier in ("lite", "professional"):
                    d = self.pol.authorize(bearer(tok), repo, Action.READ, model_tier)
                    allowed = (read == "**" or (read == "library/*") == (repo == "library/m"))
                    ok = allowed and (model_tier == "lite" or tier == "professional")
                    assert d.status == (200 if ok else 403), (name, repo, model_tier, d)
        assert self.pol.authorize(bearer("blobctl_" + "A" * 43), "library/m", Action.READ,
                                  None).status == 401


TestFileVersusPolicy = FileVersusPolicy.TestCase
TestFileVersusPolicy.settings = settings(max_examples=25, stateful_step_count=12,
                                         deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])


@given(st.binary(max_size=64), st.sampled_from(["Basic", "Bearer", "basic", "Token", ""]))
@settings(max_examples=200, deadline=None)
def test_garbage_credentials_are_401_never_an_error(tmp_path_factory: pytest.TempPathFactory,
                                                    junk: bytes, scheme: str) -> None:
    f = tmp_path_factory.getbasetemp() / "garbage.toml"
    if not f.exists():
        add_token(f, "alice", read=["**"], push=["**"], tier="professional")
    pol = AuthPolicy(f)
    for cred in (junk.decode("latin-1"), base64.b64encode(junk).decode()):
        d = pol.authorize({"authorization": f"{scheme} {cred}"}, "library/a", Action.READ, None)
        assert d.status == 401 and d.challenge and d.challenge.startswith("Bearer realm=")


def test_a_server_does_not_start_without_a_usable_file(tmp_path: Path) -> None:
    from blobstore.errors import NotFound

    with pytest.raises(NotFound, match="no auth file"):
        load_policy(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[anonymous]\nread = 'library/[x]'\n")
    with pytest.raises(AuthFileError, match="invalid repository pattern"):
        load_policy(tmp_path / "bad.toml")


@pytest.mark.timeout(60)
def test_requests_during_rewrites_see_one_whole_policy(tmp_path: Path) -> None:
    """4 threads authorize while the file is rewritten 60 times (tokens added and removed,
    an invalid file now and then, a truncate-then-write in place): a token present in every
    version is always allowed, a token never added is never allowed, nothing raises."""
    import random
    import threading

    f = tmp_path / "auth.toml"
    stable = add_token(f, "stable", read=["library/*"], push=[], tier="standard")
    pol = AuthPolicy(f, check_interval=0.002)
    stop = threading.Event()
    errors: list[str] = []
    count = [0]

    def hammer() -> None:
        while not stop.is_set():
            try:
                d = pol.authorize(bearer(stable), "library/m", Action.READ, "standard")
                if d.status != 200:
                    errors.append(f"stable refused: {d}")
                d = pol.authorize(bearer("blobctl_" + "B" * 43), "library/m", Action.READ, None)
                if d.status != 401:
                    errors.append(f"unknown token allowed: {d}")
                count[0] += 1
            except Exception as exc:
                errors.append(repr(exc))
            time.sleep(0.0002)  # leave the writer some of the GIL

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    rng = random.Random(7)
    try:
        for i in range(60):
            if rng.random() < 0.2:  # an invalid version, then the good one, each atomic
                good = f.read_bytes()
                replace(f, good[: rng.randrange(len(good))] + b"\n= not toml")
                time.sleep(0.005)
                replace(f, good)
            elif rng.random() < 0.1:  # truncated in place before it is written again
                good = f.read_bytes()
                with f.open("r+b") as fh:
                    fh.truncate(0)
                    fh.flush()
                    time.sleep(0.01)
                    fh.write(good)
            elif f"t{i - 1}" in load(f).tokens and rng.random() < 0.5:
                remove_token(f, f"t{i - 1}")
            else:
                add_token(f, f"t{i}", read=["**"], push=[], tier="lite")
            time.sleep(0.005)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors, errors[:5]
    assert count[0] > 100 and pol.reloads > 10


def replace(f: Path, data: bytes) -> None:
    tmp = f.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, f)


def test_expired_bearer_tokens_are_refused_with_a_challenge(tmp_path: Path) -> None:
    f = tmp_path / "auth.toml"
    t = add_token(f, "alice", read=["**"], push=[], tier="lite")
    pol = load_policy(f)
    caller = pol.identify(bearer(t))
    assert caller is not None and caller.subject == "alice"
    scopes = [("library/m", ("pull",))]
    fresh, _ = pol.issue(caller, scopes)
    old, tok = pol.issue(caller, scopes, now=time.time() - pol.token_lifetime - 1)
    assert tok.expires_at < time.time()
    assert pol.authorize(bearer(fresh), "library/m", Action.READ, None).status == 200
    d = pol.authorize(bearer(old), "library/m", Action.READ, None)
    assert d.status == 401 and d.challenge is not None and "scope=" in d.challenge
