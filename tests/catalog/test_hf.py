"""Hugging Face files against a local stand-in for the Hub API, resolve/ and its CDN."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from blobstore.digest import Digest
from blobstore.gc import GCOptions, gc
from blobstore.lease import Lease
from blobstore.name import ModelName
from blobstore.store import Store
from catalog.fetch import fetch_file
from catalog.hf import quant_of
from tests.cli.clirun import run, run_proc
from tests.helpers import make_gguf
from tests.hfserver import CDNServer, HFServer

REPO = "acme/Tiny-GGUF"


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HFServer]:
    cdn = CDNServer().start()
    hub = HFServer(cdn).start()
    small = make_gguf(tmp_path / "a.gguf", file_type=15, n_embd=64, n_vocab=300).read_bytes()
    big = make_gguf(tmp_path / "b.gguf", file_type=17, n_embd=256, n_vocab=1000,
                    layers=2).read_bytes()
    hub.add_file(REPO, "Tiny-Q4_K_M.gguf", small)
    hub.add_file(REPO, "sub/tiny-q5_k_m.gguf", big)
    hub.add_file(REPO, "Tiny-Q8_0-00001-of-00002.gguf", b"x" * 100)
    hub.add_file(REPO, "README.md", b"# hi")
    yield hub
    hub.stop()
    cdn.stop()


def env(hub: HFServer, **extra: str) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.url, **extra}


@pytest.mark.parametrize(("name", "quant"), [
    ("Qwen2.5-Coder-7B-Instruct-Q5_K_M.gguf", "Q5_K_M"),
    ("qwen2.5-coder-7b-instruct-q4_k_m.gguf", "Q4_K_M"),
    ("Meta-Llama-3.1-8B-Instruct-IQ4_XS.gguf", "IQ4_XS"),
    ("phi-4-Q8_0.gguf", "Q8_0"),
    ("model-f16.gguf", "F16"),
    ("model-BF16-00001-of-00003.gguf", "BF16"),
    ("mmproj-model.gguf", None),
    ("Q4_K_M/Model-Q4_K_M.gguf", "Q4_K_M"),
])
def test_quant_from_file_name(name: str, quant: str | None) -> None:
    assert quant_of(name) == quant


def test_variants_lists_gguf_files_with_sizes(hub: HFServer) -> None:
    hub.page_size = 2  # the listing is paged: Link rel=next must be followed
    r = run("variants", f"hf.co/{REPO}", "--json", env=env(hub))
    assert r.code == 0, r.err
    got = {v["file"]: v for v in r.json()}
    assert set(got) == {"Tiny-Q4_K_M.gguf", "sub/tiny-q5_k_m.gguf",
                        "Tiny-Q8_0-00001-of-00002.gguf"}
    data = hub.repos[("acme", "Tiny-GGUF")]["Tiny-Q4_K_M.gguf"]
    assert got["Tiny-Q4_K_M.gguf"] == {"file": "Tiny-Q4_K_M.gguf", "size": len(data),
                                       "sha256": hashlib.sha256(data).hexdigest(),
                                       "quant": "Q4_K_M", "split": False, "projector": False}
    assert got["Tiny-Q8_0-00001-of-00002.gguf"]["split"] is True
    table = run("variants", f"hf.co/{REPO}", env=env(hub))
    assert table.out.splitlines()[0].split() == ["QUANT", "SIZE", "FILE", "NOTE"]
    assert any(line.startswith("Q5_K_M") for line in table.out.splitlines())


def test_variants_errors(hub: HFServer) -> None:
    r = run("variants", "hf.co/acme/Nope", env=env(hub))
    assert r.code == 3 and r.err.startswith("error: Hugging Face repo acme/Nope not found")
    r = run("variants", "acme/Tiny-GGUF", env=env(hub))
    assert r.code == 4 and "is not a Hugging Face repository" in r.err
    hub.token = "s3cret"
    r = run("variants", f"hf.co/{REPO}", env=env(hub))
    assert r.code == 7 and r.err.startswith("error: ") and "hint: " in r.err


def test_pull_file_private_repo_token_stays_off_the_cdn(hub: HFServer, tmp_path: Path) -> None:
    hub.token = "s3cret"
    store = tmp_path / "s"
    r = run_proc("pull", f"hf.co/{REPO}", "--file", "sub/tiny-q5_k_m.gguf", "--json",
                 "--chunk-size", "64K", "--store", str(store), env=env(hub, HF_TOKEN="s3cret"))
    assert r.code == 0, r.err
    summary = json.loads(r.out.splitlines()[-1])
    assert summary["name"] == "hf.co/acme/Tiny-GGUF:Q5_K_M"
    data = hub.repos[("acme", "Tiny-GGUF")]["sub/tiny-q5_k_m.gguf"]
    assert summary["model_digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
    assert summary["bytes_fetched"] == len(data)
    # the hub saw the token; the CDN (another origin) never did, on any of its requests
    assert all(s.headers.get("Authorization") == "Bearer s3cret" for s in hub.log)
    ranged = [s for s in hub.cdn.log if "Range" in s.headers]
    assert len(ranged) > 1 and all("Authorization" not in s.headers for s in hub.cdn.log)
    # an Ollama-compatible model: show reads its config, path is the GGUF blob
    show = run("show", "hf.co/acme/Tiny-GGUF:Q5_K_M", "--json", "--store", str(store)).json()
    assert show["details"]["quantization_level"] == "Q5_K_M"
    assert show["details"]["format"] == "gguf" and show["details"]["family"] == "llama"
    assert Path(show["model_path"]).read_bytes() == data


def test_pull_file_interrupted_then_resumed(hub: HFServer, tmp_path: Path) -> None:
    store = tmp_path / "s"
    data = hub.repos[("acme", "Tiny-GGUF")]["sub/tiny-q5_k_m.gguf"]
    assert len(data) > 600_000
    hub.cdn.fail_from = 384 * 1024   # ranges past 384 KiB reset: the first run fails
    args = ("pull", f"hf.co/{REPO}", "--file", "tiny-q5_k_m.gguf", "--chunk-size", "64K",
            "--connections", "2", "--retries", "0", "--store", str(store))
    r = run_proc(*args, env=env(hub))
    assert r.code == 6, r.err
    assert [x for x in r.err.splitlines() if x.startswith("error: ")]
    assert Store(store).list_models() == []
    assert not any((store / "blobs").iterdir())     # nothing under a digest name
    hub.cdn.fail_from = None
    hub.cdn.log.clear()
    r = run_proc(*args, "--json", env=env(hub))
    assert r.code == 0, r.err
    summary = json.loads(r.out.splitlines()[-1])
    assert summary["bytes_resumed"] >= 384 * 1024 - 64 * 1024
    assert summary["bytes_fetched"] + summary["bytes_resumed"] == len(data)
    starts = [int(s.headers["Range"].split("=")[1].split("-")[0]) for s in hub.cdn.log
              if "Range" in s.headers]
    assert starts and min(starts) >= 256 * 1024       # the first chunks were not fetched again
    assert Path(run("path", "hf.co/acme/Tiny-GGUF:Q5_K_M", "--store", str(store)).out.strip()
                ).read_bytes() == data


def test_pull_file_digest_mismatch_exit_5_nothing_visible(hub: HFServer, tmp_path: Path) -> None:
    hub.cdn.wrong_bytes = True
    store = tmp_path / "s"
    r = run("pull", f"hf.co/{REPO}", "--file", "Tiny-Q4_K_M.gguf", "--quiet", "--store",
            str(store), env=env(hub))
    assert r.code == 5
    assert r.err.startswith("error: digest mismatch from http://127.0.0.1:")
    assert "X-Sig" not in r.err                        # no query strings in messages
    assert Store(store).list_models() == []
    assert not any((store / "blobs").iterdir())


def test_pull_file_errors(hub: HFServer, tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    r = run("pull", f"hf.co/{REPO}", "--file", "nope.gguf", "--store", store, env=env(hub))
    assert r.code == 3
    assert r.err.splitlines() == [
        "error: hf.co/acme/Tiny-GGUF has no file 'nope.gguf' at revision main",
        "hint: 'blobctl variants hf.co/acme/Tiny-GGUF' lists its GGUF files"]
    r = run("pull", f"hf.co/{REPO}", "--file", "Tiny-Q8_0-00001-of-00002.gguf", "--store",
            store, env=env(hub))
    assert r.code == 4 and "one part of a split GGUF" in r.err
    r = run("pull", "me/x:1", "--file", "a.gguf", "--store", store, env=env(hub))
    assert r.code == 4 and "is not a Hugging Face repository" in r.err
    hub.no_lfs.add("Tiny-Q4_K_M.gguf")
    r = run("pull", f"hf.co/{REPO}", "--file", "Tiny-Q4_K_M.gguf", "--store", store,
            env=env(hub))
    assert r.code == 4
    assert r.err.splitlines() == [
        "error: Tiny-Q4_K_M.gguf has no LFS sha256 to verify it against",
        "hint: use 'blobctl fetch URL --sha256 HEX --name REF'"]


@pytest.mark.parametrize("size", [-5, 1 << 50])
def test_a_listing_with_an_impossible_size_is_a_protocol_error(
        hub: HFServer, tmp_path: Path, size: int) -> None:
    """Found from outside: a listed LFS size of -5 ended as exit 11, "cannot write to
    store … Invalid argument", with an ingest folder left behind."""
    hub.lfs_sizes["Tiny-Q4_K_M.gguf"] = size
    try:
        store = tmp_path / "s"
        r = run("pull", f"hf.co/{REPO}", "--file", "Tiny-Q4_K_M.gguf", "--store",
                str(store), env=env(hub))
        assert r.code == 6, r.err
        assert "lists Tiny-Q4_K_M.gguf with a size of" in r.err
        assert not list((store / ".blobctl" / "ingest").glob("*")) if (
            store / ".blobctl" / "ingest").exists() else True
    finally:
        hub.lfs_sizes.clear()


