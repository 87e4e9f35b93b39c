from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blobstore.units import human_bytes
from tests.cli.clirun import ROOT, Result, run, run_proc
from tests.helpers import OllamaFixture, make_gguf


def one_error_line(r: Result) -> str:
    lines = r.err.strip().splitlines()
    assert lines and lines[0].startswith("error: "), r.err
    assert all(line.startswith("hint: ") for line in lines[1:]), r.err
    assert "Traceback" not in r.err
    return lines[0]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".blobctl" not in p.parts}


def test_list_table_matches_ollama_list(ollama_fx: OllamaFixture) -> None:
    r = run("--store", str(ollama_fx.root), "list")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].split() == ["NAME", "ID", "SIZE", "LAST", "USED", "PINNED"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    for m in ollama_fx.models.values():
        row = rows[m.display]
        assert row[1] == m.id
        assert " ".join(row[2:4]) == human_bytes(m.size)


def test_list_json_shape_with_options_after_subcommand(ollama_fx: OllamaFixture) -> None:
    r = run("list", "--json", "--store", str(ollama_fx.root))
    assert r.code == 0, r.err
    items = {x["name"]: x for x in r.json()}
    m = ollama_fx.models["localhost:5000/team/gem:v1"]
    x = items["localhost:5000/team/gem:v1"]
    assert x["digest"] == "sha256:" + __import__("hashlib").sha256(m.raw).hexdigest()
    assert x["size"] == m.size and x["id"] == m.id and x["pinned"] is False
    assert set(items) == {m.full for m in ollama_fx.models.values()}


@pytest.mark.parametrize("var", ["BLOBCTL_STORE", "OLLAMA_MODELS"])
def test_store_from_environment(ollama_fx: OllamaFixture, var: str) -> None:
    r = run("list", "--json", env={var: str(ollama_fx.root)})
    assert r.code == 0 and len(r.json()) == len(ollama_fx.models)


def test_blobctl_store_wins_over_ollama_models(ollama_fx: OllamaFixture, tmp_path: Path) -> None:
    r = run("list", "--json", env={"BLOBCTL_STORE": str(tmp_path / "other"),
                                   "OLLAMA_MODELS": str(ollama_fx.root)})
    assert r.code == 0 and r.json() == []


def test_show_json_and_path_records_use(ollama_fx: OllamaFixture) -> None:
    s = str(ollama_fx.root)
    r = run("show", "llama3:8b", "--json", "--store", s)
    assert r.code == 0, r.err
    doc = r.json()
    m = ollama_fx.models["llama3:8b"]
    assert doc["name"] == "registry.ollama.ai/library/llama3:8b"
    assert doc["digest"].endswith(m.id) is False and doc["id"] == m.id
    assert [x["mediaType"].rsplit(".", 1)[1] for x in doc["layers"]] == \
        ["model", "template", "params"]
    assert doc["model_path"] == str(ollama_fx.blob_path(m.model_digest))
    assert doc["details"]["family"] == "llama"
    p = run("path", "llama3:8b", "--store", s)
    assert p.code == 0 and p.out.strip() == str(ollama_fx.blob_path(m.model_digest))
    assert Path(p.out.strip()).read_bytes()[:4] == b"GGUF"
    listed = {x["name"]: x for x in run("list", "--json", "--store", s).json()}
    assert listed["registry.ollama.ai/library/llama3:8b"]["use_count"] == 2
    assert listed["registry.ollama.ai/library/llama3:8b"]["last_used"] is not None


def test_show_human(ollama_fx: OllamaFixture) -> None:
    r = run("--store", str(ollama_fx.root), "show", "hf.co/bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M")
    assert r.code == 0, r.err
    assert "qwen2" in r.out and "model path" in r.out


def test_rm_pin_and_errors(ollama_fx: OllamaFixture) -> None:
    s = str(ollama_fx.root)
    assert run("pin", "terse", "--store", s).code == 0
    r = run("rm", "terse", "--store", s)
    assert r.code == 4 and "pinned" in one_error_line(r)
    r = run("rm", "terse", "--force", "--json", "--store", s)
    assert r.code == 0, r.err
    assert r.json()["removed"][0]["name"] == "registry.ollama.ai/library/terse:latest"
    r = run("rm", "terse", "--store", s)
    assert r.code == 3 and "not found" in one_error_line(r)
    assert run("unpin", "nope", "--store", s).code == 3


def test_verify_names_corrupt_blob_and_fails(ollama_fx: OllamaFixture) -> None:
    s = str(ollama_fx.root)
    ok = run("verify", "--store", s)
    assert ok.code == 0, ok.err
    m = ollama_fx.models["llama3:8b"]
    p = ollama_fx.blob_path(m.model_digest)
    os.chmod(p, 0o644)
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    r = run("verify", "--store", s)
    assert r.code == 5
    assert f"corrupt: {m.model_digest}" in r.out
    j = run("verify", "--json", "--store", s)
    assert j.code == 5 and j.json()["problems"][0]["digest"] == m.model_digest


@pytest.mark.parametrize("ref", ["../../etc/passwd", "a/b/c/d", "bad name", "x:", "ns/-m",
                                 "ns.dot/m"])
def test_bad_names_one_line_and_nothing_written(ollama_fx: OllamaFixture, ref: str,
                                                gguf_file: Path) -> None:
    s = str(ollama_fx.root)
    before = snapshot(ollama_fx.root)
    for args in (("show", ref), ("path", ref), ("rm", ref), ("pin", ref),
                 ("import", str(gguf_file), "--name", ref)):
        r = run(*args, "--store", s)
        assert r.code == 4, (args, r.err)
        assert "invalid model name" in one_error_line(r)
    assert snapshot(ollama_fx.root) == before


def test_import_cli_and_bad_file(tmp_path: Path) -> None:
    s = str(tmp_path / "store")
    g = make_gguf(tmp_path / "m.gguf")
    r = run("import", str(g), "--name", "mine:v1", "--param", "temperature=0.2",
            "--system", "hi", "--json", "--store", s)
    assert r.code == 0, r.err
    assert r.json()["name"] == "registry.ollama.ai/library/mine:v1"
    assert run("path", "mine:v1", "--store", s).out.strip().endswith(
        r.json()["model_digest"].replace(":", "-"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"hello")
    before = snapshot(tmp_path / "store")
    r = run("import", str(bad), "--name", "bad", "--store", s)
    assert r.code == 4 and "not a readable GGUF" in one_error_line(r)
    assert snapshot(tmp_path / "store") == before
    r = run("import", str(tmp_path / "nope.gguf"), "--name", "x", "--store", s)
    assert r.code == 3 and "no such file" in one_error_line(r)  # spec: not found


def test_import_move_of_the_stores_own_blob_keeps_it(tmp_path: Path) -> None:
    """Found from outside: 'import --move "$(blobctl path a:1)" --name b:1' exited 0 and
    deleted the blob both models use."""
    s = str(tmp_path / "store")
    g = make_gguf(tmp_path / "m.gguf")
    assert run("import", str(g), "--name", "a:1", "--store", s).code == 0
    blob = run("path", "a:1", "--store", s).out.strip()
    r = run("import", "--move", blob, "--name", "b:1", "--json", "--store", s)
    assert r.code == 0, r.err
    assert r.json()["mode"] == "hardlink"
    assert "store's own file: imported without moving it" in r.err
    assert Path(blob).read_bytes() == g.read_bytes()
    assert run("verify", "--store", s).code == 0
    for ref in ("a:1", "b:1"):
        assert run("path", ref, "--store", s).out.strip() == blob


def test_import_of_a_gguf_nested_5000_deep_is_exit_4(tmp_path: Path) -> None:
    """Found from outside: a 60 KB GGUF whose metadata nests arrays 5000 deep gave exit 1
    ('maximum recursion depth exceeded')."""
    import struct

    def s(text: str) -> bytes:
        return struct.pack("<Q", len(text)) + text.encode()

    body = s("general.architecture") + struct.pack("<I", 8) + s("llama") + s("x")
    body += struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 5000 + struct.pack("<IQ", 0, 0)
    g = tmp_path / "nested.gguf"
    g.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + body)
    store = tmp_path / "store"
    r = run("import", str(g), "--name", "nested:1", "--store", str(store))
    assert r.code == 4, r.err
    assert one_error_line(r) == (f"error: {g}: not a readable GGUF file: metadata arrays "
                                 f"nested more than 8 deep")
    assert run("list", "--json", "--store", str(store)).json() == []


_HOSTILE_ARCH = "\x1b]0;pwned\x07\x1b[2J\x9b31m\x7f\nfamily  forged\tx"


def _control_chars(text: str) -> set[str]:
    return {c for c in text if (ord(c) < 0x20 and c != "\n") or 0x7f <= ord(c) <= 0x9f}


def test_show_escapes_control_characters_of_a_gguf_string(tmp_path: Path) -> None:
    """Found from outside: a GGUF's general.architecture with terminal escapes (a title
    change, a screen clear) was printed raw by 'show'. Text output shows them as \\xNN;
    JSON keeps the exact string."""
    import struct

    def s(text: str) -> bytes:
        b = text.encode()
        return struct.pack("<Q", len(b)) + b

    g = tmp_path / "ansi.gguf"
    g.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + s("general.architecture")
                  + struct.pack("<I", 8) + s(_HOSTILE_ARCH))
    st = str(tmp_path / "store")
    assert run("import", str(g), "--name", "ansi:1", "--store", st).code == 0
    r = run("show", "ansi:1", "--store", st)
    assert r.code == 0, r.err
    assert _control_chars(r.out) == set()
    family = [line for line in r.out.splitlines() if line.lstrip().startswith("family")]
    assert family == ["  family        \\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\x7f\\x0afamily"
                      "  forged\\x09x"]
    assert run("show", "ansi:1", "--json", "--store", st).json()["details"]["family"] \
        == _HOSTILE_ARCH


