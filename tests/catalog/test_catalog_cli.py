"""`blobctl catalog` / `recommend` / `pull CATALOG-ID` through the real CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cli.clirun import run, run_proc
from tests.servers import FaultServer

GiB = 1 << 30


def test_catalog_table_and_filters() -> None:
    r = run("catalog")
    assert r.code == 0, r.err
    assert r.out.splitlines()[0].split()[:3] == ["ID", "NAME", "PARAMS"]
    assert "qwen2.5-coder-7b-q5*" in r.out and "~5.4 GB" in r.out
    j = run("catalog", "--json", "--tier", "lite", "--tag", "code").json()
    assert [e["id"] for e in j] == ["qwen2.5-coder-3b-q4"]
    assert j[0]["in_store"] is False and "fits" not in j[0]


def test_catalog_fits_with_planned_ram() -> None:
    j = run("catalog", "--fits", "--ram", "8GiB", "--json").json()
    ids = {e["id"] for e in j}
    assert "llama3.1-8b-q4" in ids and "qwen2.5-coder-7b-q5" not in ids
    assert all(e["fits"] and e["ram_required"] <= 8 * GiB - 2 * GiB for e in j)


def test_recommend_explains_with_figures() -> None:
    r = run("recommend", "--ram", "9GiB")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].startswith("qwen2.5-coder-7b-q5: Qwen2.5-Coder 7B Instruct")
    assert "9.7 GB RAM planned - 2.1 GB reserve" in lines[1]
    assert "GPU: not counted (--ram)" in lines[1]
    j = run("recommend", "--ram", "9GiB", "--json").json()
    assert j["model"]["id"] == "qwen2.5-coder-7b-q5"
    assert j["machine"]["memory_budget"] == 7 * GiB and j["machine"]["planned"]


def test_recommend_on_this_machine_uses_real_figures(tmp_path: Path) -> None:
    import psutil

    j = run("recommend", "--json", "--store", str(tmp_path / "s")).json()
    avail = psutil.virtual_memory().available
    assert abs(j["machine"]["ram_available"] - avail) < 0.2 * avail
    assert j["machine"]["disk_free"] > 0
    assert j["machine"]["gpu_source"] in ("nvidia-smi", "none detected",
                                          "none detected (nvidia-smi failed)")


def test_recommend_nothing_fits_exit_3() -> None:
    r = run("recommend", "--ram", "2GiB")
    assert r.code == 3
    assert r.err.splitlines()[0].startswith(
        "error: no catalog model fits: the smallest, qwen2.5-0.5b-q4, needs 1 GB of memory")
    assert r.err.splitlines()[1].startswith("hint: ")


def test_bad_ram_size_exit_4() -> None:
    r = run("recommend", "--ram", "lots")
    assert r.code == 4 and r.err.startswith("error: invalid size 'lots'")


@pytest.fixture
def user_catalog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[FaultServer, Path]:
    srv = FaultServer().start()
    srv.add_model("library/tiny", "1", b'{"model_format":"gguf"}',
                  [("application/vnd.ollama.image.model", os.urandom(5000))])
    f = tmp_path / "catalog.toml"
    f.write_text(f'''
[[model]]
id = "tiny-test"
name = "Tiny test model"
source = "{srv.netloc}/library/tiny:1"
file_size = 5000
ram_required = 10000
tier = "lite"
recommended = true
''')
    monkeypatch.setenv("BLOBCTL_CATALOG", str(f))
    yield srv, f
    srv.stop()


def test_pull_by_catalog_id(user_catalog: tuple[FaultServer, Path], tmp_path: Path) -> None:
    srv, f = user_catalog
    store = tmp_path / "s"
    r = run_proc("pull", "tiny-test", "--insecure", "--store", str(store), "--json",
                 env={"BLOBCTL_CATALOG": str(f)})
    assert r.code == 0, r.err
    assert json.loads(r.out.splitlines()[-1])["name"] == f"{srv.netloc}/library/tiny:1"
    listed = run("list", "--json", "--store", str(store)).json()
    assert listed[0]["name"] == f"{srv.netloc}/library/tiny:1"
    j = run("catalog", "--json", "--store", str(store)).json()
    assert [e["in_store"] for e in j if e["id"] == "tiny-test"] == [True]


def test_recommend_pull(user_catalog: tuple[FaultServer, Path], tmp_path: Path) -> None:
    srv, _f = user_catalog
    store = tmp_path / "s"
    r = run("recommend", "--tag", "nothing-has-this", "--store", str(store))
    assert r.code == 3 and r.err.startswith("error: no catalog model matches the filters")
    # 2.01 GiB - 2 GiB reserve = 10.7 MB: only tiny-test (10 kB) fits
    r = run("recommend", "--ram", "2.01GiB", "--pull", "--insecure", "--quiet",
            "--store", str(store))
    assert r.code == 0, r.err
    assert r.out.startswith("tiny-test: Tiny test model")
    listed = run("list", "--json", "--store", str(store)).json()
    assert listed[0]["name"] == f"{srv.netloc}/library/tiny:1"


def test_recommend_pull_json_is_json_lines(user_catalog: tuple[FaultServer, Path],
                                           tmp_path: Path) -> None:
    """stdout is JSON lines, as for ``pull --json``: the recommendation, pull's progress,
    and pull's one-line summary last (spec/cli.md, "recommend")."""
    srv, f = user_catalog
    r = run_proc("recommend", "--ram", "2.01GiB", "--pull", "--insecure", "--json",
                 "--store", str(tmp_path / "s"), env={"BLOBCTL_CATALOG": str(f)})
    assert r.code == 0, r.err
    lines = [json.loads(line) for line in r.out.splitlines()]  # every line one document
    assert lines[0]["status"] == "recommended" and lines[0]["model"]["id"] == "tiny-test"
    assert lines[0]["machine"]["planned"] is True and lines[0]["fitting"] == ["tiny-test"]
    assert lines[-1]["status"] == "success"
    assert lines[-1]["name"] == f"{srv.netloc}/library/tiny:1"
    # without --pull: one JSON document, as before
    j = run("recommend", "--ram", "2.01GiB", "--json").json()
    assert "status" not in j and j["model"]["id"] == "tiny-test"


@pytest.mark.timeout(60)
@given(head=st.binary(max_size=40), bad=st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"]),
       json_file=st.booleans(),
       args=st.sampled_from([["catalog"], ["catalog", "--json"], ["recommend"],
                             ["pull", "somemodel"]]))
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_user_catalog_that_is_not_utf8_is_exit_4(tmp_path: Path, head: bytes, bad: bytes,
                                                   json_file: bool, args: list[str]) -> None:
    """Found from outside: exit 1 (a UnicodeDecodeError nobody caught)."""
    user = tmp_path / ("catalog.json" if json_file else "catalog.toml")
    user.write_bytes(head.replace(b"\n", b" ") + bad + b"\n")
    r = run(*args, "--store", str(tmp_path / "s"), env={"BLOBCTL_CATALOG": str(user)})
    assert r.code == 4, r.err
    assert r.err.startswith(f"error: catalog {user}: not UTF-8 text (byte "), r.err
