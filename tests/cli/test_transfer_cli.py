"""`blobctl export` / `import` of archives: output and one-line errors with exit codes."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from blobstore.digest import Digest
from blobstore.name import ModelName
from blobstore.store import Store
from tests.blobstore.archutil import add_model, rand
from tests.cli.clirun import ROOT, Result, run, run_proc
from tests.helpers import make_gguf


def one_error_line(r: Result) -> str:
    errors = [x for x in r.err.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1, r.err
    assert "Traceback" not in r.err
    return errors[0]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "s")
    shared = rand(200_000)
    add_model(s, "example.com/ns/one:v1", [shared, b"tmpl"])
    add_model(s, "example.com/ns/two:v2", [shared], oci=False)
    return s


def test_export_and_import_json(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "a.tar.zst"
    r = run("export", "example.com/ns/one:v1", "example.com/ns/two:v2", "-o", str(out),
            "--json", "--store", str(store.root))
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["format"] == "tar.zst" and doc["blobs"] == 6
    renamed = tmp_path / "whatever.bin"  # detected by content, not by name
    out.rename(renamed)
    r = run_proc("import", str(renamed), "--json", "--store", str(tmp_path / "o"))
    assert r.code == 0, r.err
    last = json.loads(r.out.splitlines()[-1])
    assert last["status"] == "success" and last["format"] == "tar.zst"
    assert sorted(m["name"] for m in last["models"]) == ["example.com/ns/one:v1",
                                                         "example.com/ns/two:v2"]
    r = run("import", str(renamed), "--store", str(tmp_path / "o"))
    assert r.code == 0 and "imported 'example.com/ns/one:v1'" in r.out


def test_export_errors(store: Store, tmp_path: Path) -> None:
    s = str(store.root)
    r = run("export", "nope", "-o", str(tmp_path / "a.tar"), "--store", s)
    assert r.code == 3
    assert one_error_line(r) == "error: model 'nope:latest' not found"
    r = run("export", "example.com/ns/one:v1", "-o", str(tmp_path / "a.zip"), "--store", s)
    assert r.code == 4
    assert one_error_line(r) == "error: cannot tell the archive format from 'a.zip'"
    assert "hint: name it FILE.tar" in r.err
    r = run("export", "example.com/ns/one:v1", "--store", s)
    assert r.code == 2


def test_import_damaged_archive_exit_5_and_nothing_visible(store: Store,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "a.tar"
    assert run("export", "example.com/ns/one:v1", "-o", str(out),
               "--store", str(store.root)).code == 0
    data = bytearray(out.read_bytes())
    data[len(data) // 2] ^= 0x40  # inside the shared layer
    out.write_bytes(bytes(data))
    r = run("import", str(out), "--store", str(tmp_path / "o"))
    assert r.code == 5
    line = one_error_line(r)
    assert line.startswith(f"error: {out}: 1 damaged or missing blob(s) (digest mismatch from {out}: expected sha256:")
    assert "0 model(s) imported, 1 refused" in line
    assert "warning: skipped example.com/ns/one:v1: digest mismatch from" in r.err
    assert Store(tmp_path / "o").list_models() == []
    # a damaged header: the tar structure itself
    data = bytearray(out.read_bytes())
    data[1030] ^= 0x01
    out.write_bytes(bytes(data))
    r = run("import", str(out), "--json", "--store", str(tmp_path / "o"))
    assert r.code == 5
    assert "damaged archive at byte 1024: bad tar header checksum" in one_error_line(r)


def test_import_usage_errors(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "a.tar"
    run("export", "example.com/ns/one:v1", "example.com/ns/two:v2", "-o", str(out),
        "--store", str(store.root))
    s = str(tmp_path / "o")
    r = run("import", str(out), "--name", "x:y", "--store", s)
    assert r.code == 4
    assert "--name needs an archive with exactly one model" in one_error_line(r)
    r = run("import", str(out), "--system", "hi", "--store", s)
    assert r.code == 2
    g = make_gguf(tmp_path / "m.gguf")
    r = run("import", str(g), "--store", s)
    assert r.code == 2 and one_error_line(r) == "error: a GGUF file needs --name REF"
    r = run("import", "--store", s)
    assert r.code == 2
    r = run("import", str(tmp_path), "--store", s)
    assert r.code == 4
    assert one_error_line(r) == (f"error: {tmp_path} is a folder but not an OCI image layout "
                                 "(no oci-layout)")
    assert "hint: for a Hugging Face cache use: blobctl import --hf-cache DIR" in r.err
    r = run("import", str(g), "--name", "mine", "--store", s)  # GGUF import as before
    assert r.code == 0 and Store(tmp_path / "o").has_model(ModelName.parse("mine"))


def test_export_and_push_of_a_damaged_model_exit_5(store: Store, tmp_path: Path) -> None:
    s = str(store.root)
    out = tmp_path / "full"
    out.mkdir()
    (out / "x").write_text("x")
    r = run("export", "example.com/ns/one:v1", "-o", f"{out}/", "--store", s)
    assert r.code == 4 and one_error_line(r) == f"error: {out} is not empty"
    layer = store.get_manifest(ModelName.parse("example.com/ns/two:v2")).layers[0].digest
    store.blob_path(layer).unlink()
    r = run("export", "example.com/ns/two:v2", "-o", str(tmp_path / "b.tar"), "--store", s)
    assert r.code == 5
    assert one_error_line(r).startswith(
        "error: model 'example.com/ns/two:v2' is damaged: 1 blob(s) missing")
    assert not (tmp_path / "b.tar").exists()
    r = run("push", "example.com/ns/two:v2", "127.0.0.1:1/x/y", "--insecure", "--store", s)
    assert r.code == 5 and "is damaged: 1 blob(s) missing" in one_error_line(r)


def test_import_damaged_zstd_stream_exit_5(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "a.tar.zst"
    assert run("export", "example.com/ns/one:v1", "-o", str(out),
               "--store", str(store.root)).code == 0
    data = bytearray(out.read_bytes())
    data[40] ^= 0xFF  # inside the first compressed block
    out.write_bytes(bytes(data))
    r = run("import", str(out), "--store", str(tmp_path / "o"))
    assert r.code == 5
    line = one_error_line(r)
    assert line.startswith(f"error: {out}: damaged"), line
    assert Store(tmp_path / "o").list_models() == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", ["tar", "tar.zst"])
def test_import_of_a_negative_pax_size_is_exit_5_not_a_hang(store: Store, tmp_path: Path,
                                                           fmt: str) -> None:
    # the tester's archive: a PAX header 'size=-1' before a member spun at 100 % CPU
    out = tmp_path / "a.tar"
    assert run("export", "example.com/ns/one:v1", "-o", str(out),
               "--store", str(store.root)).code == 0
    rec = b"11 size=-1\n"
    pax = tarfile.TarInfo("PaxHeaders/x")
    pax.type, pax.size = tarfile.XHDTYPE, len(rec)
    junk = tarfile.TarInfo("junk")
    data = (pax.tobuf(tarfile.USTAR_FORMAT) + rec + bytes(512 - len(rec))
            + junk.tobuf(tarfile.USTAR_FORMAT) + out.read_bytes())
    if fmt == "tar.zst":
        data = zstandard.ZstdCompressor().compress(data)
    bad = tmp_path / f"bad.{fmt}"
    bad.write_bytes(data)
    r = run_proc("import", str(bad), "--store", str(tmp_path / "o"), timeout=60)
    assert r.code == 5, r.err
    assert one_error_line(r) == f"error: {bad}: damaged archive at byte 0: bad PAX size '-1'"
    assert Store(tmp_path / "o").list_models() == []


@pytest.mark.timeout(120)
def test_import_of_a_folder_whose_blob_is_a_fifo_is_exit_5_not_a_hang(
        store: Store, tmp_path: Path) -> None:
    lay = tmp_path / "lay"
    assert run("export", "example.com/ns/one:v1", "-o", f"{lay}/",
               "--store", str(store.root)).code == 0
    layer = store.get_manifest(ModelName.parse("example.com/ns/one:v1")).layers[1].digest
    blob = lay / "blobs/sha256" / layer.hex
    blob.unlink()
    os.mkfifo(blob)  # opened to be read, it blocked the import forever
    r = run_proc("import", str(lay), "--store", str(tmp_path / "o"), timeout=60)
    assert r.code == 5, r.err
    assert one_error_line(r) == (
        f"error: {lay}: 1 damaged or missing blob(s) ({blob} is a FIFO, not a regular "
        f"file); 0 model(s) imported, 1 refused")
    assert Store(tmp_path / "o").list_models() == []


def _export_proc(store: Store, tmp_path: Path, *args: str,
                 stdout: int = subprocess.PIPE) -> tuple[int, bytes, str]:
    """A real ``blobctl export`` whose stdout stays bytes (or is ``stdout``)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "cli", "export", "example.com/ns/one:v1",
                        "--store", str(store.root), *args], stdout=stdout,
                       stderr=subprocess.PIPE, env=env, cwd=tmp_path, timeout=60)
    return p.returncode, p.stdout or b"", p.stderr.decode()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", ["tar", "tar.zst"])
