"""``blobctl push`` (index attached), ``blobctl index``, ``pull/update --base``,
``update --dry-run`` and a ``blobctl update`` killed mid-delta that resumes, against the
real docker-registry (spec/delta.md, spec/cli.md)."""

from __future__ import annotations

import json
import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from blobstore.name import ModelName
from blobstore.store import Store
from tests.blobstore.archutil import add_model
from tests.cli.clirun import Result, run, run_proc
from tests.faultproxy import FaultProxy
from tests.registry_client.deltamodels import MiB, gguf_like
from tests.registry_client.pullcheck import assert_blobs_honest, cli, finish
from tests.servers import DockerRegistry, running_registry


@pytest.fixture(scope="module")
def registry() -> Iterator[DockerRegistry]:
    with tempfile.TemporaryDirectory(prefix="blobctl-delta-reg-") as d:
        yield from running_registry(Path(d))


@pytest.fixture(scope="module")
def proxy(registry: DockerRegistry) -> Iterator[FaultProxy]:
    with FaultProxy(registry.port) as px:
        yield px


def one_error(r: Result) -> str:
    lines = [x for x in r.err.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in r.err, r.err
    return lines[0]


def json_lines(out: str) -> list[dict[str, object]]:
    return [json.loads(x) for x in out.splitlines() if x.strip()]


def publish(registry: DockerRegistry, pub: Path, repo: str, tag: str, layer: bytes,
            *flags: str) -> dict[str, object]:
    local = f"example.com/pub/{repo.replace('/', '-')}:{tag}"
    add_model(Store(pub), local, [layer])
    r = run("--store", str(pub), "push", local, f"{registry.netloc}/{repo}:{tag}",
            "--insecure", "--json", "-q", *flags)
    assert r.code == 0, r.err
    return json_lines(r.out)[-1]


@pytest.mark.timeout(240)
def test_push_index_update_dry_run_and_update(registry: DockerRegistry, proxy: FaultProxy,
                                              tmp_path: Path) -> None:
    pub, client = tmp_path / "pub", tmp_path / "client"
    v1 = gguf_like(seed=21, n_tensors=24, tensor_size=MiB)
    v2 = gguf_like(seed=21, n_tensors=24, tensor_size=MiB, template="{{ .Prompt }} fixed")
    s1 = publish(registry, pub, "dcli/m", "latest", v1)
    assert s1["index_digest"] and s1["index_blobs"] == 1
    assert int(s1["index_bytes"]) <= 0.001 * len(v1)  # type: ignore[call-overload]
    ref = f"{proxy.netloc}/dcli/m:latest"
    assert run("--store", str(client), "pull", ref, "--insecure", "-q").code == 0
    # the model is re-published: the header grew by a few bytes
    publish(registry, pub, "dcli/m", "latest", v2)
    r = run("--store", str(client), "update", "--dry-run", "--insecure", "--json")
    assert r.code == 0, r.err
    [row] = json.loads(r.out)
    assert row["delta_blobs"] == 1
    assert int(row["bytes_to_fetch"]) <= 0.02 * len(v2)
    assert int(row["bytes_missing"]) >= len(v2)
    r = run("--store", str(client), "update", "--dry-run", "--no-delta", "--insecure",
            "--json")
    assert r.code == 0, r.err
    [row] = json.loads(r.out)
    assert row["delta_blobs"] == 0 and row["bytes_to_fetch"] == row["bytes_missing"]
    r = run("--store", str(client), "update", "--dry-run", "--insecure")
    assert r.code == 0, r.err
    head, line = r.out.splitlines()[:2]
    assert head.split() == ["NAME", "LOCAL", "REMOTE", "CHANGED", "REUSED", "TO", "FETCH"]
    assert line.startswith(f"{proxy.netloc}/dcli/m:latest")
    mark = proxy.mark()
    r = run("--store", str(client), "update", ref, "--insecure", "--json")
    assert r.code == 0, r.err
    proxy.wait_idle()
    summary = json_lines(r.out)[-1]
    assert summary["status"] == "success" and summary["delta_blobs"] == 1
    assert int(summary["bytes_reused"]) >= 0.98 * len(v2)  # type: ignore[call-overload]
    assert int(summary["bytes_fetched"]) <= 0.02 * len(v2)  # type: ignore[call-overload]
    assert proxy.blob_bytes_sent(since=mark) <= 0.02 * len(v2)
    st = Store(client)
    layer = st.get_manifest(ModelName.parse(ref)).layers[0]
    assert st.blob_path(layer.digest).read_bytes() == v2
    # progress says what was reused
    assert any(str(e.get("status", "")).startswith("delta ") for e in json_lines(r.out))


@pytest.mark.timeout(120)
def test_no_index_and_index_command(registry: DockerRegistry, tmp_path: Path) -> None:
    pub = tmp_path / "pub"
    v1 = gguf_like(seed=22, n_tensors=10, tensor_size=MiB)
    s = publish(registry, pub, "dcli/noidx", "v1", v1, "--no-index")
    assert s["index_digest"] is None
    local = "example.com/pub/dcli-noidx:v1"
    r = run("--store", str(pub), "index", local, "--json")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    [layer] = doc["layers"]
    assert layer["size"] == len(v1) and layer["index_bytes"] <= 0.001 * len(v1)
    assert doc["pushed"] is None
    r = run("--store", str(pub), "index", local)
    assert r.code == 0, r.err
    assert r.out.splitlines()[0].split() == ["LAYER", "SIZE", "CHUNKS", "INDEX", "SHARE"]
    assert float(r.out.splitlines()[1].split()[-1].rstrip("%")) <= 0.1
    r = run("--store", str(pub), "index", local, "--push",
            f"{registry.netloc}/dcli/noidx:v1", "--insecure", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["pushed"].startswith("sha256:")
    # to a repository that does not hold the model: a clean not-found error
    r = run("--store", str(pub), "index", local, "--push",
            f"{registry.netloc}/dcli/elsewhere:v1", "--insecure", "--retries", "0")
    assert r.code == 3 and "there first (blobctl push " in r.err
    one_error(r)


@pytest.mark.timeout(120)
def test_index_of_a_model_pulled_from_the_registry_and_a_lying_one(
        registry: DockerRegistry, tmp_path: Path) -> None:
    """``blobctl index`` of a model pulled from a registry (pushed there without an index,
    as skopeo would) attaches the index; a later lying index for v2 costs a refetch (exit
    0, a warning), never a bad blob."""
    from blobstore.digest import Digest
    from registry_client.client import RegistryClient
    from registry_client.delta import chunk_bytes
    from registry_client.delta.artifact import push_index_blobs

    pub, c1, c2 = tmp_path / "pub", tmp_path / "c1", tmp_path / "c2"
    v1 = gguf_like(seed=25, n_tensors=12, tensor_size=MiB)
    v2 = gguf_like(seed=25, n_tensors=12, tensor_size=MiB, changed={2: 90})
    publish(registry, pub, "dcli/remote", "v1", v1, "--no-index")
    ref = f"{registry.netloc}/dcli/remote:v1"
    assert run("--store", str(c1), "pull", ref, "--insecure", "-q").code == 0
    r = run("--store", str(c1), "index", ref, "--push", ref, "--insecure", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["pushed"].startswith("sha256:")
    # v1 in a client; v2 published with the v1 index claimed for it (a lie)
    assert run("--store", str(c2), "pull", ref, "--insecure", "-q").code == 0
    publish(registry, pub, "dcli/remote", "v2", v2, "--no-index")
    m2 = Store(pub).get_manifest(ModelName.parse("example.com/pub/dcli-remote:v2"))
    d2 = Digest.of_bytes(v2)
    idx = chunk_bytes(v1, Digest.of_bytes(v1))
    lying = type(idx)(d2, len(v2), idx.chunker, idx.avg, idx.min, idx.max,
                      list(idx.lengths), idx.hashes)
    with RegistryClient(insecure=True) as client:
        push_index_blobs(client, ModelName.parse(f"{registry.netloc}/dcli/remote:v2"), m2,
                         [(d2, lying.encode())])
    r = run_proc("--store", str(c2), "pull", f"{registry.netloc}/dcli/remote:v2",
                 "--insecure", "--json", timeout=90)
    assert r.code == 0, r.err
    assert "did not verify; fetching it again" in r.err
    summary = json_lines(r.out)[-1]
    # refetched whole: not a delta blob (found from outside: delta_blobs 1, bytes_reused 0)
    assert summary["delta_blobs"] == 0 and summary["bytes_reused"] == 0
    st = Store(c2)
    layer = st.get_manifest(ModelName.parse(f"{registry.netloc}/dcli/remote:v2")).layers[0]
    assert st.blob_path(layer.digest).read_bytes() == v2
    assert_blobs_honest(c2)


@pytest.mark.timeout(60)
def test_index_of_a_model_not_in_the_store_is_not_found_and_pulls_nothing(
        registry: DockerRegistry, proxy: FaultProxy, tmp_path: Path) -> None:
    """``index`` works on the local model (spec/cli.md): one only in a registry is exit 3
    with a hint to pull it, and not a byte is asked of the registry (found from outside:
    it pulled the model, gigabytes for a real one; a made-up name was exit 6, "cannot
    reach registry.ollama.ai")."""
    pub, client = tmp_path / "pub", tmp_path / "client"
    publish(registry, pub, "dcli/only-remote", "v1",
            gguf_like(seed=26, n_tensors=9, tensor_size=MiB), "--no-index")
    ref = f"{proxy.netloc}/dcli/only-remote:v1"
    for args in (("index", ref, "--insecure"), ("index", ref, "--push", ref, "--insecure"),
                 ("index", "nosuch:v1")):
        mark = proxy.mark()
        r = run("--store", str(client), *args)
        assert r.code == 3, r.err
        assert "not found" in one_error(r) and "hint: " in r.err and "pull it first" in r.err
        assert proxy.exchanges()[mark:] == [], args
    assert not client.exists() or Store(client).list_models() == []


@pytest.mark.timeout(90)
def test_index_push_needs_dest_tag_to_hold_this_manifest(registry: DockerRegistry,
                                                        tmp_path: Path) -> None:
    """``index --push DEST:tag`` attaches only when DEST's tag is this manifest (spec/cli.md):
    a tag holding another model of the same repository, or no such tag, is exit 3 and
    nothing is attached (found from outside: both reported success, since only the digest
    was looked up in DEST's repository)."""
    from blobstore.digest import Digest
    from registry_client.client import RegistryClient
    from registry_client.delta.artifact import referrers

    pub = tmp_path / "pub"
    publish(registry, pub, "dcli/two", "a", gguf_like(seed=27, n_tensors=9, tensor_size=MiB),
            "--no-index")
    publish(registry, pub, "dcli/two", "b", gguf_like(seed=28, n_tensors=9, tensor_size=MiB),
            "--no-index")
    local = "example.com/pub/dcli-two:a"
    mine = Store(pub).get_manifest(ModelName.parse(local)).digest
    other = Store(pub).get_manifest(ModelName.parse("example.com/pub/dcli-two:b")).digest
    repo = ModelName.parse(f"{registry.netloc}/dcli/two:a")
    for dest, says in ((f"{registry.netloc}/dcli/two:b", f"holds another manifest "
                                                          f"({other.short})"),
                       (f"{registry.netloc}/dcli/two:nosuch", "not found in the registry")):
        r = run("--store", str(pub), "index", local, "--push", dest, "--insecure",
                "--retries", "0")
        assert r.code == 3, r.err
        assert says in one_error(r) and f"hint: push {local} there first" in r.err
    with RegistryClient(insecure=True) as client:
        for d in (mine, other):
            assert referrers(client, repo, Digest.parse(str(d))) == []
    # the tag that holds it: attached
    r = run("--store", str(pub), "index", local, "--push", str(repo), "--insecure", "--json")
    assert r.code == 0, r.err
    with RegistryClient(insecure=True) as client:
        assert len(referrers(client, repo, mine)) == 1


@pytest.mark.timeout(60)
def test_unknown_base_is_a_clean_error(registry: DockerRegistry, tmp_path: Path) -> None:
    v1 = gguf_like(seed=23, n_tensors=9, tensor_size=MiB)
    publish(registry, tmp_path / "pub", "dcli/b", "v1", v1)
    r = run("--store", str(tmp_path / "c"), "pull", f"{registry.netloc}/dcli/b:v1",
            "--insecure", "--base", "nothere/at-all:v9")
    assert r.code == 3
    assert "nothere" in one_error(r)


@pytest.mark.timeout(120)
def test_delta_from_a_base_emptied_after_indexing_is_no_delta_blob(
        registry: DockerRegistry, tmp_path: Path) -> None:
    """A delta planned from a base whose cached index is fine but whose file is now empty
    reuses nothing: the blob is fetched whole, right, and ``delta_blobs`` is 0 (found from
    outside: 1, with ``bytes_reused`` 0)."""
    pub, client = tmp_path / "pub", tmp_path / "client"
    v1 = gguf_like(seed=30, n_tensors=12, tensor_size=MiB)
    v2 = gguf_like(seed=30, n_tensors=12, tensor_size=MiB, template="{{ .Prompt }} v2")
    publish(registry, pub, "dcli/empty", "v1", v1)
    ref = f"{registry.netloc}/dcli/empty:v1"
    assert run("--store", str(client), "pull", ref, "--insecure", "-q").code == 0
    assert run("--store", str(client), "index", ref).code == 0  # base index cached
    st = Store(client)
    blob = st.blob_path(st.get_manifest(ModelName.parse(ref)).layers[0].digest)
    blob.chmod(0o644)
    blob.write_bytes(b"")
    publish(registry, pub, "dcli/empty", "v2", v2)
    r = run("--store", str(client), "pull", f"{registry.netloc}/dcli/empty:v2", "--insecure",
            "--json", "--base", ref)
    assert r.code == 0, r.err
    summary = json_lines(r.out)[-1]
    assert summary["bytes_reused"] == 0 and summary["delta_blobs"] == 0, summary
    assert int(summary["bytes_fetched"]) >= len(v2)  # type: ignore[call-overload]
    layer = st.get_manifest(ModelName.parse(f"{registry.netloc}/dcli/empty:v2")).layers[0]
    assert st.blob_path(layer.digest).read_bytes() == v2


@pytest.mark.timeout(90)
def test_bad_base_fails_before_any_request(registry: DockerRegistry, proxy: FaultProxy,
                                           tmp_path: Path) -> None:
    """Every ``--base`` is parsed and looked up first, delta or not (spec/cli.md): a bad
    name is exit 4, a model not in the store exit 3, and no request reaches the registry,
    for ``pull`` and ``update`` and for the library's ``pull``/``update`` (found from
    outside: with every blob present, or with --no-delta, the base was never checked and
    the pull was exit 0; else it was checked only after "pulling manifest")."""
    from blobstore.errors import InvalidName, ModelNotFound
    from catalog.updates import update
    from registry_client.pull import PullOptions, pull

    publish(registry, tmp_path / "pub", "dcli/bb", "v1",
            gguf_like(seed=29, n_tensors=9, tensor_size=MiB))
    client = tmp_path / "c"
    ref = f"{proxy.netloc}/dcli/bb:v1"
    assert run("--store", str(client), "pull", ref, "--insecure", "-q").code == 0
    for cmd in (("pull", ref), ("update",), ("update", ref), ("update", "--dry-run")):
        for base, code in (("nosuch:x", 3), ("BAD NAME", 4)):
            for extra in ((), ("--no-delta",)):
                mark = proxy.mark()
                r = run("--store", str(client), *cmd, "--insecure", "--base", base, *extra)
                assert r.code == code, (cmd, base, extra, r.err)
                assert base in one_error(r) and "pulling manifest" not in r.err
                assert proxy.exchanges()[mark:] == [], (cmd, base, extra)
    st = Store(client)
    for base, exc in (("nosuch:x", ModelNotFound), ("BAD NAME", InvalidName)):
        opts = PullOptions(insecure=True, base=(base,), delta=False)
        mark = proxy.mark()
        with pytest.raises(exc):
            pull(ref, store=st, options=opts)
        with pytest.raises(exc):
            update(st, options=opts)
        assert proxy.exchanges()[mark:] == []


@pytest.mark.timeout(240)
def test_killed_delta_update_resumes(registry: DockerRegistry, proxy: FaultProxy,
                                     tmp_path: Path) -> None:
    """SIGKILL while the changed ranges stream in, then a second run: it finishes with
    the right bytes and fetches at most what the first run had not received."""
    pub, client = tmp_path / "pub", tmp_path / "client"
    v1 = gguf_like(seed=24, n_tensors=32, tensor_size=MiB)
    v2 = gguf_like(seed=24, n_tensors=32, tensor_size=MiB, changed={5: 70, 20: 71})
    publish(registry, pub, "dcli/kill", "v1", v1)
    ref = f"{proxy.netloc}/dcli/kill:v1"
    assert run("--store", str(client), "pull", ref, "--insecure", "-q").code == 0
    publish(registry, pub, "dcli/kill", "v1", v2)
    changed = 2 * MiB
    proxy.set_faults(rate=512 * 1024)  # per connection: the delta takes a few seconds
    mark = proxy.mark()
    proc = cli("--store", str(client), "update", ref, "--insecure", "--connections", "2",
               "--chunk-size", "256K", "--json")

    def kill() -> None:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    proxy.on_blob_bytes(changed // 2, kill, match="/v2/dcli/kill/blobs/")
    code, _out, err = finish(proc, 120, "delta update to be killed")
    proxy.set_faults()
    assert code == -signal.SIGKILL, err
    proxy.wait_idle()
    first = proxy.blob_bytes_sent(since=mark)
    assert_blobs_honest(client)
    assert Store(client).get_manifest(ModelName.parse(ref)).layers[0].size == len(v1)
    mark = proxy.mark()
    r = run("--store", str(client), "update", ref, "--insecure", "--json",
            "--chunk-size", "256K")
    assert r.code == 0, r.err
    proxy.wait_idle()
    second = proxy.blob_bytes_sent(since=mark)
    summary = json_lines(r.out)[-1]
    assert summary["delta_blobs"] == 1 and int(summary["bytes_resumed"]) > 0  # type: ignore[call-overload]
    st = Store(client)
    assert st.blob_path(st.get_manifest(ModelName.parse(ref)).layers[0].digest
                        ).read_bytes() == v2
    assert_blobs_honest(client)
    # the resumed run fetched only what the first had not (a range in flight may repeat)
    print(f"killed run got {first} bytes, resumed run {second}")
    assert second <= changed + 512 * 1024 - first // 4, (first, second)
    assert first + second <= 0.07 * len(v2) + 1024 * 1024
