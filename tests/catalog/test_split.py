"""Split GGUFs (one model in N files, N model layers) loaded by run and bench.

Found from outside: a split GGUF adopted from an HF cache (or pulled from hf.co, which
serves split models the same way) was one model with N model layers, but ``run`` and
``bench`` handed llama.cpp the first blob's path, and llama.cpp, which finds the other
parts by name (``-00001-of-0000N.gguf``), said "invalid split file name" (exit 4,
blaming an intact file); ``path --json`` named part 1 only. The parts are made by the
``gguf`` package's split writer from the tiny model of tests/llm_fixture.py, and really
loaded by llama-cpp-python.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore.caches import adopt_hf_cache
from blobstore.gguf import read_gguf
from blobstore.lease import Lease
from blobstore.manifest import LAYER_MODEL, Descriptor
from blobstore.name import ModelName
from blobstore.store import Store
from tests.cli.clirun import ROOT, run, run_proc
from tests.llm_fixture import make_llama_split

NAME = "hf.co/org/tiny:F32"


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, int], list[Path]]:
    """(parts, seed) -> the tiny model's files: 1-4 parts of seed 0, 2 parts of seed 1."""
    root = tmp_path_factory.mktemp("splits")
    out = {}
    for parts, seed in [(1, 0), (2, 0), (3, 0), (4, 0), (2, 1)]:
        folder = root / f"{parts}-{seed}"
        folder.mkdir()
        out[parts, seed] = make_llama_split(folder / "tiny-F32.gguf", parts, seed=seed)
    return out


def hf_cache(cache: Path, files: list[Path]) -> None:
    """``files`` in a Hugging Face cache as huggingface_hub writes one (org/tiny)."""
    repo = cache / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "blobs").mkdir()
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    for f in files:
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        (repo / "snapshots" / "abc123" / f.name).symlink_to(blob)


@contextlib.contextmanager
def temp_dir(path: Path) -> Iterator[Path]:
    """``tempfile``'s folder (where the split links go) set to ``path`` meanwhile."""
    path.mkdir(parents=True, exist_ok=True)
    old, tempfile.tempdir = tempfile.tempdir, str(path)
    try:
        yield path
    finally:
        tempfile.tempdir = old


def mapped_files() -> set[str]:
    with open("/proc/self/maps") as f:
        return {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}


@pytest.mark.timeout(120)
@settings(max_examples=8, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.integers(1, 4))
def test_an_adopted_split_model_runs_and_benches_as_the_one_file_model_does(
        llama_cpp: object, splits: dict[tuple[int, int], list[Path]], tmp_path: Path,
        parts: int) -> None:
    from catalog.bench import benchmark, generate

    with tempfile.TemporaryDirectory(dir=tmp_path) as work:
        w = Path(work)
        hf_cache(w / "hub", splits[parts, 0])
        store = Store(w / "s")
        adopted = adopt_hf_cache(store, w / "hub")
        assert [str(m.name) for m in adopted.models] == [NAME]
        name = ModelName.parse(NAME)
        layers = store.get_manifest(name).layers_of(LAYER_MODEL)
        assert len(layers) == parts
        blobs = [str(store.blob_path(d.digest)) for d in layers]
        with temp_dir(w / "tmp") as tmp:
            text: list[str] = []
            generate(store, name, "the cat and the dog", n_predict=12, n_ctx=256,
                     temperature=0, on_text=text.append)
            seen: list[tuple[list[str], set[str]]] = []
            run_ = benchmark(store, name, prompt="the cat", n_predict=4, n_ctx=256,
                             record=False, on_loaded=lambda _m: seen.append(
                                 (os.listdir(tmp), mapped_files())))
            assert os.listdir(tmp) == []  # the links are gone
        # while loaded: the links already gone, every part's blob mapped (GC sees it)
        assert seen[0][0] == [] and set(blobs) <= seen[0][1]
        assert run_.generated_tokens == 4 and run_.model_digest == str(layers[0].digest)
        store.close()
    # the same weights in one file generate the same text (greedy)
    one = Store(tmp_path / f"one-{parts}")
    if not one.has_model(ModelName.parse("tiny/one:f32")):
        from blobstore.importer import import_gguf

        import_gguf(one, splits[1, 0][0], ModelName.parse("tiny/one:f32"))
    ref: list[str] = []
    generate(one, ModelName.parse("tiny/one:f32"), "the cat and the dog", n_predict=12,
             n_ctx=256, temperature=0, on_text=ref.append)
    one.close()
    assert "".join(text) == "".join(ref)