def test_fetch_plain_url(hub: HFServer, tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    data = hub.repos[("acme", "Tiny-GGUF")]["Tiny-Q4_K_M.gguf"]
    hexd = hashlib.sha256(data).hexdigest()
    url = f"{hub.cdn.url}/files/{hexd}"
    r = run("fetch", url, "--sha256", hexd, "--name", "mine/tiny:q4", "--json", "--store", store)
    assert r.code == 0, r.err
    assert json.loads(r.out.splitlines()[-1])["name"] == "registry.ollama.ai/mine/tiny:q4"
    again = run("fetch", url, "--sha256", hexd, "--name", "mine/tiny:q4", "--json",
                "--store", store)
    assert json.loads(again.out.splitlines()[-1])["already_present"] is True
    r = run("fetch", url, "--sha256", "0" * 64, "--name", "mine/bad:1", "--quiet",
            "--store", store)
    assert r.code == 5 and r.err.startswith("error: digest mismatch")
    assert run("show", "mine/bad:1", "--store", store).code == 3
    r = run("fetch", url, "--sha256", "xyz", "--name", "mine/bad:1", "--store", store)
    assert r.code == 4 and r.err.startswith("error: invalid digest")
    r = run("fetch", "ftp://x/y", "--sha256", hexd, "--name", "a:1", "--store", store)
    assert r.code == 4 and r.err.startswith("error: not an http(s) URL")
    r = run("fetch", f"{hub.cdn.url}/files/{'1' * 64}", "--sha256", "1" * 64, "--name",
            "a:1", "--store", store)
    assert r.code == 3 and r.err.startswith("error: ")
    # a file's URL, not a model name (found from outside: "not found in the registry"
    # with a hint about hf.co names)
    assert r.err.splitlines() == [
        f"error: {hub.cdn.url}/files/{'1' * 64} answered 404 (no such file)",
        "hint: check the URL"], r.err
    # the digest is in the store already: nothing is asked of the server (offline too)
    r = run("fetch", f"{hub.cdn.url}/files/{'1' * 64}", "--sha256", hexd, "--name", "a:1",
            "--store", store)
    assert r.code == 0, r.err
    readme = hashlib.sha256(b"# hi").hexdigest()
    r = run("fetch", f"{hub.cdn.url}/files/{readme}", "--sha256", readme, "--name", "a:1",
            "--quiet", "--store", store)
    assert r.code == 4 and "not a readable GGUF file" in r.err


@pytest.mark.parametrize("head_status", [403, 405])
def test_fetch_of_a_url_that_refuses_head_and_carries_secrets(
        hub: HFServer, tmp_path: Path, head_status: int) -> None:
    """A presigned URL (S3/CDN) signs the method too: HEAD gets 403 (or a server answers
    405). fetch takes the size from a 1-byte range GET (HEAD is not asked); and no
    message, nor the JSON summary, shows the URL's password or query (found from
    outside)."""
    store = str(tmp_path / "s")
    data = hub.repos[("acme", "Tiny-GGUF")]["Tiny-Q4_K_M.gguf"]
    hexd = hashlib.sha256(data).hexdigest()
    hub.cdn.head_status = head_status
    base = hub.cdn.url.replace("http://", "http://user:hunter2@")
    url = f"{base}/files/{hexd}?X-Amz-Signature=SECRETSIG"
    r = run("fetch", url, "--sha256", hexd, "--name", "mine/signed:1", "--json",
            "--store", store)
    assert r.code == 0, r.err
    summary = json.loads(r.out.splitlines()[-1])
    assert summary["url"] == f"{hub.cdn.url}/files/{hexd}"
    assert [x.method for x in hub.cdn.log][:1] == ["GET"]
    assert hub.cdn.log[0].headers.get("Range") == "bytes=0-0"
    before = len(hub.cdn.log)
    again = run("fetch", url, "--sha256", hexd, "--name", "mine/signed:1", "--json",
                "--store", store)
    assert json.loads(again.out.splitlines()[-1])["already_present"] is True
    assert [x.method for x in hub.cdn.log].count("HEAD") == 0
    assert len(hub.cdn.log) == before  # present: no request
    r = run("fetch", f"{base}/files/{'1' * 64}?X-Amz-Signature=SECRETSIG", "--sha256",
            "1" * 64, "--name", "a:1", "--store", store)
    assert r.code == 3 and r.err.startswith("error: "), r.err
    assert "hunter2" not in r.err + r.out and "SECRETSIG" not in r.err + r.out, r.err


@pytest.mark.timeout(60)  # before the cap, this listing was read forever
@pytest.mark.parametrize(("paging", "message"), [
    ("loop", "error: Hugging Face repo acme/Tiny-GGUF: the file list's page 2 is page 1 "
             "again (a loop of Link: rel=next)"),
    ("endless", "error: Hugging Face repo acme/Tiny-GGUF: the file list has more than "
                "1000 pages"),
])
def test_variants_paging_that_never_ends_is_a_protocol_error(hub: HFServer, paging: str,
                                                               message: str) -> None:
    hub.page_size = 2
    hub.bad_paging = paging
    r = run("variants", f"hf.co/{REPO}", env=env(hub))
    assert r.code == 6, r.err
    assert r.err.splitlines()[0] == message
    assert len(hub.log) == (1 if paging == "loop" else 1000)  # no page read twice, no 1001st


@pytest.mark.timeout(60)
def test_file_list_size_cap_is_for_the_whole_listing(hub: HFServer) -> None:
    """64 MiB in all (spec/catalog.md), not 64 MiB per page: 3 pages of 25 MiB fail."""
    hub.page_size = 2
    hub.pad = 25 << 20
    r = run("variants", f"hf.co/{REPO}", env=env(hub))
    assert r.code == 6, r.err
    assert r.err.splitlines()[0] == ("error: Hugging Face repo acme/Tiny-GGUF: the file list "
                                     "is larger than 64 MiB (after 3 pages)")
    hub.pad = 0
    assert run("variants", f"hf.co/{REPO}", env=env(hub)).code == 0


class _GCAfterFirstCheck(Store):
    """A store on which a full GC (grace 0) runs right after the first "is the blob
    there?" answered yes: the worst moment for a concurrent ``blobctl gc`` to land.
    (Once only: later checks run under the store lock, which a real GC would wait for.)"""

    gc_ran = False

    def has_blob(self, digest: Digest, size: int | None = None) -> bool:
        present = super().has_blob(digest, size)
        if present and not self.gc_ran:
            self.gc_ran = True
            gc(self, GCOptions(grace=0))
        return present


def test_fetch_of_a_present_blob_holds_the_lease_before_it_checks(tmp_path: Path) -> None:
    data = make_gguf(tmp_path / "m.gguf", file_type=15).read_bytes()
    store = _GCAfterFirstCheck(tmp_path / "s")
    with Lease(store.layout, "test") as lease:
        digest = store.put_bytes(data, lease=lease)   # unreferenced: GC's to take, unleased
    # no server: the blob is present, so nothing is downloaded
    result = fetch_file(store, "http://127.0.0.1:9/m.gguf", digest,
                        ModelName.parse("mine/present:1"), size=len(data))
    assert store.gc_ran and result.already_present and result.bytes_fetched == 0
    assert store.blob_path(digest).read_bytes() == data
    assert store.resolve(ModelName.parse("mine/present:1")).model_path == store.blob_path(digest)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["fetch", "pull --file"])