def test_error_lines_escape_control_characters_of_a_file_name(tmp_path: Path) -> None:
    bad = tmp_path / "bad\x1b[31m\x9b.gguf"
    bad.write_bytes(b"not a gguf")
    r = run("import", str(bad), "--name", "x:1", "--store", str(tmp_path / "store"))
    assert r.code == 4
    assert _control_chars(r.err) == set()
    assert "bad\\x1b[31m\\x9b.gguf: not a readable GGUF" in one_error_line(r)


def test_warning_lines_escape_control_characters_of_a_file_name(tmp_path: Path) -> None:
    """Warnings go through logging: they are escaped too (found by review)."""
    store = tmp_path / "store"
    loop = store / "manifests" / "registry.ollama.ai" / "library" / "bad\x1b[2J\n"
    loop.parent.mkdir(parents=True)
    loop.symlink_to(loop.name)
    r = run_proc("list", "--store", str(store))  # (a real process: its own logging)
    assert r.code == 0, r.err
    assert _control_chars(r.err) == set(), r.err
    assert "bad\\x1b[2J\\x0a" in r.err


def test_du_json(ollama_fx: OllamaFixture) -> None:
    r = run("du", "--json", "--store", str(ollama_fx.root))
    assert r.code == 0
    doc = r.json()
    # Ollama's 1000-byte -partial file is an unfinished download, not an unreferenced blob
    assert doc["unreferenced_bytes"] == 0 and doc["ingest_bytes"] >= 1000
    assert {m["name"] for m in doc["models"]} == {m.full for m in ollama_fx.models.values()}