@pytest.mark.timeout(120)
def test_run_bench_and_path_of_a_split_model_from_the_cli(
        llama_cpp: object, splits: dict[tuple[int, int], list[Path]], tmp_path: Path) -> None:
    """The outside tester's script: import --hf-cache, path, run, bench, verify."""
    hf_cache(tmp_path / "hub", splits[2, 0])
    s = str(tmp_path / "s")
    env = {"TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    assert run_proc("import", "--hf-cache", str(tmp_path / "hub"), "--store", s).code == 0
    store = Store(Path(s))
    blobs = [str(store.blob_path(d.digest))
             for d in store.get_manifest(ModelName.parse(NAME)).layers_of(LAYER_MODEL)]
    r = run("--json", "path", NAME, "--store", s)
    assert r.code == 0 and r.json()["model_path"] == blobs[0]
    assert r.json()["model_paths"] == blobs
    r = run("path", NAME, "--store", s)
    assert r.code == 0 and r.out == blobs[0] + "\n"
    assert r.err.startswith(f"warning: {NAME} is a split GGUF of 2 parts; this is the first")
    assert len(r.err.splitlines()) == 1
    r = run_proc("run", NAME, "-p", "the", "--n-predict", "4", "--store", s, env=env)
    assert r.code == 0, r.err
    r = run_proc("bench", NAME, "--n-predict", "4", "--store", s, env=env)
    assert r.code == 0, r.err
    assert run_proc("verify", "--store", s).code == 0
    assert os.listdir(tmp_path / "tmp") == []
    # a one-file model's path output is as it was
    from blobstore.importer import import_gguf

    import_gguf(store, splits[1, 0][0], ModelName.parse("tiny/one:f32"))
    r = run("--json", "path", "tiny/one:f32", "--store", s)
    assert list(r.json()) == ["name", "model_path", "projector_paths", "adapter_paths"]
    assert run("path", "tiny/one:f32", "--store", s).err == ""
    store.close()


# Parts of a 3-part split (A), a 2-part split of other weights (B), and the one file (S)
_POOL = [(3, 0, 0), (3, 0, 1), (3, 0, 2), (2, 1, 0), (2, 1, 1), (1, 0, 0)]
_VALID = [[0, 1, 2], [3, 4], [5]]


@pytest.mark.timeout(120)
@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(picks=st.lists(st.integers(0, len(_POOL) - 1), min_size=1, max_size=4)
       .filter(lambda p: p not in _VALID),
       command=st.sampled_from(["run", "bench"]))
def test_layers_that_are_not_one_split_in_order_are_one_clear_exit_4(
        llama_cpp: object, splits: dict[tuple[int, int], list[Path]], tmp_path: Path,
        picks: list[int], command: str) -> None:
    """Missing, doubled, reordered parts, or parts of another model: exit 4 naming what
    is wrong (not llama.cpp's "invalid split file name" blaming an intact file)."""
    from blobstore.importer import write_model

    files = [splits[p, s][i] for p, s, i in (_POOL[k] for k in picks)]
    with tempfile.TemporaryDirectory(dir=tmp_path) as work:
        store = Store(Path(work) / "s")
        name = ModelName.parse("tiny/mixed:1")
        with Lease(store.layout, "test") as lease:
            layers = []
            for f in files:
                digest, size = store.put_file(f, lease=lease)
                layers.append(Descriptor(mediaType=LAYER_MODEL, digest=digest, size=size))
            write_model(store, name, read_gguf(files[0]), layers, lease)
        args = ["-p", "the"] if command == "run" else []
        with temp_dir(Path(work) / "tmp") as tmp:
            r = run(command, str(name), *args, "-n", "4", "--store", str(store.root))
            assert os.listdir(tmp) == []
        store.close()
    assert r.code == 4, r.err
    lines = r.err.splitlines()
    assert lines[0].startswith("error: model tiny/mixed:1 cannot be loaded: "), r.err
    assert len(lines) == 2 and lines[1].startswith("hint: "), r.err
    assert "split" in lines[0]


@pytest.mark.timeout(60)
@settings(max_examples=10, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.integers(2, 4), data=st.data())
def test_a_part_overwritten_in_the_store_is_damage_exit_5_not_a_bad_split(
        llama_cpp: object, splits: dict[tuple[int, int], list[Path]], tmp_path: Path,
        parts: int, data: st.DataObject) -> None:
    """A blob whose split.no was overwritten in place (same size): the part it names
    is rehashed, and the model is damaged (exit 5, verify), not bad input."""
    bad = data.draw(st.integers(0, parts - 1))
    with tempfile.TemporaryDirectory(dir=tmp_path) as work:
        hf_cache(Path(work) / "hub", splits[parts, 0])
        store = Store(Path(work) / "s")
        adopt_hf_cache(store, Path(work) / "hub", mode="copy")
        layer = store.get_manifest(ModelName.parse(NAME)).layers_of(LAYER_MODEL)[bad]
        blob = store.blob_path(layer.digest)
        raw = bytearray(blob.read_bytes())
        at = raw.index(b"split.no") + len(b"split.no") + 4  # (u32 type, then the u16)
        raw[at] = (raw[at] + 1) % parts
        blob.chmod(0o644)
        blob.write_bytes(bytes(raw))
        r = run("run", NAME, "-p", "the", "--store", str(store.root))
        store.close()
    assert r.code == 5, r.err
    assert r.err.startswith(f"error: model '{NAME}' is damaged: 1 blob(s) damaged"), r.err
    assert str(layer.digest) in r.err


@pytest.mark.timeout(60)
def test_a_split_llama_cpp_cannot_load_says_why_and_leaves_no_links(
        llama_cpp: object, tmp_path: Path) -> None:
    import gguf
    import numpy as np

    wr = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama", split_max_tensors=1)
    wr.add_tensor("token_embd.weight", np.ones((4, 4), dtype=np.float32))
    wr.add_tensor("output_norm.weight", np.ones(4, dtype=np.float32))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    hf_cache(tmp_path / "hub", sorted(tmp_path.glob("bad-0000?-of-00002.gguf")))
    store = Store(tmp_path / "s")
    assert [str(m.name) for m in adopt_hf_cache(store, tmp_path / "hub").models] == \
        ["hf.co/org/tiny:bad"]
    with temp_dir(tmp_path / "tmp") as tmp:
        r = run("run", "hf.co/org/tiny:bad", "-p", "the", "--store", str(store.root))
        assert os.listdir(tmp) == []
    assert r.code == 4, r.err
    assert "llama.cpp could not load it: " in r.err and "key not found in model" in r.err
    assert "invalid split file name" not in r.err
    store.close()


@settings(max_examples=200, deadline=None)
@given(prefix=st.text(st.characters(min_codepoint=33, max_codepoint=126,
                                    exclude_characters="%"), min_size=1, max_size=40),
       count=st.integers(1, 65535), data=st.data())
def test_split_names_are_the_ones_llama_cpp_makes_and_accepts(
        llama_cpp: object, prefix: str, count: int, data: st.DataObject) -> None:
    """llama.cpp's own llama_split_path gives the names, and its llama_split_prefix
    (what its loader calls on the first path) gets the prefix back only from them."""
    import ctypes

    from catalog.splits import split_name

    lc: object = llama_cpp
    no = data.draw(st.integers(0, count - 1))
    buf = ctypes.create_string_buffer(4096)
    n = lc.llama_split_path(buf, 4096, prefix.encode(), no, count)  # type: ignore[attr-defined]
    assert buf.value.decode() == split_name(prefix, no, count) and n == len(buf.value)
    pre = ctypes.create_string_buffer(4096)
    got = lc.llama_split_prefix(  # type: ignore[attr-defined]
        pre, 4096, split_name(prefix, no, count).encode(), no, count)
    assert got == len(prefix.encode()) and pre.value.decode() == prefix
    other = data.draw(st.integers(0, count))  # another part's number does not match
    if other != no:
        assert lc.llama_split_prefix(  # type: ignore[attr-defined]
            pre, 4096, split_name(prefix, no, count).encode(), other, count) == 0


_HOLD = """
import sys, time
from pathlib import Path
from cli.main import stop_on_termination
from catalog.splits import split_links
stop_on_termination()
try:
    with split_links([Path(p) for p in sys.argv[1:]]) as first:
        print(first, flush=True)
        time.sleep(60)
except KeyboardInterrupt:
    sys.exit(143)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_the_links_go_on_signals_and_after_a_kill_with_the_next_load(
        splits: dict[tuple[int, int], list[Path]], tmp_path: Path, sig: int) -> None:
    from catalog.splits import split_links

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    parts = [str(p) for p in splits[3, 0]]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp)}
    p = subprocess.Popen([sys.executable, "-c", _HOLD, *parts], stdout=subprocess.PIPE,
                         env=env, cwd=ROOT, text=True)
    assert p.stdout is not None
    first = Path(p.stdout.readline().strip())
    assert first.name == "model-00001-of-00003.gguf" and first.parent.parent == tmp
    assert [os.readlink(first.with_name(f"model-0000{i}-of-00003.gguf"))
            for i in (1, 2, 3)] == parts
    p.send_signal(sig)
    p.wait(timeout=30)
    if sig != signal.SIGKILL:
        assert p.returncode == 143 and os.listdir(tmp) == []
        return
    assert os.listdir(tmp) == [first.parent.name]  # SIGKILL: nothing could clean up
    with temp_dir(tmp), split_links([Path(x) for x in parts]) as mine:
        assert os.listdir(tmp) == [mine.parent.name]  # the dead process's folder went
    assert os.listdir(tmp) == []