def test_fetch_and_pull_file_keep_the_stores_max_size(hub: HFServer, tmp_path: Path,
                                                      how: str) -> None:
    """Found from outside: the `max-size` setting is applied after every pull (spec/gc.md),
    but `fetch` and `pull --file` never applied it: the store stayed over its cap."""
    import os
    import time

    store = str(tmp_path / "s")
    old = []
    for i in range(4):  # four older models, last used long ago
        g = make_gguf(tmp_path / f"old{i}.gguf", seed=10 + i, n_embd=128, n_vocab=600)
        assert run("import", str(g), "--name", f"old/m{i}:1", "--store", store).code == 0
        old.append(f"old/m{i}:1")
    t = time.time() - 5 * 3600  # out of the grace period
    for p in [*(tmp_path / "s" / "blobs").iterdir(),
              *(tmp_path / "s" / "manifests").rglob("*")]:
        os.utime(p, (t, t))
    st = Store(store)
    for i, name in enumerate(old):
        st.record_use(ModelName.parse(name), time.time() - 3600 * (5 - i))
    st.close()
    data = hub.repos[("acme", "Tiny-GGUF")]["Tiny-Q4_K_M.gguf"]
    cap = 2 * len(data)  # room for the new model and little else
    assert run("config", "set", "max-size", str(cap), "--store", store).code == 0
    if how == "fetch":
        hexd = hashlib.sha256(data).hexdigest()
        r = run("fetch", f"{hub.cdn.url}/files/{hexd}", "--sha256", hexd, "--name",
                "new/tiny:q4", "--quiet", "--store", store)
        new = "new/tiny:q4"
    else:
        r = run_proc("pull", f"hf.co/{REPO}", "--file", "Tiny-Q4_K_M.gguf", "--quiet",
                     "--store", store, env=env(hub))
        new = f"hf.co/{REPO.lower()}:Q4_K_M"
    assert r.code == 0, r.err
    listed = [m["name"] for m in run("list", "--json", "--store", store).json()]
    assert any(n.lower().endswith(new.lower()) for n in listed), listed
    du = run("du", "--json", "--store", store).json()
    assert du["total_bytes"] <= cap, (du["total_bytes"], cap, listed)
    assert len(listed) < 5  # old models were evicted, oldest first


