"""The catalog: shipped data, the user's file, catalog ids as names, fit logic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blobstore.name import ModelName
from catalog.catalog import load_catalog, resolve_ref
from catalog.errors import CatalogError, NothingFits
from catalog.recommend import RESERVE, Machine, fits, recommend
from tests.cli.clirun import run

GB = 10**9
GiB = 1 << 30


def test_shipped_catalog_has_the_models_the_issue_names() -> None:
    cat = load_catalog(False)
    ids = {e.id for e in cat.entries}
    assert {"qwen2.5-coder-3b-q4", "qwen2.5-coder-7b-q5", "qwen2.5-coder-14b-q4",
            "mistral-nemo-12b-q4", "llama3.1-8b-q4", "llama3.2-3b-q4",
            "deepseek-r1-distill-llama-8b-q4", "phi3.5-mini-q4"} <= ids
    for e in cat.entries:
        assert e.approximate and e.origin == "shipped"
        assert e.tier in ("lite", "standard", "professional")
        assert 0 < e.file_size < e.ram_required
        assert e.context >= 4096
        assert e.source.host == "hf.co"


def test_user_file_extends_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "cat.toml"
    f.write_text('''
[[model]]
id = "qwen2.5-coder-7b-q5"
name = "My Qwen"
source = "localhost:5000/me/qwen:q5"
file_size = "5GB"
ram_required = "6.5GB"
tier = "standard"

[[model]]
id = "tiny"
name = "Tiny"
source = "me/tiny:1"
file_size = 1000
ram_required = 2000
tier = "lite"
tags = ["test"]
recommended = true
''')
    monkeypatch.setenv("BLOBCTL_CATALOG", str(f))
    cat = load_catalog()
    q = cat.get("QWEN2.5-coder-7b-q5")
    assert q is not None and q.name == "My Qwen" and q.file_size == 5 * GB
    assert q.ram_required == 6_500_000_000 and q.origin == str(f) and not q.approximate
    assert cat.get("tiny") is not None and len(cat.entries) == len(load_catalog(False).entries) + 1
    assert resolve_ref("tiny", cat)[0] == ModelName.parse("me/tiny:1")


def test_user_json_file_in_xdg_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    (tmp_path / "blobctl").mkdir()
    (tmp_path / "blobctl" / "catalog.json").write_text(json.dumps([
        {"id": "j", "name": "J", "source": "x/j:1", "file_size": 1, "ram_required": 2}]))
    assert load_catalog().get("j") is not None


@pytest.mark.parametrize(("text", "needle"), [
    ("[[model]\nid=1", "does not parse"),
    ('[[model]]\nid = "a"\nname = "A"\nsource = "x/a:1"\nfile_size = 1', "no 'ram_required'"),
    ('[[model]]\nid = "a"\nname = "A"\nsource = "x/a:1"\nfile_size = "lots"\n'
     'ram_required = 1', "invalid size"),
    ('[[model]]\nid = "a"\nname = "A"\nsource = "a b"\nfile_size = 1\nram_required = 1',
     "source"),
    ('[[model]]\nid = "a"\nname = "A"\nsource = "x/a:1"\nfile_size = 1\nram_required = 1\n'
     'tier = "huge"', "tier must be one of"),
    # found from outside: "false" read as true, and a misspelt table was ignored
    ('[[model]]\nid = "a"\nname = "A"\nsource = "x/a:1"\nfile_size = 1\nram_required = 1\n'
     'recommended = "false"', "recommended must be true or false"),
    ('[[model]]\nid = "a"\nname = "A"\nsource = "x/a:1"\nfile_size = 1\nram_required = 1\n'
     'approximate = 0', "approximate must be true or false"),
    ('[meta]\napproximate = "yes"', "meta: approximate must be true or false"),
    ('[[models]]\nid = "a"\nname = "A"\nsource = "x/a:1"\nfile_size = 1\nram_required = 1',
     "unknown table 'models'"),
])
def test_bad_user_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str,
                       needle: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text)
    monkeypatch.setenv("BLOBCTL_CATALOG", str(f))
    with pytest.raises(CatalogError) as e:
        load_catalog()
    assert needle in e.value.message and str(f) in e.value.message
    r = run("catalog")
    assert r.code == 4
    assert r.err.startswith(f"error: catalog {f}: ")


def test_resolve_ref_leaves_names_alone() -> None:
    assert resolve_ref("qwen2.5-coder-7b-q5")[0] == ModelName.parse(
        "hf.co/bartowski/Qwen2.5-Coder-7B-Instruct-GGUF:Q5_K_M")
    assert resolve_ref("llama3:8b")[1] is None          # a tag: never a catalog id
    assert resolve_ref("library/qwen2.5-coder-7b-q5")[1] is None
    assert resolve_ref("unknown-model")[0] == ModelName.parse("unknown-model")


# ---------------------------------------------------------------------- fit logic
def machine(ram: int, gpu: int = 0, disk: int | None = None) -> Machine:
    return Machine(ram, None, gpu, "test" if gpu else "none detected", disk)


def test_fit_uses_ram_minus_reserve_plus_gpu() -> None:
    cat = load_catalog(False)
    q7 = cat.get("qwen2.5-coder-7b-q5")
    assert q7 is not None and q7.ram_required == 6_600_000_000
    # 8 GiB available - 2 GiB reserve = 6.44 GB < 6.6 GB
    assert not fits(q7, machine(8 * GiB))
    assert fits(q7, machine(8 * GiB + 200_000_000))
    assert fits(q7, machine(4 * GiB, gpu=5 * GiB))         # 2 GiB RAM + 5 GiB GPU
    assert not fits(q7, machine(16 * GiB, disk=5 * GB))   # file 5.44 GB > 5 GB free disk
    assert fits(q7, machine(16 * GiB, disk=5 * GB), present=True)
    assert machine(GiB).memory_budget == 0 and 2 * GiB == RESERVE


@pytest.mark.parametrize(("ram", "expected", "recommended"), [
    (4 * GiB, "llama3.2-1b-q4", False),      # budget 2.15 GB: no recommended model fits
    (6 * GiB, "qwen2.5-coder-3b-q4", True),  # 4.29 GB: the 3B coder (2.9 GB)
    (8 * GiB, "llama3.1-8b-q4", True),       # 6.44 GB: Llama 3.1 8B (6.1), not Q5 7B (6.6)
    (9 * GiB, "qwen2.5-coder-7b-q5", True),  # 7.5 GB: the Q5 coder is the largest that fits
    (16 * GiB, "qwen2.5-coder-14b-q4", True),  # 15 GB: the 14B coder (11 GB)
])
def test_recommend_prefers_recommended_then_largest(ram: int, expected: str,
                                                    recommended: bool) -> None:
    rec = recommend(load_catalog(False), machine(ram))
    assert rec.entry.id == expected and rec.entry.recommended is recommended
    assert "reserve" in rec.reasons[0] and "none detected" in rec.reasons[0]
    if not recommended:
        assert "no recommended model fits" in rec.reasons[-1]


def test_nothing_fits_names_the_smallest() -> None:
    with pytest.raises(NothingFits) as e:
        recommend(load_catalog(False), machine(2 * GiB + 500_000_000))
    assert "qwen2.5-0.5b-q4" in e.value.message and "needs 1 GB of memory" in e.value.message
    assert "500 MB for the model" in e.value.message


def test_named_user_file_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLOBCTL_CATALOG", str(tmp_path / "nope.toml"))
    r = run("catalog")
    assert r.code == 4
    assert r.err.splitlines()[0] == f"error: catalog {tmp_path / 'nope.toml'}: No such file or directory"
