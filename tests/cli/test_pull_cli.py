"""`blobctl pull` through a real process: output modes and one-line errors with exit codes."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from blobstore.digest import Digest
from blobstore.store import Store
from tests.cli.clirun import run_proc
from tests.servers import Fault, FaultServer, free_port, sha

MODEL = "application/vnd.ollama.image.model"
MiB = 1 << 20


def one_error_line(r: object) -> str:
    """Progress may precede it on stderr, but there is exactly one error line."""
    err = r.err  # type: ignore[attr-defined]
    errors = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    return errors[0]


@pytest.fixture
def srv() -> Iterator[FaultServer]:
    with FaultServer() as s:
        s.add_model("library/m", "1", b'{"model_format":"gguf"}',
                    [(MODEL, os.urandom(3 * MiB)), ("application/vnd.ollama.image.params",
                                                    b'{"temperature":0.1}')])
        yield s


def pull(srv: FaultServer, store: Path, *extra: str, ref: str = "library/m:1") -> object:
    return run_proc("pull", f"{srv.netloc}/{ref}", "--insecure", "--retries", "2",
                    "--store", str(store), *extra)


def test_json_lines_and_summary(srv: FaultServer, tmp_path: Path) -> None:
    r = pull(srv, tmp_path / "s", "--json")
    assert r.code == 0, r.err  # type: ignore[attr-defined]
    lines = [json.loads(x) for x in r.out.splitlines()]  # type: ignore[attr-defined]
    assert lines[0] == {"status": "pulling manifest"}
    layer = [x for x in lines if x.get("digest") and x.get("total") == 3 * MiB]
    assert layer and layer[-1]["completed"] == 3 * MiB
    assert {"status", "digest", "total", "completed"} <= set(layer[-1])
    summary = lines[-1]
    assert summary["status"] == "success" and summary["blobs_fetched"] == 3
    assert summary["name"] == f"{srv.netloc}/library/m:1"
    listed = run_proc("list", "--json", "--store", str(tmp_path / "s")).json()
    assert listed[0]["digest"] == summary["digest"]


def test_plain_progress_lines_when_not_a_tty(srv: FaultServer, tmp_path: Path) -> None:
    r = pull(srv, tmp_path / "s")
    assert r.code == 0  # type: ignore[attr-defined]
    assert "pulling manifest" in r.err and "success" in r.err  # type: ignore[attr-defined]
    assert "100.0%" in r.err  # type: ignore[attr-defined]
    assert "█" not in r.err and "▕" not in r.err  # type: ignore[attr-defined]  # (a log)
    q = pull(srv, tmp_path / "s2", "--quiet")
    assert q.code == 0 and q.err == "" and q.out == ""  # type: ignore[attr-defined]


@pytest.mark.parametrize(("setup", "code", "text"), [
    (lambda s: None, 3, "not found"),
    (lambda s: s.faults.append(Fault("corrupt", after=10, times=10**6)), 5, "digest mismatch"),
    (lambda s: s.faults.append(Fault("reset", after=0, times=10**6)), 6, "failed"),
    (lambda s: s.faults.append(Fault("status", match="/manifests/", status=503,
                                     retry_after="0", times=10**6)), 6, "503"),
])
def test_failures_are_one_line_with_exit_code(srv: FaultServer, tmp_path: Path, setup: object,
                                              code: int, text: str) -> None:
    setup(srv)  # type: ignore[operator]
    ref = "library/nope:1" if code == 3 else "library/m:1"
    r = pull(srv, tmp_path / "s", ref=ref)
    assert r.code == code, r.err  # type: ignore[attr-defined]
    assert text in one_error_line(r)  # type: ignore[arg-type]
    store = Store(tmp_path / "s")
    assert store.list_models() == [] and store.verify().ok


def test_auth_required_exit_7(tmp_path: Path) -> None:
    with FaultServer(token="t", basic=("u", "p")) as s:
        s.add_model("library/m", "1", b"{}", [(MODEL, b"GGUF")])
        r = pull(s, tmp_path / "s")
    assert r.code == 7  # type: ignore[attr-defined]
    assert one_error_line(r)  # type: ignore[arg-type]
    assert "hint:" in r.err  # type: ignore[attr-defined]


def test_bad_name_and_unreachable_registry(tmp_path: Path) -> None:
    r = run_proc("pull", "bad name", "--store", str(tmp_path / "s"))
    assert r.code == 4
    port = free_port()
    r = run_proc("pull", f"127.0.0.1:{port}/library/m:1", "--insecure", "--retries", "1",
                 "--store", str(tmp_path / "s"))
    assert r.code == 6 and "ConnectError" in one_error_line(r)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_not_enough_space_is_checked_first(srv: FaultServer, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "2m") as mnt:
        r = pull(srv, mnt / "s")
        assert r.code == 8  # type: ignore[attr-defined]
        line = one_error_line(r)  # type: ignore[arg-type]
        assert "not enough disk space" in line and "need" in line
        assert srv.blob_bytes_sent() == 0  # refused before downloading anything


def test_disk_filled_between_runs_keeps_the_resumable_ingest(tmp_path: Path) -> None:
    big = os.urandom(6 * MiB)
    with FaultServer() as s, tmpfs(tmp_path / "small", "10m") as mnt:
        s.add_model("library/two", "1", b'{"model_format":"gguf"}',
                    [(MODEL, big), ("application/vnd.ollama.image.projector", b"P" * MiB)])
        store_dir = mnt / "s"
        # the big blob was half downloaded by an earlier, interrupted pull
        d = Digest.parse(sha(big))
        ingest = store_dir / ".blobctl" / "ingest" / d.filename
        ingest.mkdir(parents=True)
        with open(ingest / "data", "wb") as f:
            f.write(big[:3 * MiB])
            f.truncate(len(big))
        chunk = 3 * MiB
        (ingest / "state.json").write_text(json.dumps(
            {"digest": str(d), "size": len(big), "chunk_size": chunk, "done": [[0, chunk]]}))
        # then something else filled the disk
        filler = mnt / "filler"
        with open(filler, "wb") as f:
            f.write(b"\0" * (3 * MiB + 512 * 1024))
        r = pull(s, store_dir, ref="library/two:1")
        assert r.code == 8, r.err  # type: ignore[attr-defined]
        assert "not enough disk space" in one_error_line(r)  # type: ignore[arg-type]
        assert (ingest / "data").exists() and (ingest / "state.json").exists()
        filler.unlink()
        sent = s.blob_bytes_sent()
        r = pull(s, store_dir, "--json", ref="library/two:1")
        assert r.code == 0, r.err  # type: ignore[attr-defined]
        summary = json.loads(r.out.splitlines()[-1])  # type: ignore[attr-defined]
        # the earlier chunk at least; the failed run may have added some before ENOSPC, or
        # all of it (the writes run side by side: another one may be the first to fail)
        assert chunk <= summary["bytes_resumed"] <= len(big)
        assert s.blob_bytes_sent() - sent < len(big) + 2 * MiB  # not the whole thing again
        assert Store(store_dir).blob_path(d).read_bytes() == big


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args", [
    ("hf.co/u/r", "--file", "m.gguf", "--base", "x:1"),
    ("u/r:1", "--revision", "dev"),
    ("u/r:1", "--revision", "main"),  # the default's value, given: judged all the same
])
def test_options_that_do_not_apply_are_usage_errors(tmp_path: Path,
                                                    args: tuple[str, ...]) -> None:
    """`pull --file` took `--base` without using or checking it, and `--revision` without
    `--file` was ignored: a usage error (exit 2) before anything is asked of a server.
    Found from outside: an explicit `--revision main` was let through."""
    r = run_proc("pull", *args, "--store", str(tmp_path / "s"))
    assert r.code == 2, r.err
    assert "applies only with --file" in r.err or "does not apply to --file" in r.err
    assert not (tmp_path / "s").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("alg", ["sha512", "sha256"])
def test_pull_of_non_sha256_blobs_warns_about_ollamas_prune(tmp_path: Path, alg: str) -> None:
    """Ollama's startup prune (server/images.go PruneLayers) deletes every ``blobs/`` name
    that is not ``sha256-<hex>`` (an hour old, unless OLLAMA_NOPRUNE): found from outside,
    a valid OCI pull with sha512 digests succeeded without a word, and an Ollama sharing
    the folder then deleted its blobs. One warning line names the risk and the setting."""
    import hashlib

    def digest(b: bytes) -> str:
        return f"{alg}:{hashlib.new(alg, b).hexdigest()}"

    weights, cfg = b"GGUF" + os.urandom(4096), b'{"model_format":"gguf"}'
    with FaultServer() as s:
        s.blobs[digest(weights)], s.blobs[digest(cfg)] = weights, cfg
        doc = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
               "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                          "digest": digest(cfg), "size": len(cfg)},
               "layers": [{"mediaType": MODEL, "digest": digest(weights),
                           "size": len(weights)}]}
        s.manifests[("team/m", "v1")] = (json.dumps(doc).encode(),
                                         "application/vnd.oci.image.manifest.v1+json")
        r = pull(s, tmp_path / "s", ref="team/m:v1")
    assert r.code == 0, r.err  # type: ignore[attr-defined]
    warnings = [x for x in r.err.splitlines()  # type: ignore[attr-defined]
                if x.startswith("warning: ") and "OLLAMA_NOPRUNE" in x]
    if alg == "sha256":
        assert not warnings, r.err  # type: ignore[attr-defined]
        return
    assert len(warnings) == 1, r.err  # type: ignore[attr-defined]
    assert "team/m:v1" in warnings[0] and "sha512" in warnings[0]
    assert (tmp_path / "s" / "blobs" / digest(weights).replace(":", "-")).is_file()