@pytest.mark.timeout(240)
@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(off=hs.one_of(hs.integers(1, 5_000_000), hs.integers(-90_000, -1)),
       chunk=hs.sampled_from(["64K", "1M", "64M"]))
def test_a_listed_size_the_file_does_not_have_is_a_size_mismatch_at_once(
        hub: HFServer, tmp_path: Path, off: int, chunk: str) -> None:
    """Found from outside: a listing that gives more bytes than the file has was retried
    8 times on its last range (the server's Content-Range gives the file's real length
    every time) and ended as a network error, exit 6, after ~10 s. A complete length
    other than the blob's is a size mismatch: exit 5 at once. (A listing that gives fewer
    bytes ends as a digest mismatch, also exit 5.)"""
    import time

    data = hub.repos[("acme", "Tiny-GGUF")]["Tiny-Q4_K_M.gguf"]
    # (a listed size of 0 reads as unknown and is asked of the server: a plain pull; a
    # negative one is a protocol error, test_a_listing_with_an_impossible_size_…)
    assert len(data) > 90_000
    hub.lfs_sizes["Tiny-Q4_K_M.gguf"] = len(data) + off
    try:
        store = tmp_path / f"s{time.monotonic_ns()}"
        t0 = time.monotonic()
        r = run_proc("pull", f"hf.co/{REPO}", "--file", "Tiny-Q4_K_M.gguf", "--chunk-size",
                     chunk, "--quiet", "--store", str(store), env=env(hub), timeout=60)
        took = time.monotonic() - t0
        assert r.code == 5, r.err
        assert "warning: retry" not in r.err, r.err
        assert took < 10, took
        assert run("list", "--json", "--store", str(store)).json() == []
    finally:
        hub.lfs_sizes.clear()


