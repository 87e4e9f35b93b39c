"""``blobctl token add|list|rm`` (spec/serve.md, "Access control"; spec/cli.md)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from registry_server.auth import load_policy
from registry_server.context import Action
from tests.cli.clirun import run, run_proc
from tests.cli.test_store_cli import one_error_line


def test_add_prints_the_token_once_and_it_works(tmp_path: Path) -> None:
    f = tmp_path / "auth.toml"
    r = run("token", "add", "alice", "--auth", str(f), "--read", "library/*", "--push",
            "team/**", "--tier", "standard")
    assert r.code == 0, r.err
    token = r.out.strip()
    assert token.startswith("blobctl_") and "\n" not in token
    assert "not shown again" in r.err
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    assert token not in f.read_text()
    pol = load_policy(f)
    h = {"authorization": f"Bearer {token}"}
    assert pol.authorize(h, "library/llama3", Action.READ, "standard").status == 200
    assert pol.authorize(h, "library/llama3", Action.READ, "professional").status == 403
    assert pol.authorize(h, "team/a/b", Action.ADMIN, None).status == 200
    assert pol.authorize(h, "library/llama3", Action.PUSH, None).status == 403
    j = run("token", "add", "bob", "--auth", str(f), "--json", "--read", "**")
    assert j.code == 0 and set(j.json()) == {"name", "token"} and j.json()["name"] == "bob"
    assert j.json()["token"] != token


def test_list_never_shows_secrets(tmp_path: Path) -> None:
    f = tmp_path / "auth.toml"
    tokens = [run("token", "add", n, "--auth", str(f), "--read", "library/*").out.strip()
              for n in ("alice", "bob")]
    text = f.read_text()
    hashes = [line.split('"')[1] for line in text.splitlines() if line.startswith("hash")]
    assert len(hashes) == 2
    for args in (("token", "list", "--auth", str(f)), ("token", "list", "--auth", str(f),
                                                        "--json")):
        r = run(*args)
        assert r.code == 0, r.err
        for secret in (*tokens, *hashes, *(h[7:] for h in hashes)):
            assert secret not in r.out + r.err
    doc = run("token", "list", "--json", "--auth", str(f)).json()
    assert [d["name"] for d in doc] == ["alice", "bob"]
    assert doc[0] == {"name": "alice", "tier": "lite", "read": ["library/*"], "push": [],
                      "created": doc[0]["created"]}
    assert doc[0]["created"].endswith("Z")
    table = run("token", "list", "--auth", str(f)).out.splitlines()
    assert table[0].split() == ["NAME", "TIER", "READ", "PUSH", "CREATED"]
    assert table[1].split()[:4] == ["alice", "lite", "library/*", "-"]


def test_errors_and_exit_codes(tmp_path: Path) -> None:
    f = tmp_path / "auth.toml"
    assert run("token", "add", "alice", "--auth", str(f)).code == 0
    before = f.read_bytes()
    r = run("token", "add", "alice", "--auth", str(f), "--read", "**")
    assert r.code == 4 and "already exists" in one_error_line(r)
    r = run("token", "add", "carol", "--auth", str(f), "--read", "library/[x]")
    assert r.code == 4 and "invalid repository pattern" in one_error_line(r)
    r = run("token", "add", "carol", "--auth", str(f), "--push", "/abs")
    assert r.code == 4 and "empty path segment" in one_error_line(r)
    r = run("token", "add", "car ol", "--auth", str(f))
    assert r.code == 4 and "invalid token name" in one_error_line(r)
    r = run("token", "add", "carol", "--auth", str(f), "--tier", "gold")
    assert r.code == 2 and "gold" in r.err
    assert f.read_bytes() == before
    r = run("token", "rm", "carol", "--auth", str(f))
    assert r.code == 3 and "no token named 'carol'" in one_error_line(r)
    r = run("token", "list", "--auth", str(tmp_path / "none.toml"))
    assert r.code == 3 and "no auth file" in one_error_line(r)
    r = run("token", "add", "x")
    assert r.code == 2 and "--auth" in r.err
    (tmp_path / "bad.toml").write_text("[tokens.x]\nhash = 1\n")
    r = run("token", "list", "--auth", str(tmp_path / "bad.toml"))
    assert r.code == 4 and "hash" in one_error_line(r)


def test_rm_and_env_default_in_a_real_process(tmp_path: Path) -> None:
    f = tmp_path / "auth.toml"
    env = {"BLOBCTL_AUTH": str(f)}
    r = run_proc("token", "add", "alice", "--read", "**", env=env)
    assert r.code == 0, r.err
    token = r.out.strip()
    assert run_proc("token", "add", "bob", "--json", env=env).code == 0
    pol = load_policy(f)
    assert pol.authorize({"authorization": f"Bearer {token}"}, "x/y", Action.READ,
                         None).status == 200
    r = run_proc("token", "rm", "alice", "--json", env=env)
    assert r.code == 0 and r.json() == {"name": "alice", "removed": True}
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    assert [d["name"] for d in run_proc("token", "list", "--json", env=env).json()] == ["bob"]
    pol.refresh()
    assert pol.authorize({"authorization": f"Bearer {token}"}, "x/y", Action.READ,
                         None).status == 401
    r = run_proc("token", "rm", "alice", env=env)
    assert r.code == 3 and r.err.startswith("error: no token named 'alice'")


def test_global_options_work_between_token_and_its_subcommand(tmp_path: Path) -> None:
    """Found from outside: `blobctl token --json list` was 'No such option' (exit 2),
    though global options work before and after every other command and subcommand."""
    f = str(tmp_path / "auth.toml")
    assert run("token", "add", "a", "--auth", f, "--read", "**").code == 0
    for args in (("--json", "token", "list"), ("token", "--json", "list"),
                 ("token", "list", "--json")):
        r = run(*args, "--auth", f)
        assert r.code == 0, (args, r.err)
        assert [t["name"] for t in r.json()] == ["a"], args