def test_export_to_stdout_streams_the_archive(store: Store, tmp_path: Path,
                                              fmt: str) -> None:
    # '-o -' wrote a file named '-'
    code, out, err = _export_proc(store, tmp_path, "-o", "-", "--format", fmt)
    assert code == 0, err
    assert "exported 1 model(s), 4 blobs" in err and "to stdout" in err
    assert list(tmp_path.iterdir()) == [store.root]  # no file named '-'
    (tmp_path / f"got.{fmt}").write_bytes(out)
    r = run("import", str(tmp_path / f"got.{fmt}"), "--store", str(tmp_path / "o"))
    assert r.code == 0, r.err
    one = ModelName.parse("example.com/ns/one:v1")
    assert Store(tmp_path / "o").get_manifest(one).raw == store.get_manifest(one).raw


@pytest.mark.timeout(120)
def test_export_to_stdout_refusals_and_a_reader_that_goes_away(store: Store,
                                                              tmp_path: Path) -> None:
    def error_line(err: str) -> str:
        return one_error_line(Result(1, "", err))

    code, out, err = _export_proc(store, tmp_path, "-o", "-")
    assert (code, out) == (4, b"")
    assert error_line(err) == "error: -o - streams the archive to stdout and needs its format"
    assert "hint: add --format tar or --format tar.zst" in err
    # a format was given, a folder: found from outside, the same "needs its format"
    code, out, err = _export_proc(store, tmp_path, "-o", "-", "--format", "dir")
    assert (code, out) == (4, b"")
    assert err.splitlines() == [
        "error: a folder (--format dir) cannot be streamed to stdout (-o -)",
        "hint: give a folder with -o DIR/, or stream --format tar or --format tar.zst"]
    code, out, err = _export_proc(store, tmp_path, "-o", "-", "--format", "tar", "--json")
    assert (code, out) == (2, b"")
    assert error_line(err) == "error: --json and -o - would both write to stdout"
    master, slave = os.openpty()
    try:
        code, _, err = _export_proc(store, tmp_path, "-o", "-", "--format", "tar",
                                    stdout=slave)
    finally:
        os.close(slave)
        os.close(master)
    assert code == 4
    assert error_line(err) == "error: refusing to write an archive to a terminal (stdout)"
    r_fd, w_fd = os.pipe()
    os.close(r_fd)  # the reader is gone before the first byte
    try:
        code, _, err = _export_proc(store, tmp_path, "-o", "-", "--format", "tar.zst",
                                    stdout=w_fd)
    finally:
        os.close(w_fd)
    assert code == 11
    assert error_line(err) == "error: the export to stdout stopped: Broken pipe"
    assert "hint: stdout got part of an archive" in err
    assert list(tmp_path.iterdir()) == [store.root]