def test_usage_error_exit_2() -> None:
    r = run("list", "--bogus")
    assert r.code == 2 and one_error_line(r)
    r = run("frobnicate")
    assert r.code == 2


def test_debug_shows_traceback(ollama_fx: OllamaFixture) -> None:
    r = run("show", "nope", "--debug", "--store", str(ollama_fx.root))
    assert r.code == 3 and "Traceback" in r.err and "error: model" in r.err


def test_real_subprocess(ollama_fx: OllamaFixture) -> None:
    s = str(ollama_fx.root)
    r = run_proc("list", "--json", "--store", s)
    assert r.code == 0, r.err
    assert len(r.json()) == len(ollama_fx.models)
    r = run_proc("path", "nope:1", env={"BLOBCTL_STORE": s})
    assert r.code == 3 and one_error_line(r) == "error: model 'nope:1' not found"


def test_help_is_fast_and_imports_little() -> None:
    code = ("import sys\nsys.argv=['blobctl','--help']\nfrom cli.main import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "heavy = {'httpx','msgspec','sqlite3','blobstore.store','psutil'} & set(sys.modules)\n"
            "sys.stderr.write(repr(sorted(heavy)))\nsys.exit(1 if heavy else 0)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "list" in p.stdout and "pull" in p.stdout
    t0 = time.perf_counter()
    for _ in range(3):
        assert run_proc("--help").code == 0
    assert (time.perf_counter() - t0) / 3 < 1.5


def test_big_output_is_complete_through_a_pipe_and_a_closed_pipe_is_quiet(
        tmp_path: Path) -> None:
    """The command leaves without tearing its heap down (os._exit): everything written
    must still reach a pipe in full, and a reader that stops early causes no traceback."""
    from blobstore.store import Store

    store = Store(tmp_path / "s")
    digests = {str(store.put_bytes(b"orphan %d" % i)) for i in range(3000)}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BLOBCTL_STORE": str(store.root)}
    cmd = [sys.executable, "-m", "cli", "gc", "--dry-run", "--grace", "0", "--json"]
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr
    import json

    assert set(json.loads(p.stdout)["removed_blobs"]) == digests  # ~220 KB, all there
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(10)
    proc.stdout.close()  # the reader goes away early, as `| head -c 10` would
    err = proc.stderr.read().decode()
    # spec/cli.md: a reader gone is exit 141 (the output is ~220 KB, more than a pipe
    # holds: the command cannot have finished; it was 0, CPython dropping the rest of a
    # short write, until stdout became blobctl's own, cli/streams.py)
    assert proc.wait(timeout=60) == 141
    assert "Traceback" not in err and "Exception ignored" not in err


def test_a_mistyped_store_is_not_ok_and_is_not_made(tmp_path: Path) -> None:
    """Found from outside: `verify --store <typo>` said ok (exit 0), and `pin x` on a
    store that does not exist made its folders before saying the model is not there."""
    typo = tmp_path / "no-such-store"
    r = run("verify", "--store", str(typo))
    assert r.code == 3 and r.err.startswith("error: no store at "), (r.code, r.err)
    for cmd in ("pin", "unpin"):
        r = run(cmd, "x:1", "--store", str(typo))
        assert r.code == 3, (r.code, r.err)
    assert not typo.exists()
