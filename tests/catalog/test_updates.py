"""`blobctl outdated` / `update` against the real CNCF distribution registry."""

from __future__ import annotations

import json
import os
from pathlib import Path

from blobstore.store import Store
from tests.blobstore.gcutil import add_model
from tests.cli.clirun import run, run_proc
from tests.servers import DOCKER_MANIFEST, DockerRegistry, Fault, FaultServer, sha

OCI_INDEX = "application/vnd.oci.image.index.v1+json"

MODEL = "application/vnd.ollama.image.model"
PARAMS = "application/vnd.ollama.image.params"
MiB = 1 << 20


def test_outdated_then_update_transfers_only_changed_layers(registry: DockerRegistry,
                                                            tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    weights = os.urandom(2 * MiB)
    config = b'{"model_format":"gguf","model_family":"llama"}'
    v1 = registry.push("upd/m", "1", config, [(MODEL, weights), (PARAMS, b'{"top_k":1}')])
    registry.push("upd/same", "1", config, [(MODEL, weights)])
    ref = f"{registry.netloc}/upd/m:1"
    for r in (ref, f"{registry.netloc}/upd/same:1"):
        p = run_proc("pull", r, "--insecure", "--quiet", "--store", store)
        assert p.code == 0, p.err

    r = run("outdated", "--insecure", "--json", "--store", store)
    assert r.code == 0, r.err
    assert r.json() == []
    assert run("outdated", "--insecure", "--store", store).err.startswith(
        "all 2 checked models are up to date")

    v2 = registry.push("upd/m", "1", config, [(MODEL, weights), (PARAMS, b'{"top_k":40}')])
    r = run("outdated", "--insecure", "--json", "--store", store)
    assert r.code == 0, r.err
    assert r.json() == [{"name": ref, "local_digest": sha(v1), "remote_digest": sha(v2)}]
    table = run("outdated", "--insecure", "--store", store)
    assert table.out.splitlines()[0].split() == ["NAME", "LOCAL", "REMOTE"]

    r = run_proc("update", "--insecure", "--json", "--store", store)
    assert r.code == 0, r.err
    summary = json.loads(r.out.splitlines()[-1])
    assert summary["digest"] == sha(v2)
    assert summary["blobs_present"] == 2 and summary["blobs_fetched"] == 1   # config + weights kept
    assert summary["bytes_fetched"] == len(b'{"top_k":40}')
    assert run("outdated", "--insecure", "--json", "--store", store).json() == []
    assert run("update", "--insecure", "--store", store).err.startswith(
        "all 2 checked models are up to date")


def test_outdated_problems_and_unknown_ref(registry: DockerRegistry, tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    registry.push("upd/gone", "1", b"{}", [(MODEL, b"w" * 100)])
    assert run_proc("pull", f"{registry.netloc}/upd/gone:1", "--insecure", "--quiet",
                    "--store", store).code == 0
    # the same model under a tag the registry does not have
    (tmp_path / "s" / "manifests" / registry.netloc / "upd" / "gone" / "2").write_bytes(
        (tmp_path / "s" / "manifests" / registry.netloc / "upd" / "gone" / "1").read_bytes())
    r = run("outdated", "--insecure", "--json", "--store", store)
    assert r.code == 0 and r.json() == []
    assert f"warning: {registry.netloc}/upd/gone:2: not in its registry" in r.err
    r = run("outdated", "nope:1", "--store", store)
    assert r.code == 3 and r.err.startswith("error: model 'nope:1' not found")
    r = run("update", "nope:1", "--store", store)
    assert r.code == 3 and r.err.startswith("error: model 'nope:1' not found")
    # https to a plain-http registry: no model could be checked. Every one is reported,
    # then the first failure's exit code (found from outside: exit 0 and "all checked
    # models are up to date" with the registry down, and nothing at all with --json)
    r = run("outdated", "--retries", "0", "--store", store)
    assert r.code == 6 and r.err.count("warning: ") == 2, r.err
    errors = [x for x in r.err.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(
        "error: 2 models could not be checked"), r.err
    assert "up to date" not in r.err, r.err  # (not "all 0 checked models are up to date")
    assert "no model could be checked (2 failed)" in r.err
    r = run("update", "--retries", "0", "--json", "--store", store)
    assert r.code == 6, r.err
    summary = r.json()
    assert (summary["status"], summary["checked"], sorted(summary["failed"])) == (
        "not all checked", 0, [f"{registry.netloc}/upd/gone:1", f"{registry.netloc}/upd/gone:2"])
    r = run("update", "--insecure", "--json", "--store", store)  # gone:2 is only a warning
    assert r.code == 0 and r.json()["status"] == "nothing to pull", r.err


def test_summary_when_the_only_model_is_gone_from_its_registry(registry: DockerRegistry,
                                                               tmp_path: Path) -> None:
    """Found from outside: the only model's tag gone upstream (warned) and then "all 0
    checked models are up to date" from outdated and update."""
    store = str(tmp_path / "s")
    registry.push("upd/only", "1", b"{}", [(MODEL, b"o" * 100)])
    assert run_proc("pull", f"{registry.netloc}/upd/only:1", "--insecure", "--quiet",
                    "--store", store).code == 0
    folder = tmp_path / "s" / "manifests" / registry.netloc / "upd" / "only"
    (folder / "1").rename(folder / "9")  # a tag the registry does not have
    for cmd in (("outdated",), ("update",), ("update", "--dry-run")):
        r = run(*cmd, "--insecure", "--store", store)
        assert r.code == 0, r.err
        assert "0 checked" not in r.err and "all " not in r.err, r.err
        assert "0 of 1 model up to date; 1 not in the registry" in r.err, r.err
    # --json of update with nothing to pull said "up to date" too (found by a fix helper)
    r = run("update", "--insecure", "--json", "--store", store)
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["status"] == "nothing to pull", doc
    assert doc["gone"] == [f"{registry.netloc}/upd/only:9"], doc
    assert doc["summary"] == "0 of 1 model up to date; 1 not in the registry", doc


def _platform_index(srv: FaultServer, repo: str, tag: str, raw: bytes) -> None:
    import platform

    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": DOCKER_MANIFEST, "digest": sha(raw), "size": len(raw),
         "platform": {"os": "linux", "architecture": arch}}]}).encode()
    srv.manifests[(repo, tag)] = (index, OCI_INDEX)


