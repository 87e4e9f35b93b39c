"""Usage errors found from outside that were silently taken as something else
(spec/cli.md): ``--store ""`` used the current folder, ``import --copy --move`` unlinked
the source (the last flag won)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cli.clirun import run
from tests.helpers import make_gguf

STORE_COMMANDS = [["list"], ["import", "a.gguf", "--name", "m:1"], ["gc", "--dry-run"],
                  ["du"], ["config", "set", "max-size", "1G"], ["pin", "m:1"]]


@pytest.mark.timeout(60)
@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=st.sampled_from(STORE_COMMANDS), before=st.booleans())
def test_an_empty_store_option_is_a_usage_error_naming_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], before: bool) -> None:
    work = tmp_path / f"w{os.urandom(4).hex()}"
    work.mkdir()
    make_gguf(work / "a.gguf")
    monkeypatch.chdir(work)
    r = run(*(["--store", "", *args] if before else [*args, "--store", ""]))
    assert r.code == 2, r.err
    assert r.err.splitlines()[0] == ("error: Invalid value for '--store': is empty; give "
                                     "the store's folder"), r.err
    assert sorted(os.listdir(work)) == ["a.gguf"]  # no store made here


@pytest.mark.timeout(60)
@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(modes=st.lists(st.sampled_from(["--copy", "--hardlink", "--move"]), min_size=2,
                      max_size=3).filter(lambda m: len(set(m)) > 1))
def test_two_import_modes_are_a_usage_error_and_nothing_moves(
        tmp_path: Path, modes: list[str]) -> None:
    work = tmp_path / f"w{os.urandom(4).hex()}"
    work.mkdir()
    src = make_gguf(work / "a.gguf")
    r = run("--store", str(work / "s"), "import", str(src), "--name", "m:1", *modes)
    assert r.code == 2, r.err
    first, second = [m for i, m in enumerate(modes) if m not in modes[:i]][:2]
    assert r.err.splitlines()[0] == f"error: {first} and {second} exclude each other: give one"
    assert src.is_file() and not (work / "s").exists()


@pytest.mark.timeout(60)
def test_one_import_mode_given_twice_is_that_mode(tmp_path: Path) -> None:
    src = make_gguf(tmp_path / "a.gguf")
    r = run("--store", str(tmp_path / "s"), "import", str(src), "--name", "m:1",
            "--move", "--move", "--json")
    assert r.code == 0, r.err
    assert r.json()["mode"] in ("move", "hardlink") and not src.exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("group", [[], ["token"]])
def test_a_group_without_a_subcommand_prints_its_help_on_stderr_exit_2(
        group: list[str]) -> None:
    """Found from outside: the whole help squeezed into one 'error: Usage: …' line."""
    r = run(*group)
    helped = run(*group, "--help")
    assert helped.code == 0
    assert (r.code, r.out, r.err) == (2, "", helped.out)
    assert r.err.startswith("Usage: blobctl") and "\n\nCommands:\n" in r.err


@pytest.mark.timeout(60)
@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(verb=st.sampled_from(["pin", "unpin"]), at=st.integers(0, 2))
def test_pin_and_unpin_check_every_name_first(tmp_path: Path, verb: str, at: int) -> None:
    """Found from outside: 'pin m:1 nosuch' pinned m:1, then exited 3."""
    store = tmp_path / f"s{os.urandom(4).hex()}"
    src = make_gguf(tmp_path / "a.gguf")
    for n in ("m:1", "m:2"):
        assert run("--store", str(store), "import", str(src), "--name", n).code == 0
    if verb == "unpin":
        assert run("--store", str(store), "pin", "m:1", "m:2").code == 0
    refs = ["m:1", "m:2"]
    refs.insert(at, "nosuch")
    r = run("--store", str(store), verb, *refs)
    assert r.code == 3, r.err
    listed = run("--store", str(store), "list", "--json").json()
    assert [m["pinned"] for m in listed] == [verb == "unpin"] * 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args", [["compare"], ["bench", "m:1"], ["bench", "--history", "m:1"]])
def test_json_and_csv_together_are_a_usage_error(tmp_path: Path, args: list[str]) -> None:
    """Found from outside: CSV was printed, exit 0."""
    r = run("--store", str(tmp_path / "s"), "--json", *args, "--csv")
    assert (r.code, r.out) == (2, ""), r.err
    assert r.err.splitlines()[0] == "error: --json and --csv exclude each other: give one"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", ["nan", "-1", "inf", "-inf"])
def test_a_lock_timeout_that_is_no_wait_is_a_usage_error(tmp_path: Path, value: str) -> None:
    """Found from outside: ``gc --lock-timeout nan`` ran and said 'within nans'."""
    r = run("gc", "--lock-timeout", value, "--store", str(tmp_path))
    assert r.code == 2 and "--lock-timeout" in r.err.splitlines()[0], r.err


@pytest.mark.timeout(60)
def test_the_access_file_expands_a_tilde_as_store_does(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Found from outside: ``token add --auth '~/x.toml'`` made a folder named '~'."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home").mkdir()
    r = run("token", "add", "ci", "--auth", "~/auth.toml")
    assert r.code == 0, r.err
    assert (tmp_path / "home" / "auth.toml").is_file()
    assert not (tmp_path / "~").exists()


def test_every_commands_summary_is_whole() -> None:
    """``config --help`` listed 'set' as 'Set a setting, e.g.' (click cuts a summary at
    its first '. ')."""
    for group in (["config"], ["token"], []):
        r = run(*group, "--help")
        assert r.code == 0
        lines = r.out.split("Commands:")[1].splitlines()
        assert not [x for x in lines if x.rstrip().endswith(("e.g.", "i.e."))], r.out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args", [["catalog"], ["recommend"], ["update"],
                                  ["update", "--dry-run"], ["outdated"]])
def test_a_store_that_is_a_file_is_exit_3_and_a_missing_one_is_not_made(
        tmp_path: Path, args: list[str]) -> None:
    """Found from outside: catalog and recommend exited 0 with a file as --store, and
    update made a store in a folder that did not exist."""
    (tmp_path / "file").write_bytes(b"")
    r = run(*args, "--store", str(tmp_path / "file"))
    assert r.code == 3 and "it is a file" in r.err, r.err
    r = run(*args, "--store", str(tmp_path / "missing"))
    assert r.code == 0, r.err
    assert not (tmp_path / "missing").exists()


def test_update_json_with_nothing_to_pull_is_one_line(tmp_path: Path) -> None:
    """Found from outside: ``update --json`` printed JSON lines when it pulled, but one
    indented document over many lines when there was nothing to pull."""
    make_gguf(tmp_path / "a.gguf")
    # a registry that refuses at once: the check fails (exit 6), nothing to pull
    assert run("import", str(tmp_path / "a.gguf"), "--name", "127.0.0.1:9/ns/m:1",
               "--store", str(tmp_path / "s")).code == 0
    r = run("update", "--json", "--insecure", "--retries", "0", "--store",
            str(tmp_path / "s"))
    assert r.code == 6, r.err
    lines = r.out.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["status"] == "not all checked", r.out


@pytest.mark.timeout(60)
@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edge=st.sampled_from(["low", "high"]), off=st.integers(-3, 3))
def test_push_chunk_size_range_is_the_documented_one(tmp_path: Path, edge: str,
                                                     off: int) -> None:
    """Found from outside: ``push --chunk-size`` takes only 64K..1G, which no doc said.
    The range spec/cli.md gives for push is the one the CLI enforces: a size in it gets as
    far as the store (a model it lacks: exit 3), one outside is a usage error (exit 2)."""
    from blobstore.units import parse_size
    from tests.cli.clirun import ROOT

    text = (ROOT / "spec" / "cli.md").read_text()
    section = text[text.index("### `push REF DEST"):]
    section = section[:section.index("\n### ")]
    assert "`--chunk-size`" in section and " takes " in section, "push's range is not stated"
    low, high = (parse_size(x) for x in
                 section.split("`--chunk-size`", 1)[1].split(" takes ", 1)[1]
                 .split(";", 1)[0].split(" to "))
    size = (low if edge == "low" else high) + off
    r = run("--store", str(tmp_path / "s"), "push", "m:1", "127.0.0.1:1/ns/repo",
            "--chunk-size", str(size))
    if low <= size <= high:
        assert r.code == 3, r.err
    else:
        assert r.code == 2, r.err
        assert r.err.startswith("error: Invalid value for --chunk-size: must be between "
                                "64K and 1G"), r.err
