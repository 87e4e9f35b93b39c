"""Export to OCI image layouts and import them back (spec/archive.md)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import tarfile
import threading
import time
import traceback
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore.archive import (
    ANNOTATION_REF_NAME,
    ArchiveDamaged,
    detect_archive,
    export_models,
    import_archive,
)
from blobstore.digest import Digest
from blobstore.errors import InsufficientSpace, InvalidInput, ModelNotFound, StoreDamaged
from blobstore.name import ModelName
from blobstore.store import Store
from blobstore.tarstream import TarDamaged, TarReader
from tests.blobstore.archutil import add_model, rand

ONE = ModelName.parse("example.com/ns/one:v1")
TWO = ModelName.parse("example.com/ns/two:v2")


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "s")
    shared = rand(300_000)
    add_model(s, str(ONE), [shared, b"template {{ .Prompt }}"])
    add_model(s, str(TWO), [shared], oci=False)
    return s


def manifests_of(store: Store) -> dict[str, bytes]:
    return {str(e.name): e.path.read_bytes() for e in store.list_models()}


@pytest.mark.parametrize("suffix", ["a.tar", "a.tar.zst", "dir/"])
def test_round_trip_keeps_manifest_bytes_and_writes_shared_blobs_once(
        store: Store, tmp_path: Path, suffix: str) -> None:
    dest = f"{tmp_path}/{suffix}"
    r = export_models(store, [ONE, TWO], dest)
    assert r.format == {"a.tar": "tar", "a.tar.zst": "tar.zst", "dir/": "dir"}[suffix]
    assert r.blobs == 6  # 2 manifests, 2 configs, shared layer once, template
    assert detect_archive(dest) == r.format
    other = Store(tmp_path / "other")
    res = import_archive(other, dest)
    assert {str(m.name) for m in res.models} == {str(ONE), str(TWO)}
    assert manifests_of(other) == manifests_of(store)
    assert other.verify().ok
    assert not res.skipped and res.blobs_added == 4
    again = import_archive(other, dest)  # idempotent, nothing new
    assert again.blobs_added == 0 and len(again.models) == 2


def test_index_descriptors_and_layout(store: Store, tmp_path: Path) -> None:
    export_models(store, [ONE, TWO], tmp_path / "a.tar")
    with tarfile.open(tmp_path / "a.tar") as tf:
        names = tf.getnames()
        index = json.loads(tf.extractfile("index.json").read())  # type: ignore[union-attr]
        layout = tf.extractfile("oci-layout").read()  # type: ignore[union-attr]
    assert layout == b'{"imageLayoutVersion":"1.0.0"}'
    assert len(names) == len(set(names))
    m1, m2 = store.get_manifest(ONE), store.get_manifest(TWO)
    assert index["manifests"] == [
        {"mediaType": m.media_type, "digest": str(m.digest), "size": len(m.raw),
         "annotations": {ANNOTATION_REF_NAME: str(n)}} for n, m in ((ONE, m1), (TWO, m2))]
    assert f"blobs/sha256/{m1.digest.hex}" in names
    # GNU tar reads it and every member's bytes are the store's
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["tar", "xf", str(tmp_path / "a.tar"), "-C", str(out)], check=True)
    for d in m1.descriptors:
        assert (out / "blobs/sha256" / d.digest.hex).read_bytes() == \
            store.blob_path(d.digest).read_bytes()


def test_skopeo_reads_the_archive_and_its_copy_imports_back(store: Store,
                                                            tmp_path: Path) -> None:
    assert shutil.which("skopeo"), "skopeo is needed (.ci/run installs it)"
    export_models(store, [ONE, TWO], tmp_path / "a.tar")
    p = subprocess.run(["skopeo", "copy", f"oci-archive:{tmp_path / 'a.tar'}:{ONE}",
                        f"oci-archive:{tmp_path / 'b.tar'}:{ONE}"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    p = subprocess.run(["skopeo", "copy", f"oci-archive:{tmp_path / 'a.tar'}:{ONE}",
                        f"oci:{tmp_path / 'lay'}"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    m1 = store.get_manifest(ONE)
    for d in m1.descriptors:  # skopeo kept every blob's digest
        assert (tmp_path / "lay/blobs/sha256" / d.digest.hex).is_file()
    empty = Store(tmp_path / "empty")
    res = import_archive(empty, tmp_path / "b.tar")
    assert [m.digest for m in res.models] == [m1.digest]
    assert manifests_of(empty) == {str(ONE): m1.raw}
    # a folder written by skopeo has no name annotation: --name names its one model
    res = import_archive(Store(tmp_path / "e2"), tmp_path / "lay", name=ModelName.parse("x/y:z"))
    assert str(res.models[0].name) == "registry.ollama.ai/x/y:z"
    assert res.models[0].digest == m1.digest


def test_export_errors(store: Store, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound):
        export_models(store, [ModelName.parse("nope")], tmp_path / "a.tar")
    with pytest.raises(InvalidInput, match="cannot tell the archive format"):
        export_models(store, [ONE], tmp_path / "a.zip")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(InvalidInput, match="not empty"):
        export_models(store, [ONE], str(tmp_path / "full") + "/")
    os.chmod(store.blob_path(store.get_manifest(TWO).layers[0].digest), 0o644)
    os.unlink(store.blob_path(store.get_manifest(TWO).layers[0].digest))
    with pytest.raises(StoreDamaged):
        export_models(store, [TWO], tmp_path / "b.tar")
    assert not list(tmp_path.glob("*.tar")) and not list(tmp_path.glob(".*part"))


def test_name_option_and_skipped_entries(store: Store, tmp_path: Path) -> None:
    export_models(store, [ONE, TWO], tmp_path / "a.tar")
    with pytest.raises(InvalidInput, match="exactly one model"):
        import_archive(Store(tmp_path / "o"), tmp_path / "a.tar", name=ModelName.parse("x"))
    # rewrite the index: a bare tag and no annotation are skipped, the rest imported
    lay = tmp_path / "lay"
    export_models(store, [ONE, TWO], str(lay) + "/")
    doc = json.loads((lay / "index.json").read_text())
    doc["manifests"][0]["annotations"] = {ANNOTATION_REF_NAME: "latest"}
    doc["manifests"].append(dict(doc["manifests"][1], annotations=None))
    (lay / "index.json").write_text(json.dumps(doc))
    (lay / "index.json.sha256").unlink()
    res = import_archive(Store(tmp_path / "o2"), lay)
    assert [str(m.name) for m in res.models] == [str(TWO)]
    assert [s.reason for s in res.skipped] == [
        "invalid model name 'latest': a bare tag is not a model name (want host/ns/repo:tag)",
        f"invalid model name '': no {ANNOTATION_REF_NAME} annotation"]


def test_not_an_archive(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"hello")
    with pytest.raises(InvalidInput, match="not an OCI image layout"):
        import_archive(Store(tmp_path / "s"), tmp_path / "f")
    assert detect_archive(tmp_path / "missing") is None


def test_damaged_blob_skips_its_model_only(store: Store, tmp_path: Path) -> None:
    export_models(store, [ONE, TWO], tmp_path / "a.tar")
    data = bytearray((tmp_path / "a.tar").read_bytes())
    tpl = store.get_manifest(ONE).layers[1].digest  # only ONE uses the template
    at = data.index(b"template {{ .Prompt }}")
    data[at] ^= 0x01
    (tmp_path / "a.tar").write_bytes(bytes(data))
    other = Store(tmp_path / "o")
    with pytest.raises(ArchiveDamaged, match="1 damaged") as ei:
        import_archive(other, tmp_path / "a.tar")
    assert ei.value.result is not None
    assert [str(m.name) for m in ei.value.result.models] == [str(TWO)]
    assert manifests_of(other) == {str(TWO): store.get_manifest(TWO).raw}
    assert not other.has_blob(tpl)


@pytest.fixture(scope="module")
def small_archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("arch")
    s = Store(tmp / "s")
    add_model(s, str(ONE), [rand(20_000), b"tmpl"])
    add_model(s, str(TWO), [rand(9_000)], oci=False)
    out = {}
    for fmt in ("tar", "tar.zst"):
        export_models(s, [ONE, TWO], tmp / f"a.{fmt}")
        out[fmt] = (tmp / f"a.{fmt}").read_bytes()
    out["manifests"] = json.dumps({str(e.name): e.path.read_text()
                                   for e in s.list_models()}).encode()
    return out


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(["tar", "tar.zst"]), where=st.floats(0, 1, exclude_max=True),
       xor=st.integers(1, 255))
def test_any_flipped_byte_is_refused_and_nothing_wrong_is_visible(
        small_archives: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory,
        fmt: str, where: float, xor: int) -> None:
    data = bytearray(small_archives[fmt])
    at = int(where * len(data))
    data[at] ^= xor
    tmp = tmp_path_factory.mktemp("flip")
    (tmp / f"a.{fmt}").write_bytes(bytes(data))
    store = Store(tmp / "s")
    with pytest.raises((ArchiveDamaged, InvalidInput)) as ei:
        import_archive(store, tmp / f"a.{fmt}")
    # a flip in the first bytes may make it no archive at all (InvalidInput, exit 4);
    # anything else is damage (exit 5)
    if isinstance(ei.value, InvalidInput):
        assert at < 512
    want = json.loads(small_archives["manifests"])
    for name, raw in manifests_of(store).items():  # whatever is visible is intact
        assert want[name].encode() == raw
    assert store.verify().ok


def test_truncated_archives_are_refused(small_archives: dict[str, bytes],
                                        tmp_path: Path) -> None:
    tar = small_archives["tar"]
    last = tar.index(b"index.json.sha256") + 600  # inside the last member's data
    zst = len(small_archives["tar.zst"])
    # (cutting into a zstd frame's 4-byte content checksum goes unnoticed by zstandard;
    # every byte of data has been checked by then)
    for fmt, cuts in (("tar", (600, len(tar) // 2, last, last + 512)),
                      ("tar.zst", (600, zst // 2, zst - 5))):
        for cut in cuts:
            (tmp_path / f"t.{fmt}").write_bytes(small_archives[fmt][:cut])
            store = Store(tmp_path / f"s{fmt}{cut}")
            with pytest.raises(ArchiveDamaged):
                import_archive(store, tmp_path / f"t.{fmt}")
            assert store.list_models() == []


# ---------------------------------------------------------------------- tar reader
members = st.lists(st.tuples(st.text("abcdefghij/._-", min_size=1, max_size=140)
                             .filter(lambda s: not s.startswith("/") and "//" not in s
                                     and not s.endswith("/")),
                             st.binary(max_size=3000)), max_size=6, unique_by=lambda t: t[0])


@settings(max_examples=80, deadline=None)
@given(members=members, fmt=st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT,
                                             tarfile.PAX_FORMAT]))
def test_tar_reader_reads_what_tarfile_writes(members: list[tuple[str, bytes]],
                                              fmt: int) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            try:
                tf.addfile(info, io.BytesIO(data))
            except ValueError:
                return  # a name ustar cannot hold
    buf.seek(0)
    reader = TarReader(buf)
    got = []
    for m in reader:
        got.append((m.name, reader.read(1 << 20) if m.size else b""))
    assert got == members


def test_tar_reader_refuses_garbage() -> None:
    with pytest.raises(TarDamaged):
        list(TarReader(io.BytesIO(b"x" * 1024)))
    with pytest.raises(TarDamaged, match="truncated"):
        list(TarReader(io.BytesIO(b"")))


def test_export_memory_is_flat(tmp_path: Path) -> None:
    s = Store(tmp_path / "s")
    add_model(s, str(ONE), [rand(48 << 20)])
    for name in ("a.tar", "a.tar.zst"):
        tracemalloc.start()
        export_models(s, [ONE], tmp_path / name)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 16 << 20, (name, peak)  # one 8 MiB compressor block at most
    tracemalloc.start()
    import_archive(Store(tmp_path / "o"), tmp_path / "a.tar.zst")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 << 20


@pytest.fixture(scope="module")
def layout_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    tmp = tmp_path_factory.mktemp("lay")
    s = Store(tmp / "s")
    shared = rand(70_000)
    add_model(s, str(ONE), [shared, b"tmpl"])
    add_model(s, str(TWO), [shared, rand(5 << 20)], oci=False)  # one member > 4 MiB
    export_models(s, [ONE, TWO], f"{tmp}/lay/")
    return tmp / "lay", manifests_of(s)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), fmt=st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT,
                                           tarfile.PAX_FORMAT]))
def test_members_in_any_order_import_the_same_models(
        layout_dir: tuple[Path, dict[str, bytes]], tmp_path_factory: pytest.TempPathFactory,
        data: st.DataObject, fmt: int) -> None:
    lay, want = layout_dir
    files = sorted(str(p.relative_to(lay)) for p in lay.rglob("*") if p.is_file())
    order = data.draw(st.permutations(files))
    tmp = tmp_path_factory.mktemp("order")
    with tarfile.open(tmp / "a.tar", "w", format=fmt) as tf:
        for rel in order:
            tf.add(lay / rel, arcname=rel)
    store = Store(tmp / "s")
    res = import_archive(store, tmp / "a.tar")
    assert not res.skipped
    assert manifests_of(store) == want
    assert store.verify().ok


def test_hostile_member_names_write_nothing_outside(
        layout_dir: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    lay, want = layout_dir
    with tarfile.open(tmp_path / "a.tar", "w") as tf:
        for name in ("../../evil", "/abs/evil", "blobs/sha256/../../evil2"):
            info = tarfile.TarInfo(name)
            info.size = 4
            tf.addfile(info, io.BytesIO(b"evil"))
        link = tarfile.TarInfo("blobs/sha256/" + "0" * 64)
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tf.addfile(link)
        for p in sorted(lay.rglob("*")):
            if p.is_file():
                tf.add(p, arcname=str(p.relative_to(lay)))
    work = tmp_path / "work"
    work.mkdir()
    store = Store(work / "deep" / "s")
    res = import_archive(store, tmp_path / "a.tar")
    assert manifests_of(store) == want and not res.skipped
    assert not list(tmp_path.rglob("evil*"))
    assert not (store.layout.blobs / ("sha256-" + "0" * 64)).exists()


def test_damaged_folder_layout_is_refused(store: Store, tmp_path: Path) -> None:
    lay = tmp_path / "lay"
    export_models(store, [ONE], f"{lay}/")
    layer = store.get_manifest(ONE).layers[0].digest
    f = lay / "blobs/sha256" / layer.hex
    data = bytearray(f.read_bytes())
    data[1234] ^= 0x10
    f.write_bytes(bytes(data))
    other = Store(tmp_path / "o")
    with pytest.raises(ArchiveDamaged, match="1 damaged"):
        import_archive(other, lay)
    assert other.list_models() == [] and not other.has_blob(layer)
    f.write_bytes(store.blob_path(layer).read_bytes())  # repaired; now the index is edited
    index = (lay / "index.json").read_bytes().replace(b"one:v1", b"one:v2")
    (lay / "index.json").write_bytes(index)
    with pytest.raises(ArchiveDamaged, match=r"index.json does not match index.json.sha256"):
        import_archive(other, lay)
    assert other.list_models() == []


# ---------------------------------------------------------------------- hostile headers
# (offset, length) of the ustar header fields; the numeric ones are octal text.
FIELDS = {"name": (0, 100), "mode": (100, 8), "uid": (108, 8), "gid": (116, 8),
          "size": (124, 12), "mtime": (136, 12), "typeflag": (156, 1),
          "linkname": (157, 100), "magic": (257, 6), "version": (263, 2),
          "uname": (265, 32), "gname": (297, 32), "devmajor": (329, 8),
          "devminor": (337, 8), "prefix": (345, 155)}
NUMERIC = {"mode", "uid", "gid", "size", "mtime", "devmajor", "devminor"}
# what a number may look like to a sloppy parser: signs, blanks, '_', other digits
number_text = st.one_of(
    st.integers(-(2 ** 70), 2 ** 70).map(str),
    st.integers(0, 2 ** 40).map(lambda n: f"{n:o}"),
    st.builds(lambda pre, n, post: f"{pre}{n}{post}",
              st.sampled_from(["", " ", "+", "-", "0", "\t", "0x"]),
              st.integers(0, 10 ** 6), st.sampled_from(["", " ", "_0", "\0", "\n", "e3"])),
    st.text(st.characters(codec="utf-8"), max_size=24))


def _fix_checksum(header: bytearray) -> None:
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}\0 ".encode()


def _pax_header(records: dict[str, str]) -> bytes:
    body = b""
    for key, value in records.items():
        rec = f" {key}={value}\n".encode()
        digits = 1  # the record's length counts its own digits
        while len(str(len(rec) + digits)) != digits:
            digits += 1
        body += str(len(rec) + digits).encode() + rec
    info = tarfile.TarInfo("PaxHeaders/x")
    info.type = tarfile.XHDTYPE
    info.size = len(body)
    return info.tobuf(tarfile.USTAR_FORMAT) + body + bytes(-len(body) % 512)


def _import_in_child(store_root: Path, path: Path, seconds: float) -> int | None:
    """``import_archive`` in a forked child, killed after ``seconds``: the CLI's exit
    code for its outcome (0, 4, 5, 8; 1 for anything else), or None for a hang. (A
    hypothesis example that hangs would hang its shrinking too: pytest-timeout's one
    alarm per test cannot bound that; a child per example can.)"""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            import_archive(Store(store_root), path)
            code = 0
        except ArchiveDamaged:
            code = 5
        except InvalidInput:
            code = 4
        except InsufficientSpace:
            code = 8
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    deadline = time.monotonic() + seconds
    while not (done := os.waitpid(pid, os.WNOHANG))[0]:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.002)
    return os.waitstatus_to_exitcode(done[1])


def _import_ends_well(tmp: Path, data: bytes, fmt: str, want: dict[str, bytes],
                      not_an_archive_ok: bool = False) -> None:
    """A hostile archive ends, in time, in ArchiveDamaged (exit 5) or a correct import;
    whatever is visible afterwards is intact."""
    if fmt == "tar.zst":
        import zstandard

        data = zstandard.ZstdCompressor(write_checksum=True).compress(data)
    (tmp / f"a.{fmt}").write_bytes(data)
    code = _import_in_child(tmp / "s", tmp / f"a.{fmt}", 20)
    assert code is not None, "the import hung"
    store = Store(tmp / "s")
    got = manifests_of(store)
    if code == 0:
        assert got == want
    elif code == 5:
        assert {n: want[n] for n in got} == got
    elif code == 4:
        # a first header without 'ustar': no archive at all; or a header whose size
        # swallows the whole layout, which leaves a well-formed tar of other files: "a
        # tar archive but not an OCI image layout", nothing imported
        assert not_an_archive_ok or got == {}, got
    else:
        # a header claiming more than the disk holds: a .tar's own length refutes it
        # (exit 5); the length of a .tar.zst's contents is not known beforehand (exit 8)
        assert (code, fmt) == (8, "tar.zst"), code
    assert store.verify().ok


@pytest.mark.timeout(240)
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(["tar", "tar.zst"]), data=st.data())
def test_any_corrupted_header_field_or_pax_size_is_refused_or_imported_never_a_hang(
        small_archives: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory,
        fmt: str, data: st.DataObject) -> None:
    tar = bytearray(small_archives["tar"])
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        headers = [m.offset for m in tf.getmembers()]
    i = data.draw(st.integers(0, len(headers) - 1), label="member")
    at = headers[i]
    first_magic = False
    if data.draw(st.booleans(), label="pax"):  # a PAX header before member i
        records = {"size": data.draw(number_text, label="size")}
        if data.draw(st.booleans(), label="with path"):
            records["path"] = data.draw(st.text(max_size=80), label="path")
        tar[at:at] = _pax_header(records)
    else:  # one field of member i's header rewritten, its checksum made right again
        field = data.draw(st.sampled_from(sorted(FIELDS)), label="field")
        start, length = FIELDS[field]
        if field in NUMERIC:
            raw = data.draw(st.one_of(number_text.map(str.encode),
                                      st.binary(min_size=1, max_size=length)), label="value")
        else:
            raw = data.draw(st.binary(min_size=1, max_size=length), label="value")
        raw = (raw + bytes(length))[:length]
        header = tar[at:at + 512]
        header[start:start + length] = raw
        _fix_checksum(header)
        tar[at:at + 512] = header
        first_magic = i == 0 and field in ("magic", "version") and fmt == "tar"
    want = json.loads(small_archives["manifests"])
    _import_ends_well(tmp_path_factory.mktemp("hdr"), bytes(tar), fmt,
                      {k: v.encode() for k, v in want.items()},
                      not_an_archive_ok=first_magic)


def _one_member_tar(size_field: bytes | None = None, pax_size: str | None = None) -> bytes:
    info = tarfile.TarInfo("a")
    info.size = 8
    header = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    if size_field is not None:
        header[124:136] = size_field
        _fix_checksum(header)
    pax = _pax_header({"size": pax_size}) if pax_size is not None else b""
    return pax + bytes(header) + b"12345678" + bytes(504) + bytes(1024)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("size_field", "pax_size"), [
    (None, "-1"),                   # the tester's archive: spun forever at 100 % CPU
    (None, "-0"), (None, "+8"), (None, " 8"), (None, "8 "), (None, "0_8"),
    (None, "\u0668"),              # ARABIC-INDIC DIGIT EIGHT: int() takes it
    (None, "1" * 30),
    (b"+0000000010\0", None), (b"0000001_0\0\0\0", None), (b"  1_0      \0", None),
    (b"\xff" * 12, None),          # GNU base-256, negative
])
def test_malformed_member_sizes_are_damage(size_field: bytes | None,
                                           pax_size: str | None) -> None:
    with pytest.raises(TarDamaged, match=r"bad (member|PAX) size"):
        for _ in TarReader(io.BytesIO(_one_member_tar(size_field, pax_size))):
            pass


def test_well_formed_member_sizes_are_read() -> None:
    for size_field, pax_size in ((None, "8"), (b"     10 \0\0\0\0", None),
                                 (b"\x80" + (8).to_bytes(11, "big"), None)):
        reader = TarReader(io.BytesIO(_one_member_tar(size_field, pax_size)))
        assert [(m.name, reader.read(100)) for m in reader] == [("a", b"12345678")]


@pytest.mark.parametrize("field", [bytes(12), b" " * 12, b" " * 11 + b"\0"])
def test_an_empty_size_field_is_zero(field: bytes) -> None:
    """Some writers leave a directory's or link's size field empty (all NUL or blank);
    tarfile reads that as 0, and so does this reader (found by review: the strict
    sizes refused it as damage)."""
    d = tarfile.TarInfo("d")
    d.type = tarfile.DIRTYPE
    header = bytearray(d.tobuf(tarfile.USTAR_FORMAT))
    header[124:136] = field
    _fix_checksum(header)
    reader = TarReader(io.BytesIO(bytes(header) + _one_member_tar()))
    assert [(m.name, reader.read(100)) for m in reader] == [("d", b""), ("a", b"12345678")]


def _make_not_regular(f: Path, kind: str) -> str:
    """Replace file ``f`` by a non-regular one; the word the error uses for it."""
    f.unlink()
    if kind == "fifo":
        os.mkfifo(f)
        return "a FIFO"
    if kind == "symlink loop":
        f.symlink_to(f.name)
        return "a symlink loop"
    if kind == "folder":
        f.mkdir()
        return "a folder"
    f.symlink_to("/dev/zero")  # endless: must not even be opened
    return "a character device"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["fifo", "symlink loop", "folder", "char device"])
def test_folder_layout_blob_that_is_not_a_regular_file_is_a_damaged_blob(
        store: Store, tmp_path: Path, kind: str) -> None:
    # a FIFO blocked the import forever; a symlink loop was an OS error (exit 11)
    lay = tmp_path / "lay"
    export_models(store, [ONE, TWO], f"{lay}/")
    f = lay / "blobs/sha256" / store.get_manifest(ONE).layers[1].digest.hex  # ONE only
    word = _make_not_regular(f, kind)
    other = Store(tmp_path / "o")
    with pytest.raises(ArchiveDamaged, match="1 damaged") as ei:
        import_archive(other, lay)
    assert f"({f} is {word}, not a regular file)" in ei.value.message
    assert manifests_of(other) == {str(TWO): store.get_manifest(TWO).raw}  # the rest


@pytest.mark.timeout(60)
@pytest.mark.parametrize("meta", ["oci-layout", "index.json", "index.json.sha256"])
@pytest.mark.parametrize("kind", ["fifo", "symlink loop"])
def test_folder_layout_metadata_that_is_not_a_regular_file_stops_the_import(
        store: Store, tmp_path: Path, meta: str, kind: str) -> None:
    lay = tmp_path / "lay"
    export_models(store, [ONE], f"{lay}/")
    word = _make_not_regular(lay / meta, kind)
    other = Store(tmp_path / "o")
    with pytest.raises(ArchiveDamaged) as ei:
        import_archive(other, lay)
    assert ei.value.message == f"{lay / meta} is {word}, not a regular file"
    assert other.list_models() == []


# ---------------------------------------------------------------------- export targets
def _drain_in_thread(path: Path | int) -> tuple[threading.Thread, list[bytes]]:
    """Read ``path`` (a FIFO) or fd to its end in a thread; the bytes land in the list."""
    got: list[bytes] = []

    def drain() -> None:
        with open(path, "rb") as f:
            got.append(f.read())

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    return t, got


def _imports_as(tmp: Path, data: bytes, fmt: str, want: dict[str, bytes]) -> None:
    (tmp / f"got.{fmt}").write_bytes(data)
    other = Store(tmp / f"got-{fmt}")
    import_archive(other, tmp / f"got.{fmt}")
    assert manifests_of(other) == want


def test_export_through_a_symlink_writes_the_file_it_names(store: Store,
                                                           tmp_path: Path) -> None:
    # the rename replaced the symlink itself (as root, '-o /dev/stdout' replaced
    # /dev/stdout for the whole container)
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "old.tar"
    target.write_bytes(b"previous export")
    (tmp_path / "link.tar").symlink_to(target)
    (tmp_path / "dangling.tar").symlink_to(tmp_path / "real" / "new.tar")
    for link in ("link.tar", "dangling.tar"):
        r = export_models(store, [ONE], tmp_path / link)
        assert (tmp_path / link).is_symlink()
        assert r.path == tmp_path / link
    want = {str(ONE): store.get_manifest(ONE).raw}
    for name in ("old.tar", "new.tar"):
        assert (tmp_path / "real" / name).is_file()
        _imports_as(tmp_path, (tmp_path / "real" / name).read_bytes(), "tar", want)
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["new.tar", "old.tar"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt", ["tar", "tar.zst"])
@pytest.mark.parametrize("via_symlink", [False, True])
def test_export_into_a_fifo_streams_into_it_and_keeps_it(
        store: Store, tmp_path: Path, fmt: str, via_symlink: bool) -> None:
    # the tester's repro_export_fifo.sh: the FIFO was replaced by a regular file
    fifo = tmp_path / f"pipe.{fmt}"
    os.mkfifo(fifo)
    dest = fifo
    if via_symlink:
        dest = tmp_path / f"link.{fmt}"
        dest.symlink_to(fifo)
    reader, got = _drain_in_thread(fifo)
    r = export_models(store, [ONE, TWO], dest)
    reader.join(30)
    assert got and r.bytes_out == len(got[0])
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert dest.is_symlink() == via_symlink
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({fifo.name, dest.name, "s"})
    _imports_as(tmp_path, got[0], fmt, manifests_of(store))


@pytest.mark.timeout(60)
def test_export_streams_into_a_file_descriptor(store: Store, tmp_path: Path) -> None:
    r_fd, w_fd = os.pipe()
    reader, got = _drain_in_thread(r_fd)
    try:
        r = export_models(store, [ONE], w_fd, format="tar.zst")
    finally:
        os.close(w_fd)  # (not closed by the export)
    reader.join(30)
    assert r.path is None and r.format == "tar.zst" and r.bytes_out == len(got[0])
    _imports_as(tmp_path, got[0], "tar.zst", {str(ONE): store.get_manifest(ONE).raw})
    for fmt in (None, "dir"):
        with pytest.raises(InvalidInput, match="streamed to a file descriptor needs"):
            export_models(store, [ONE], 1, format=fmt)


def test_export_refuses_terminals_sockets_and_symlink_loops(store: Store,
                                                            tmp_path: Path) -> None:
    master, slave = os.openpty()
    try:
        with pytest.raises(InvalidInput, match="refusing to write an archive to a terminal"):
            export_models(store, [ONE], slave, format="tar")
        with pytest.raises(InvalidInput, match="refusing to write an archive to a terminal"):
            export_models(store, [ONE], os.ttyname(slave), format="tar")
    finally:
        os.close(master)
        os.close(slave)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock.tar"))
    loop = tmp_path / "loop.tar"
    loop.symlink_to(loop.name)
    try:
        with pytest.raises(InvalidInput, match=r"sock\.tar is a socket; an archive is"):
            export_models(store, [ONE], tmp_path / "sock.tar")
        with pytest.raises(InvalidInput, match=r"loop\.tar is a symlink loop"):
            export_models(store, [ONE], loop)
        assert stat.S_ISSOCK(os.lstat(tmp_path / "sock.tar").st_mode)
        assert loop.is_symlink()
    finally:
        sock.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop.tar", "s", "sock.tar"]


# ------------------------------------------------- a manifest that disagrees with its blobs
BAD = "example.com/ns/bad:v1"


def _add_entry(lay: Path, manifest: bytes, ref: str = BAD) -> None:
    """Add ``manifest`` to the folder layout ``lay`` as one more index entry."""
    digest = Digest.of_bytes(manifest)
    (lay / "blobs/sha256" / digest.hex).write_bytes(manifest)
    index = json.loads((lay / "index.json").read_text())
    index["manifests"].append({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                               "digest": str(digest), "size": len(manifest),
                               "annotations": {ANNOTATION_REF_NAME: ref}})
    (lay / "index.json").write_text(json.dumps(index))
    (lay / "index.json.sha256").unlink(missing_ok=True)


def _as_tar(lay: Path, out: Path) -> Path:
    with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as tf:
        for p in sorted(lay.rglob("*")):
            if p.is_file():
                tf.add(p, arcname=str(p.relative_to(lay)))
    return out


_BROKEN = {  # manifests whose digest verifies but which are no valid manifest
    "negative size": lambda doc: doc["layers"][0].update(size=-1),
    "size over the limit": lambda doc: doc["layers"][0].update(size=1 << 60),
    "bad config digest": lambda doc: doc["config"].update(digest="sha256:xyz"),
    "no config": lambda doc: doc.pop("config"),
    "not an object": lambda doc: doc.clear() or doc.update(x=[1]),
}


@pytest.mark.timeout(120)
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(["tar", "dir"]), which=st.integers(0, 2),
       change=st.one_of(st.integers(-20, 1 << 40).filter(lambda n: n != 0),
                        st.sampled_from(sorted(_BROKEN))))
def test_a_manifest_that_disagrees_with_its_blobs_is_damage_and_the_rest_imports(
        store: Store, tmp_path_factory: pytest.TempPathFactory, fmt: str, which: int,
        change: int | str) -> None:
    """Found from outside: a manifest naming a blob at another size than the archive's
    (its digest checks) imported the other models with exit 0 and listed it as skipped,
    not damaged ("model … is damaged" from put_manifest); alone, exit 4. A manifest
    that verifies but does not decode was a warning too. Both are damage now."""
    tmp = tmp_path_factory.mktemp("bad")
    lay = tmp / "lay"
    export_models(store, [ONE, TWO], f"{lay}/")
    doc = json.loads(store.get_manifest(ONE).raw)
    if isinstance(change, int):
        d = [doc["config"], *doc["layers"]][which]
        d["size"] = max(0, d["size"] + change)
    else:
        _BROKEN[change](doc)
    _add_entry(lay, json.dumps(doc).encode())
    src = lay if fmt == "dir" else _as_tar(lay, tmp / "a.tar")
    other = Store(tmp / "o")
    with pytest.raises(ArchiveDamaged, match="1 refused") as ei:
        import_archive(other, src)
    res = ei.value.result
    assert res is not None
    assert sorted(str(m.name) for m in res.models) == sorted([str(ONE), str(TWO)])
    assert [(s.ref, s.kind, s.damaged) for s in res.skipped] == [(BAD, "damaged", True)]
    assert manifests_of(other) == manifests_of(store)
    assert other.verify().ok


@pytest.mark.timeout(60)
def test_a_folder_blob_larger_than_its_descriptor_is_refused_before_it_is_read(
        store: Store, tmp_path: Path) -> None:
    """Found from outside: a folder layout's blob file made a sparse 4 GiB file was
    copied whole into the store's ingest (~14 s) before the digest check; a 100 GiB one
    stopped the whole import with exit 8. Its size is checked against the descriptors
    first now: damaged, not a byte of it read, the other models imported."""
    lay = tmp_path / "lay"
    export_models(store, [ONE, TWO], f"{lay}/")
    tpl = store.get_manifest(ONE).layers[1]  # only ONE uses it
    big = lay / "blobs/sha256" / tpl.digest.hex
    os.truncate(big, 1 << 30)  # sparse
    other = Store(tmp_path / "o")
    t0 = time.monotonic()
    with pytest.raises(ArchiveDamaged, match=f"expected {tpl.size} bytes, got {1 << 30}") as ei:
        import_archive(other, lay)
    assert time.monotonic() - t0 < 5
    res = ei.value.result
    assert res is not None
    assert [str(m.name) for m in res.models] == [str(TWO)]
    assert res.bytes_read < 1 << 20
    assert [(s.ref, s.damaged) for s in res.skipped] == [(str(ONE), True)]
    assert sum(p.stat().st_blocks * 512 for p in other.layout.ingest.rglob("*")) < 1 << 20


# ------------------------------------------------------------ export: order, leftovers
THREE = ModelName.parse("other.example/x/three:latest")


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=st.lists(st.sampled_from([ONE, TWO, THREE]), min_size=3, max_size=6)
       .filter(lambda xs: len(set(xs)) == 3), fmt=st.sampled_from(["tar", "tar.zst"]))
def test_the_same_models_give_the_same_bytes_in_any_order(
        store: Store, tmp_path_factory: pytest.TempPathFactory, order: list[ModelName],
        fmt: str) -> None:
    """Found from outside: `export a b` and `export b a` wrote different bytes (the
    index followed the arguments); the index is ordered by name now."""
    if not store.has_model(THREE):
        add_model(store, str(THREE), [b"three"])
    tmp = tmp_path_factory.mktemp("order")
    export_models(store, [ONE, TWO, THREE], tmp / f"ref.{fmt}")
    export_models(store, order, tmp / f"a.{fmt}")
    assert (tmp / f"a.{fmt}").read_bytes() == (tmp / f"ref.{fmt}").read_bytes()


@pytest.fixture(scope="module")
def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


_NAMES = st.tuples(
    st.sampled_from([".a.tar.", ".b.tar.", "a.tar.", ".a.tar", ".a.tar..", ".A.tar."]),
    st.sampled_from(["dead", "live", "own", "0dead", "dead0x", "", "\u0663", "99999999999999"]),
    st.sampled_from([".part", ".part.x", ".PART", "", ".part.part"]))


@pytest.mark.timeout(60)
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(_NAMES, min_size=1, max_size=6, unique=True))
def test_an_export_removes_only_the_part_files_of_dead_exports_to_its_target(
        store: Store, tmp_path_factory: pytest.TempPathFactory, dead_pid: int,
        names: list[tuple[str, str, str]]) -> None:
    """Found from outside: an export killed with SIGKILL left `.NAME.<pid>.part` beside
    the target, and nothing ever removed it. An export to that target removes exactly
    those whose pid is dead, and nothing else beside it."""
    tmp = tmp_path_factory.mktemp("parts")
    live = subprocess.Popen(["sleep", "60"])
    try:
        pids = {"dead": str(dead_pid), "live": str(live.pid), "own": str(os.getpid()),
                "0dead": f"0{dead_pid}", "dead0x": f"{dead_pid}0x"}
        made = set()
        for prefix, pid, suffix in names:
            name = prefix + pids.get(pid, pid) + suffix
            (tmp / name).write_bytes(b"part of an archive")
            made.add(name)
        export_models(store, [ONE], tmp / "a.tar")
    finally:
        live.kill()
        live.wait()
    gone = {n for n in made if not (tmp / n).exists()}
    # (this process's own name is the temp file this export wrote and renamed)
    assert gone == {f".a.tar.{dead_pid}.part", f".a.tar.{os.getpid()}.part"} & made
    assert import_archive(Store(tmp / "o"), tmp / "a.tar").models


@pytest.mark.timeout(60)
def test_a_dead_exports_part_file_that_is_locked_a_link_or_a_fifo_stays(
        store: Store, tmp_path: Path, dead_pid: int) -> None:
    """The pid alone does not decide: a part file someone holds a lock on (a live
    export seen from another pid namespace) stays, and so does anything that is not a
    regular file (a symlink is not followed; a FIFO is not waited on)."""
    locked = tmp_path / f".a.tar.{dead_pid}.part"
    locked.write_bytes(b"x")
    holder = subprocess.Popen(["flock", str(locked), "sleep", "60"])
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["flock", "-n", str(locked), "true"]).returncode == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        export_models(store, [ONE], tmp_path / "a.tar")
        assert locked.exists()
    finally:
        holder.kill()
        holder.wait()
    locked.unlink()
    target = tmp_path / "keep"
    target.write_bytes(b"keep")
    locked.symlink_to(target)
    export_models(store, [ONE], tmp_path / "a.tar")
    assert locked.is_symlink() and target.read_bytes() == b"keep"
    locked.unlink()
    os.mkfifo(locked)
    export_models(store, [ONE], tmp_path / "a.tar")
    assert stat.S_ISFIFO(os.lstat(locked).st_mode)