@pytest.mark.timeout(120)
@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dirs=hs.lists(hs.sampled_from(["", "v1/", "v2/", "sub/deep/", "Q8_0/"]), min_size=1,
                     max_size=4, unique=True),
       pick=hs.integers(0, 4), by_path=hs.booleans())
def test_pull_file_by_base_name_only_when_one_file_has_it(
        hub: HFServer, tmp_path: Path, dirs: list[str], pick: int, by_path: bool) -> None:
    """``--file NAME`` names a path in the repo, or the one file with that base name.
    Found from outside: with v1/NAME and v2/NAME, ``--file NAME`` took v1's, exit 0, no
    word. Hypothesis chooses the folders that hold a file of that base name and whether
    the user gives the full path (always taken) or the base name (taken when it is a
    path itself or one file's; else exit 4 naming every candidate, nothing fetched)."""
    base = "tiny-Q4_K_M.gguf"
    n = next(_AMB)
    repo = f"acme/Amb{n}"
    contents = [make_gguf(tmp_path / f"{n}-{i}.gguf", n_vocab=300 + i, seed=i).read_bytes()
                for i in range(len(dirs))]
    for d, data in zip(dirs, contents, strict=True):
        hub.add_file(repo, d + base, data)
    hub.add_file(repo, "README.md", b"# amb")
    chosen = pick % len(dirs)
    want: bytes | None = None
    if by_path:
        want = contents[chosen]
    elif "" in dirs:  # the base name is a path too: that file, no ambiguity
        want = contents[dirs.index("")]
    elif len(dirs) == 1:
        want = contents[0]
    store = tmp_path / f"s{n}"
    hub.cdn.log.clear()
    r = run("--json", "pull", f"hf.co/{repo}", "--file",
            dirs[chosen] + base if by_path else base, "--store", str(store), env=env(hub))
    if want is not None:
        assert r.code == 0, r.err
        assert json.loads(r.out.splitlines()[-1])["model_digest"] == \
            "sha256:" + hashlib.sha256(want).hexdigest()
        return
    assert r.code == 4, (r.code, r.err)
    lines = r.err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: ")
    assert f"hf.co/{repo} has {len(dirs)} files named {base!r}: " in lines[0]
    assert all(d + base in lines[0] for d in dirs)
    assert "--file " in lines[1]
    assert hub.cdn.log == []  # nothing was fetched
    assert run("list", "--json", "--store", str(store)).json() == []