@pytest.mark.timeout(120)
def test_export_to_a_symlink_to_a_fifo_streams_into_the_fifo(store: Store,
                                                             tmp_path: Path) -> None:
    # the tester's repro_export_fifo.sh: link.tar -> pipe.tar (a FIFO) was replaced by a
    # regular file, and the reader of the FIFO never got a byte
    fifo, link = tmp_path / "pipe.tar", tmp_path / "link.tar"
    os.mkfifo(fifo)
    link.symlink_to(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    r = run_proc("export", "example.com/ns/one:v1", "-o", str(link), "--json",
                 "--store", str(store.root), timeout=60)
    reader.join(30)
    assert r.code == 0, r.err
    assert r.json()["path"] == str(link) and r.json()["bytes_out"] == len(got[0])
    assert link.is_symlink() and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    (tmp_path / "got.tar").write_bytes(got[0])
    assert run("import", str(tmp_path / "got.tar"), "--store", str(tmp_path / "o")).code == 0


@pytest.mark.timeout(60)
def test_an_archive_that_yields_no_model_is_an_error(store: Store, tmp_path: Path) -> None:
    """Found from outside: importing a layout whose one model has no ref name (as
    `skopeo copy … oci:DIR` writes it) printed "success", one warning and exit 0, having
    imported nothing. Now exit 4 with a hint to name it; --name imports it."""
    out = tmp_path / "lay"
    assert run("export", "example.com/ns/one:v1", "-o", str(out) + "/", "--store",
               str(store.root)).code == 0
    index = json.loads((out / "index.json").read_text())
    for m in index["manifests"]:
        m.pop("annotations", None)
    (out / "index.json").write_text(json.dumps(index))
    (out / "index.json.sha256").unlink(missing_ok=True)  # (blobctl's own check file)
    s2 = str(tmp_path / "s2")
    r = run("import", str(out), "--store", s2)
    assert r.code == 4, r.err
    assert one_error_line(r).startswith(f"error: no model imported from {out}")
    assert "--name REF" in r.err
    assert "success" not in r.err  # (the progress said so before the error line)
    r = run("import", str(out), "--json", "--store", s2)
    assert r.code == 4 and json.loads(r.out.splitlines()[-1])["status"] == "error"
    assert all(json.loads(x)["status"] != "success" for x in r.out.splitlines())
    assert run("list", "--json", "--store", s2).json() == []
    r = run("import", str(out), "--name", "x/y:z", "--store", s2)
    assert r.code == 0, r.err
    index["manifests"] = []
    (out / "index.json").write_text(json.dumps(index))
    r = run("import", str(out), "--store", s2)
    assert r.code == 4 and "it holds none" in one_error_line(r), r.err


@pytest.mark.timeout(60)
def test_a_model_whose_manifest_disagrees_with_its_blob_is_exit_5(store: Store,
                                                                 tmp_path: Path) -> None:
    """Found from outside: an archive whose one model's manifest gives a layer 5 bytes
    more than the blob has was exit 4 "no model imported", the reason under `skipped`
    with "damaged": false (with a good model beside it: exit 0, "success")."""
    lay = tmp_path / "lay"
    assert run("export", "example.com/ns/one:v1", "-o", f"{lay}/",
               "--store", str(store.root)).code == 0
    man = store.get_manifest(ModelName.parse("example.com/ns/one:v1"))
    doc = json.loads(man.raw)
    doc["layers"][0]["size"] += 5
    raw = json.dumps(doc).encode()
    digest = Digest.of_bytes(raw)
    (lay / "blobs/sha256" / digest.hex).write_bytes(raw)
    index = json.loads((lay / "index.json").read_text())
    index["manifests"][0].update(digest=str(digest), size=len(raw))
    (lay / "index.json").write_text(json.dumps(index))
    (lay / "index.json.sha256").unlink()
    tar = tmp_path / "a.tar"
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as tf:
        for p in sorted(lay.rglob("*")):
            tf.add(p, arcname=str(p.relative_to(lay)), recursive=False)
    r = run("import", str(tar), "--json", "--store", str(tmp_path / "o"))
    assert r.code == 5, r.err
    last = json.loads(r.out.splitlines()[-1])
    assert last["status"] == "error" and last["models"] == []
    assert [(s["kind"], s["damaged"]) for s in last["skipped"]] == [("damaged", True)]
    assert f"names blob {man.layers[0].digest} with {man.layers[0].size + 5} bytes; " \
           f"the archive's has {man.layers[0].size}" in one_error_line(r)


@pytest.mark.timeout(120)
def test_a_docker_archive_is_named_as_one_exit_4(store: Store, tmp_path: Path) -> None:
    """Found from outside: a docker-archive (`skopeo copy … docker-archive:x.tar`, as
    `docker save` writes it) was exit 5 "not an OCI image layout (no oci-layout)" with
    the hint "the archive was changed or truncated"."""
    assert shutil.which("skopeo"), "skopeo is needed (.ci/run installs it)"
    add_model(store, "example.com/ns/img:v1", [rand(5000)],  # (skopeo converts only
              layer_type="application/vnd.oci.image.layer.v1.tar")  # image layers)
    a = tmp_path / "a.tar"
    assert run("export", "example.com/ns/img:v1", "-o", str(a),
               "--store", str(store.root)).code == 0
    x = tmp_path / "x.tar"
    p = subprocess.run(["skopeo", "copy", f"oci-archive:{a}:example.com/ns/img:v1",
                        f"docker-archive:{x}:example.com/ns/img:v1"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    with tarfile.open(x) as tf:
        assert "manifest.json" in tf.getnames() and "oci-layout" not in tf.getnames()
    s = str(tmp_path / "o")
    r = run("import", str(x), "--store", s)
    assert r.code == 4, r.err
    assert one_error_line(r) == (f"error: {x} is a docker-archive (docker save), not an "
                                 "OCI image layout")
    assert f"hint: convert it: skopeo copy docker-archive:{x} oci-archive:OUT.tar" in r.err
    assert Store(tmp_path / "o").list_models() == []
    plain = tmp_path / "plain.tar"  # a tar of other files: not an OCI layout either
    with tarfile.open(plain, "w", format=tarfile.USTAR_FORMAT) as tf:
        tf.add(a, arcname="notes/a.tar")
    r = run("import", str(plain), "--store", s)
    assert r.code == 4 and one_error_line(r) == (
        f"error: {plain} is a tar archive but not an OCI image layout (no oci-layout, "
        "index.json or blobs/)")
    with tarfile.open(plain, "w", format=tarfile.USTAR_FORMAT) as tf, \
            tarfile.open(a) as src:  # one that lost its oci-layout
        for m in src.getmembers():
            if m.name != "oci-layout":
                tf.addfile(m, src.extractfile(m) if m.isfile() else None)
    r = run("import", str(plain), "--store", s)
    assert r.code == 5 and "not an OCI image layout (no oci-layout)" in one_error_line(r)


@pytest.mark.timeout(60)
def test_invalid_ref_names_get_a_hint_about_names_not_about_missing_ones(
        store: Store, tmp_path: Path) -> None:
    """Found from outside: when every entry had a ref name but none was valid, the hint
    said "an archive without ref names … needs --name REF" (it matched the text "name"
    in "invalid model name"); the skipped entry's kind says which it is now."""
    lay = tmp_path / "lay"
    assert run("export", "example.com/ns/one:v1", "-o", f"{lay}/",
               "--store", str(store.root)).code == 0
    index = json.loads((lay / "index.json").read_text())
    index["manifests"][0]["annotations"] = {
        "org.opencontainers.image.ref.name": "h.example/a/b/c/username:t"}
    (lay / "index.json").write_text(json.dumps(index))
    (lay / "index.json.sha256").unlink()
    r = run("import", str(lay), "--store", str(tmp_path / "o"))
    assert r.code == 4, r.err
    assert "without ref names" not in r.err
    assert "hint: its ref names are not model names (host/ns/repo:tag); --name REF " \
           "names the model of a one-model archive" in r.err
    r = run("import", str(lay), "--json", "--store", str(tmp_path / "o"))
    assert [s["kind"] for s in json.loads(r.out.splitlines()[-1])["skipped"]] == ["bad-name"]


@pytest.mark.timeout(60)
def test_a_file_neither_archive_nor_gguf_is_exit_4_saying_what_it_is_not(
        store: Store, tmp_path: Path) -> None:
    """Found from outside: without --name, a .tar cut under 512 bytes, a .tar.gz or a
    text file was exit 2 "a GGUF file needs --name REF"."""
    tar = tmp_path / "a.tar"
    assert run("export", "example.com/ns/one:v1", "-o", str(tar),
               "--store", str(store.root)).code == 0
    (tmp_path / "cut.tar").write_bytes(tar.read_bytes()[:300])
    (tmp_path / "a.tar.gz").write_bytes(gzip.compress(tar.read_bytes()))
    (tmp_path / "notes.txt").write_text("hello\n")
    s = str(tmp_path / "o")
    what = "not a GGUF file or an OCI image layout (.tar, .tar.zst or a folder with oci-layout)"
    for name, line in (
            ("cut.tar", "is a tar archive cut short (300 bytes, less than one 512-byte "
                        "block): " + what),
            ("a.tar.gz", "is gzip-compressed: " + what),
            ("notes.txt", what)):
        r = run("import", str(tmp_path / name), "--store", s)
        assert r.code == 4, (name, r.err)
        assert one_error_line(r).startswith(f"error: {tmp_path / name} "), r.err
        assert one_error_line(r).endswith(line), r.err
        assert "hint: " in r.err
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    r = run("import", str(fifo), "--store", s)  # never opened: no hang
    assert r.code == 4 and one_error_line(r) == f"error: {fifo} is a FIFO, {what}"
    g = make_gguf(tmp_path / "m.gguf")
    r = run("import", str(g), "--store", s)
    assert r.code == 2 and one_error_line(r) == "error: a GGUF file needs --name REF"


@pytest.mark.timeout(90)
def test_a_part_file_left_by_a_killed_export_goes_with_the_next_export(
        store: Store, tmp_path: Path) -> None:
    """Found from outside: an export killed with SIGKILL (OOM killer, kill -9) left a
    hidden `.NAME.<pid>.part` beside the target that no later export removed."""
    add_model(store, "example.com/ns/big:v1", [rand(24 << 20)])
    out = tmp_path / "h.tar.zst"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "cli", "export", "example.com/ns/big:v1",
                          "-o", str(out), "--zstd-level", "19", "--store", str(store.root)],
                         cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    part = tmp_path / f".h.tar.zst.{p.pid}.part"
    try:
        while not part.exists():
            assert p.poll() is None, "the export ended before it could be killed"
            time.sleep(0.001)
    finally:
        p.kill()
        p.wait()
    assert part.exists() and not out.exists()
    r = run("export", "example.com/ns/one:v1", "-o", str(out), "--store", str(store.root))
    assert r.code == 0, r.err
    assert sorted(x.name for x in tmp_path.iterdir() if x.name.startswith(".")) == []


@pytest.mark.timeout(120)
@settings(max_examples=4, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sig=st.sampled_from([signal.SIGINT, signal.SIGTERM]), after=st.floats(0.0, 1.5))
def test_a_signal_stops_a_slow_zstd_export_at_once(tmp_path_factory: pytest.TempPathFactory,
                                                   sig: int, after: float) -> None:
    """Found from outside: Ctrl-C or SIGTERM on `export --zstd-level 19` took ~40 s to
    act (the whole export took 23 s): zstd's multi-threaded write waited in C for its
    jobs, where no signal handler runs. The export must stop within a second or two,
    with the signal's exit code and no part file left."""
    tmp = tmp_path_factory.mktemp("zsig")
    store = Store(tmp / "s")
    # 4 bits of entropy a byte: slow to compress at level 19 (random bytes are not)
    low = os.urandom(24 << 20).translate(bytes(i & 15 for i in range(256)))
    add_model(store, "example.com/ns/big:v1", [low])
    out = tmp / "o" / "h.tar.zst"
    out.parent.mkdir()
    p = subprocess.Popen([sys.executable, "-m", "cli", "export", "example.com/ns/big:v1",
                          "-o", str(out), "--zstd-level", "19", "--store", str(store.root)],
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    part = out.parent / f".h.tar.zst.{p.pid}.part"
    try:
        deadline = time.monotonic() + 30
        while not part.exists():
            assert p.poll() is None and time.monotonic() < deadline, "no export began"
            time.sleep(0.001)
        time.sleep(after)
        assert p.poll() is None, "the export ended before the signal"
        p.send_signal(sig)
        sent = time.monotonic()
        _, err = p.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 128 + sig, err
    assert took < 3, took
    assert list(out.parent.iterdir()) == [], "the part file stays"
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [
        "error: interrupted" if sig == signal.SIGINT else "error: terminated (SIGTERM)"], err
