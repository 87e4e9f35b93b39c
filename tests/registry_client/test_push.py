"""push() against the real CNCF distribution registry, skopeo, a counting proxy and a
registry that refuses Ollama's media types (spec/push.md)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as hs

from blobstore.errors import StoreDamaged
from blobstore.name import ModelName
from blobstore.store import Store
from registry_client.errors import AuthError, UnsupportedManifest
from registry_client.push import PushOptions, parse_destination, push
from tests.blobstore.archutil import add_model, rand
from tests.cli.clirun import ROOT, Result, run, run_proc
from tests.registry_client.proxy import CountingProxy, RefusingRegistry
from tests.servers import DockerRegistry

MiB = 1 << 20
FAST = PushOptions(insecure=True, chunk_size=1 * MiB)


def one_error_line(r: Result) -> str:
    errors = [x for x in r.err.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1, r.err
    assert "Traceback" not in r.err
    return errors[0]


def skopeo_raw(ref: str, *extra: str) -> bytes:
    p = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", *extra,
                        f"docker://{ref}"], capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


@pytest.fixture
def st(tmp_path: Path) -> Store:
    return Store(tmp_path / "s")


def test_destination_tag_defaults_to_the_source_tag() -> None:
    src = ModelName.parse("hf.co/a/b:Q4_K_M")
    assert str(parse_destination("h:5000/pushtest/b", src)) == "h:5000/pushtest/b:Q4_K_M"
    assert str(parse_destination("h:5000/pushtest/b:x", src)) == "h:5000/pushtest/b:x"


def test_push_to_an_upper_case_repository_is_refused_up_front(st: Store) -> None:
    """OCI repository names are lower case; docker-registry answers an upper-case one with
    a bare 404, which read as "upload of blob … not found" with a hint about hf.co names
    (found from outside). Refused before any request (nobody listens at the port)."""
    add_model(st, "team/m:v1", [rand(100)])
    r = run("--store", str(st.root), "push", "team/m:v1", "127.0.0.1:9/team/MyModel:v1",
            "--insecure")
    assert r.code == 4, r.err
    assert r.err.splitlines() == [
        "error: cannot push to 127.0.0.1:9/team/MyModel:v1: OCI repository names are "
        "lower case", "hint: push to 127.0.0.1:9/team/mymodel:v1"]
    # a name shown without its default host and namespace gets the right hint too
    r = run("--store", str(st.root), "push", "team/m:v1", "Foo:1")
    assert r.code == 4 and r.err.splitlines()[1] == "hint: push to foo:1", r.err


@given(repo=hs.from_regex(r"[a-z0-9._-]{1,12}/[a-z0-9._-]{1,12}", fullmatch=True))
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_push_to_a_name_outside_the_oci_grammar_is_refused_up_front(
        st: Store, repo: str) -> None:
    """Ollama's names allow what OCI repository names do not (a part that starts or ends
    with '.', '_' or '-', three underscores): distribution answers those with a bare 404
    too (found from outside). Refused before any request (nobody listens at the port);
    a name the grammar allows gets past the check (and then fails to connect, exit 6)."""
    import re

    if not st.has_model(ModelName.parse("team/m:v1")):
        add_model(st, "team/m:v1", [rand(100)])
    part = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
    ok = re.fullmatch(rf"{part}/{part}", repo) is not None
    try:
        ModelName.parse(f"127.0.0.1:9/{repo}:v1")
    except Exception:
        return  # not even an Ollama name: refused as one (exit 4) elsewhere
    r = run("--store", str(st.root), "push", "team/m:v1", f"127.0.0.1:9/{repo}:v1",
            "--insecure", "--retries", "0")
    if ok:
        assert r.code == 6, r.err
    else:
        assert r.code == 4 and "is not an OCI repository name" in r.err, r.err


def test_push_oci_model_skopeo_sees_the_same_bytes_and_blobs(
        registry: DockerRegistry, st: Store, tmp_path: Path) -> None:
    assert shutil.which("skopeo")
    m = add_model(st, "example.com/ns/oci:v1", [rand(3 * MiB + 7), b"tmpl"])
    events: list[dict[str, object]] = []
    r = push("example.com/ns/oci:v1", f"{registry.netloc}/pushtest/oci", store=st,
             progress=events.append, options=FAST)
    assert r.blobs_uploaded == 3 and r.bytes_uploaded == m.size
    assert events[-2:] == [{"status": "pushing manifest"}, {"status": "success"}]
    assert skopeo_raw(f"{registry.netloc}/pushtest/oci:v1") == m.raw
    p = subprocess.run(["skopeo", "copy", "--src-tls-verify=false",
                        f"docker://{registry.netloc}/pushtest/oci:v1", f"oci:{tmp_path / 'lay'}"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    for d in m.descriptors:
        assert (tmp_path / "lay/blobs/sha256" / d.digest.hex).read_bytes() == \
            st.blob_path(d.digest).read_bytes()
    t0 = time.monotonic()
    again = push("example.com/ns/oci:v1", f"{registry.netloc}/pushtest/oci", store=st,
                 options=FAST)
    assert time.monotonic() - t0 < 1.0
    assert again.blobs_present == 3 and again.bytes_uploaded == 0


def test_push_ollama_docker_v2_model_and_mount_within_the_registry(
        registry: DockerRegistry, st: Store) -> None:
    m = add_model(st, f"{registry.netloc}/lib/llm:q4", [rand(2 * MiB)], oci=False)
    r = push(f"{registry.netloc}/lib/llm:q4", f"{registry.netloc}/lib/llm", store=st,
             options=FAST)
    assert r.blobs_uploaded == 2
    assert skopeo_raw(f"{registry.netloc}/lib/llm:q4") == m.raw
    # the same model to another repository of the same registry: mounted, not sent
    r = push(f"{registry.netloc}/lib/llm:q4", f"{registry.netloc}/other/llm:q4", store=st,
             options=FAST)
    assert r.blobs_mounted == 2 and r.bytes_uploaded == 0
    assert skopeo_raw(f"{registry.netloc}/other/llm:q4") == m.raw


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerRegistry]:
    if not DockerRegistry.available() or not shutil.which("htpasswd"):
        if os.environ.get("CI"):
            pytest.fail("docker-registry and htpasswd (apache2-utils) are needed")
        pytest.skip("docker-registry or htpasswd missing")
    root = tmp_path_factory.mktemp("authreg")
    line = subprocess.run(["htpasswd", "-Bbn", "alice", "s3cret"], capture_output=True,
                          text=True, check=True).stdout.strip()
    (root / "htpasswd").write_text(line + "\n")
    reg = DockerRegistry(root, htpasswd=root / "htpasswd").start()
    try:
        yield reg
    finally:
        reg.stop()


def _docker_config(tmp_path: Path, netloc: str, password: str) -> Path:
    folder = tmp_path / "docker"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(
        {"auths": {netloc: {"username": "alice", "password": password}}}))
    return folder


def test_push_with_basic_auth(auth_registry: DockerRegistry, st: Store, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    m = add_model(st, "example.com/ns/a:1", [rand(3 * MiB)])
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "none"))
    with pytest.raises(AuthError, match="authentication required"):
        push("example.com/ns/a:1", f"{auth_registry.netloc}/pushtest/a", store=st, options=FAST)
    monkeypatch.setenv("DOCKER_CONFIG",
                       str(_docker_config(tmp_path, auth_registry.netloc, "s3cret")))
    r = push("example.com/ns/a:1", f"{auth_registry.netloc}/pushtest/a", store=st, options=FAST)
    assert r.blobs_uploaded == 2
    assert skopeo_raw(f"{auth_registry.netloc}/pushtest/a:1", "--creds", "alice:s3cret") == m.raw
    # the CLI: wrong password, one error line, exit 7
    cfg = _docker_config(tmp_path, auth_registry.netloc, "wrong")
    r2 = run("push", "example.com/ns/a:1", f"{auth_registry.netloc}/pushtest/b", "--insecure",
             "--retries", "0", "--store", str(st.root), env={"DOCKER_CONFIG": str(cfg)})
    assert r2.code == 7
    assert one_error_line(r2).startswith("error: ") and "hint: " in r2.err


def test_registry_refusing_ollama_media_types_names_them(st: Store) -> None:
    reg = RefusingRegistry().start()
    try:
        add_model(st, "example.com/ns/m:1", [rand(1000)])
        with pytest.raises(UnsupportedManifest) as ei:
            push("example.com/ns/m:1", f"{reg.netloc}/pushtest/m", store=st,
                 options=PushOptions(insecure=True))
        assert "application/vnd.ollama.image.model" in ei.value.message
        r = run("push", "example.com/ns/m:1", f"{reg.netloc}/pushtest/m", "--insecure",
                "--store", str(st.root))
        assert r.code == 6
        line = one_error_line(r)
        assert line.startswith(f"error: {reg.netloc} refused the manifest of "
                               "example.com/ns/m:1 (media types application/vnd.oci.image."
                               "manifest.v1+json, application/vnd.ollama.image.model)")
        assert "hint: this registry does not accept these media types" in r.err
    finally:
        reg.stop()


def test_push_cli_json_and_errors(registry: DockerRegistry, st: Store) -> None:
    add_model(st, "example.com/ns/c:1", [rand(2 * MiB)])
    s = str(st.root)
    r = run_proc("push", "example.com/ns/c:1", f"{registry.netloc}/pushtest/c", "--insecure",
                 "--chunk-size", "1M", "--json", "--store", s)
    assert r.code == 0, r.err
    lines = [json.loads(x) for x in r.out.splitlines()]
    assert any(str(x.get("status", "")).startswith("pushing ") and x.get("total")
               for x in lines)
    assert lines[-1]["status"] == "success" and lines[-1]["blobs_uploaded"] == 2
    assert lines[-1]["destination"] == f"{registry.netloc}/pushtest/c:1"
    r = run("push", "nope:1", f"{registry.netloc}/pushtest/c", "--store", s)
    assert r.code == 3 and one_error_line(r) == "error: model 'nope:1' not found"
    r = run("push", "example.com/ns/c:1", "bad name", "--store", s)
    assert r.code == 4 and "character ' ' is not allowed" in one_error_line(r)
    r = run("push", "example.com/ns/c:1", "127.0.0.1:1/pushtest/c", "--insecure", "--retries",
            "0", "--store", s)
    assert r.code == 6 and "ConnectError" in one_error_line(r)


def test_push_killed_mid_blob_resumes_without_resending(registry: DockerRegistry,
                                                         st: Store) -> None:
    """Killed while the 4th 1 MiB chunk was on its way to the proxy (which forwards only
    complete bodies, so the registry holds exactly 3 chunks): the next push sends only the
    rest, counted at the proxy."""
    size = 8 * MiB
    m = add_model(st, "example.com/ns/big:1", [rand(size)])
    layer = m.layers[0].digest
    proxy = CountingProxy(registry.url, rate=4 * MiB, signal_patch=4).start()
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        args = [sys.executable, "-m", "cli", "push", "example.com/ns/big:1",
                f"{proxy.netloc}/pushtest/big", "--insecure", "--chunk-size", "1M", "--quiet",
                "--store", str(st.root)]
        proc = subprocess.Popen(args, env=env, cwd=ROOT, stderr=subprocess.PIPE)
        try:
            assert proxy.patch_started.wait(60), "the 4th chunk never started"
            time.sleep(0.1)  # part of the 4th chunk is on its way (the proxy reads slowly)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(30)
        state = list((st.root / ".blobctl/push").glob("*.json"))
        assert len(state) == 1 and json.loads(state[0].read_text())["offset"] == 3 * MiB
        before = proxy.body_bytes
        assert before == 3 * MiB + len(st.blob_path(m.config.digest).read_bytes())
        proxy.rate = 0
        # --no-index: the chunk index (spec/delta.md) would add bodies of its own here
        r = run_proc("push", "example.com/ns/big:1", f"{proxy.netloc}/pushtest/big", "--insecure",
                     "--chunk-size", "1M", "--json", "--no-index", "--store", str(st.root))
        assert r.code == 0, r.err
        summary = json.loads(r.out.splitlines()[-1])
        assert summary["bytes_resumed"] == 3 * MiB
        assert summary["bytes_uploaded"] == size - 3 * MiB
        sent = proxy.body_bytes - before
        assert sent == size - 3 * MiB + len(m.raw)  # the rest of the layer + the manifest
        assert not list((st.root / ".blobctl/push").glob("*.json"))
        assert skopeo_raw(f"{registry.netloc}/pushtest/big:1") == m.raw
        p = subprocess.run(["skopeo", "inspect", "--tls-verify=false",
                            f"docker://{registry.netloc}/pushtest/big:1"], capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert str(layer) in p.stdout
    finally:
        proxy.stop()


class _Kill(Exception):
    """Stands for the process dying at a chosen byte of an upload."""


_runs = iter(range(10**6))


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kill_at=hs.integers(1, 5 * MiB + 5000), chunk=hs.sampled_from([256 << 10, 1 * MiB]))
def test_interrupted_push_at_any_byte_then_push_again_gives_the_store_bytes(
        registry: DockerRegistry, tmp_path_factory: pytest.TempPathFactory, kill_at: int,
        chunk: int) -> None:
    """Stopped at any byte (an exception from the progress callback aborts the request
    mid-body): the next push completes with the store's bytes and never sends more than the
    model. (distribution cancels an upload whose chunk was cut mid-body, so these restart
    the blob: spec/push.md, "Resume".)"""
    store = Store(tmp_path_factory.mktemp("kp"))
    m = add_model(store, "example.com/ns/k:1", [rand(5 * MiB), rand(5000)])
    dest = f"{registry.netloc}/kill/r{next(_runs)}"
    done: dict[str, int] = {}

    def killer(ev: dict[str, object]) -> None:
        if isinstance(ev.get("completed"), int):
            done[str(ev["digest"])] = int(ev["completed"])  # type: ignore[call-overload]
            if sum(done.values()) >= kill_at:
                raise _Kill

    opts = PushOptions(insecure=True, chunk_size=chunk)
    first_done = False
    try:
        push("example.com/ns/k:1", dest, store=store, progress=killer, options=opts)
        first_done = True
    except _Kill:
        pass
    r = push("example.com/ns/k:1", dest, store=store, options=opts)
    assert skopeo_raw(f"{dest}:1") == m.raw
    event("resumed" if r.bytes_resumed else "done" if first_done else "not resumed")
    if first_done:
        assert r.bytes_uploaded == 0
    # never more than the whole model again; a resumed blob sends only its rest
    assert r.bytes_uploaded + r.bytes_resumed <= m.size
    assert not list((store.root / ".blobctl/push").glob("*.json"))


def test_push_with_a_bearer_token_service(registry: DockerRegistry, st: Store) -> None:
    """A token realm in front of the registry: push asks it for pull,push scope."""
    m = add_model(st, "example.com/ns/tok:1", [rand(3 * MiB)])
    proxy = CountingProxy(registry.url, token="t0k3n").start()
    try:
        r = push("example.com/ns/tok:1", f"{proxy.netloc}/pushtest/tok", store=st, options=FAST)
        assert r.blobs_uploaded == 2
        assert proxy.token_scopes and set(proxy.token_scopes) == {
            "repository:pushtest/tok:pull,push"}
        assert skopeo_raw(f"{registry.netloc}/pushtest/tok:1") == m.raw
    finally:
        proxy.stop()


@pytest.mark.timeout(300)
@settings(max_examples=7, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=hs.sampled_from(["PATCH", "PUT"]), nth=hs.integers(1, 4),
       twice=hs.booleans())
def test_a_response_lost_after_the_registry_applied_it_is_recovered(
        registry: DockerRegistry, tmp_path_factory: pytest.TempPathFactory, method: str,
        nth: int, twice: bool) -> None:
    """Found from outside: the answer to an upload PATCH or the final PUT lost after
    distribution applied it (a reset, a proxy's 502); the retry met a session the
    registry had closed or moved on (404), and the push ended with exit 3, "not found".
    Hypothesis picks which request loses its answer, and whether the next one of that
    method loses it too; the push must complete with the store's bytes."""
    store = Store(tmp_path_factory.mktemp("lost"))
    m = add_model(store, "example.com/ns/lost:1", [rand(3 * MiB + 7), rand(5000)])
    lose = {nth, nth + 1} if twice else {nth}
    proxy = CountingProxy(registry.url, lose={method: lose}).start()
    try:
        dest = f"{proxy.netloc}/lost/r{next(_runs)}"
        push("example.com/ns/lost:1", dest, store=store,
             options=PushOptions(insecure=True, chunk_size=1 * MiB))
        assert skopeo_raw(f"{registry.netloc}/{dest.split('/', 1)[1]}:1") == m.raw
    finally:
        proxy.stop()


def test_a_404_on_the_upload_start_is_not_found_not_a_lost_upload(st: Store) -> None:
    """Found by review: a registry without the repository's project (Harbor, GitLab)
    answers the upload POST 404; that is "not found" (exit 3), not an upload the
    registry "lost twice" (only a session's own requests are recovered)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    posts: list[str] = []

    class NoProject(BaseHTTPRequestHandler):
        disable_nagle_algorithm = True
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _answer(self) -> None:
            if self.command == "POST":
                posts.append(self.path)
            body = (b'{"errors":[{"code":"NAME_UNKNOWN","message":"project not found"}]}'
                    if self.command != "HEAD" else b"")
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = _answer

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), NoProject)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        add_model(st, "team/m:v1", [rand(1000)])
        r = run("--store", str(st.root), "push", "team/m:v1",
                f"127.0.0.1:{httpd.server_address[1]}/nope/m:v1", "--insecure")
        assert r.code == 3, r.err
        assert "lost" not in r.err
        assert len(posts) == 1  # no second start
    finally:
        httpd.shutdown()
        httpd.server_close()


_damaged_runs = iter(range(10**6))


@pytest.mark.timeout(300)
@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=hs.data(), chunk=hs.sampled_from([256 << 10, 1 * MiB, 64 * MiB]),
       stop_first=hs.one_of(hs.none(), hs.integers(1, 3 * MiB)))
def test_a_damaged_blob_is_never_committed_and_is_exit_5(
        registry: DockerRegistry, tmp_path_factory: pytest.TempPathFactory,
        data: hs.DataObject, chunk: int, stop_first: int | None) -> None:
    """Found from outside: a blob damaged in the store (same size, other bytes) went out
    whole and the registry's 400 read as a registry error (exit 6); a registry that does
    not check digests would have stored it. Now every byte sent is hashed, and the block
    that ends the blob goes out only if the blob is its digest: StoreDamaged (exit 5), the
    registry holds nothing. Hypothesis picks the damaged byte, the chunk size (64 MiB:
    one PUT) and an earlier push stopped at some byte (so the next one resumes)."""
    import httpx

    size = 3 * MiB + 5000
    store = Store(tmp_path_factory.mktemp("dmg"))
    m = add_model(store, "example.com/ns/d:1", [rand(size)])
    layer = m.layers[0].digest
    dest = f"{registry.netloc}/damaged/r{next(_damaged_runs)}"
    opts = PushOptions(insecure=True, chunk_size=chunk, index=False)
    if stop_first is not None:
        def stop(ev: dict[str, object]) -> None:
            if ev.get("digest") == str(layer) and int(ev.get("completed", 0)) >= stop_first:  # type: ignore[call-overload]
                raise _Kill
        with pytest.raises(_Kill):
            push("example.com/ns/d:1", dest, store=store, progress=stop, options=opts)
    at = data.draw(hs.integers(0, size - 1), label="damaged byte")
    path = store.blob_path(layer)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(at)
        old = f.read(1)
        f.seek(at)
        f.write(bytes([old[0] ^ 0x5A]))
    with pytest.raises(StoreDamaged, match=r"1 blob\(s\) damaged"):
        push("example.com/ns/d:1", dest, store=store, options=opts)
    head = httpx.head(f"{registry.url}/v2/{dest.split('/', 1)[1]}/blobs/{layer}", timeout=10)
    assert head.status_code == 404


@pytest.mark.timeout(120)
def test_push_of_a_damaged_blob_is_exit_5(registry: DockerRegistry, st: Store) -> None:
    m = add_model(st, "example.com/ns/e:1", [rand(2 * MiB)])
    path = st.blob_path(m.layers[0].digest)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(MiB)
        f.write(b"Z" * 10)
    r = run("push", "example.com/ns/e:1", f"{registry.netloc}/damaged/cli", "--insecure",
            "--store", str(st.root))
    assert r.code == 5, r.err
    assert "damaged" in one_error_line(r) and "verify" in r.err