_AMB = itertools.count()


_PROJ = itertools.count()
# file -> (is a model, quant tag); the projectors share the models' quant tags
_VISION = {"Tiny-F16.gguf": (True, "F16"), "mmproj-Tiny-f16.gguf": (False, "F16"),
           "Tiny-Q8_0.gguf": (True, "Q8_0"), "mmproj-Tiny-Q8_0.gguf": (False, "Q8_0"),
           "sub/Tiny-vision-F16.gguf": (False, "F16")}  # a projector by metadata only


def _vision_repo(hub: HFServer, tmp_path: Path) -> str:
    repo = "acme/Vision-GGUF"
    if ("acme", "Vision-GGUF") not in hub.repos:
        for i, (file, (model, _)) in enumerate(_VISION.items()):
            kind = None if model or "mmproj" not in file else "mmproj"
            data = make_gguf(tmp_path / f"v{i}.gguf", arch="llama" if model else "clip",
                             file_type=1 if "F16" in file.upper() else 7, kind=kind,
                             seed=i).read_bytes()
            hub.add_file(repo, file, data)
    return repo


@pytest.mark.timeout(180)
@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=hs.lists(hs.tuples(hs.sampled_from(sorted(_VISION)), hs.booleans()),
                      min_size=1, max_size=6))