def test_outdated_resolves_an_index_and_survives_a_refused_head(tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    with FaultServer() as srv:
        raw = srv.add_model("multi/m", "1", b"{}", [(MODEL, b"w" * 1000)])
        _platform_index(srv, "multi/m", "1", raw)
        ref = f"{srv.netloc}/multi/m:1"
        assert run_proc("pull", ref, "--insecure", "--quiet", "--store", store).code == 0
        # HEAD names the index, not the platform manifest the store keeps: not a change
        r = run("outdated", "--insecure", "--json", "--store", store)
        assert r.code == 0 and r.json() == [], r.err
        new = srv.add_model("multi/m", "2", b"{}", [(MODEL, b"v" * 1000)])
        _platform_index(srv, "multi/m", "1", new)
        srv.faults.append(Fault("head", match="/manifests/", status=405, times=100))
        r = run("outdated", "--insecure", "--json", "--retries", "0", "--store", store)
        assert r.code == 0, r.err
        assert r.json() == [{"name": ref, "local_digest": sha(raw), "remote_digest": sha(new)}]
        r = run("update", ref, "--insecure", "--quiet", "--retries", "0", "--store", store)
        assert r.code == 0, r.err
        assert run("show", ref, "--json", "--store", store).json()["digest"] == sha(new)


def test_an_index_naming_a_deleted_manifest_is_a_failed_check_not_a_gone_tag(
        tmp_path: Path) -> None:
    """The tag is there; its index names a platform manifest the registry lost (the
    tester's repro_dangling_index.sh). outdated/update: a failed check (exit 6, so cron
    notices), never "not in its registry"; pull names the missing manifest, not the tag."""
    store = str(tmp_path / "s")
    with FaultServer() as srv:
        raw = srv.add_model("dang/m", "1", b"{}", [(MODEL, b"w" * 1000)])
        _platform_index(srv, "dang/m", "latest", raw)
        ref = f"{srv.netloc}/dang/m:latest"
        assert run_proc("pull", ref, "--insecure", "--quiet", "--store", store).code == 0
        new = srv.add_model("dang/m", "2", b"{}", [(MODEL, b"v" * 1000)])
        _platform_index(srv, "dang/m", "latest", new)
        del srv.manifests[("dang/m", sha(new))]  # the child manifest is deleted
        r = run("outdated", "--insecure", "--retries", "0", "--store", store)
        assert r.code == 6, r.err
        assert "not in its registry" not in r.err and sha(new) in r.err, r.err
        r = run("update", "--insecure", "--json", "--retries", "0", "--store", store)
        assert r.code == 6, r.err
        assert "gone" not in r.out or json.loads(r.out).get("gone") == [], r.out
        r = run("pull", ref, "--insecure", "--quiet", "--retries", "0", "--store", store)
        assert r.code == 6, r.err
        errors = [x for x in r.err.splitlines() if x.startswith("error: ")]
        assert len(errors) == 1 and sha(new) in errors[0], r.err


def test_a_registry_that_cannot_be_reached_is_asked_once_per_model(tmp_path: Path) -> None:
    """Found from outside: with the registry's port refused, outdated retried the HEAD,
    then tried a GET and retried that too: two "retry 1/1" lines and twice the wait per
    model. No answer at all is no reason to ask with another method."""
    from tests.servers import free_port

    store = Store(tmp_path / "s")
    netloc = f"127.0.0.1:{free_port()}"  # (nothing listens there)
    for i in range(3):
        add_model(store, f"{netloc}/ns/m{i}:1", [bytes([i]) * 100])
    r = run_proc("outdated", "--store", str(store.root))
    assert r.code == 6, r.err
    retries = [x for x in r.err.splitlines() if x.startswith("warning: retry")]
    assert len(retries) == 3, r.err  # one per model (a registry not reached: one retry)