def test_pull_file_of_a_projector_never_takes_the_models_tag(
        hub: HFServer, tmp_path: Path, order: list[tuple[str, bool]]) -> None:
    """Found from outside: ``pull --file mmproj-Tiny-f16.gguf`` after ``--file
    Tiny-F16.gguf`` wrote a projector-only manifest under the model's tag ``:F16`` (the
    quant in both names): exit 0, the model showed family ``clip``, ``run`` failed with
    "has no GGUF model layer" and GC deleted the real model's blobs. Hypothesis chooses
    the order of pulls (models and projectors of both quants, a projector known only by
    its metadata) and where GC runs: a projector is refused (exit 4, one error and one
    hint, no manifest), and every model pulled stays whole, its ``path`` its GGUF."""
    repo = _vision_repo(hub, tmp_path)
    files = hub.repos[("acme", "Vision-GGUF")]
    store = tmp_path / f"s{next(_PROJ)}"
    pulled: dict[str, bytes] = {}  # tag -> the model's GGUF
    for file, collect in order:
        model, tag = _VISION[file]
        r = run("pull", f"hf.co/{repo}", "--file", file, "--quiet", "--store", str(store),
                env=env(hub))
        if model:
            assert r.code == 0, r.err
            pulled[tag] = files[file]
        else:
            assert r.code == 4, (r.code, r.err)
            lines = r.err.splitlines()
            assert lines == [f"error: {file} is a vision projector, not a model; 'pull "
                             "--file' makes models only", lines[1]], r.err
            assert lines[1].startswith(f"hint: pull a model file ('blobctl variants "
                                       f"hf.co/{repo}' lists them)")
        if collect:
            gc(Store(store), GCOptions(grace=0))
        listed = {m["name"] for m in run("list", "--json", "--store", str(store)).json()}
        assert listed == {f"hf.co/{repo}:{t}" for t in pulled}
        for t, data in pulled.items():
            p = run("path", f"hf.co/{repo}:{t}", "--store", str(store))
            assert p.code == 0, p.err
            assert Path(p.out.strip()).read_bytes() == data
