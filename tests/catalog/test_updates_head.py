"""`outdated`/`update` when the registry's ``HEAD`` of a manifest is not to be trusted
(spec/catalog.md, "Updates").

Found from outside: a registry answering ``HEAD`` of a manifest with 404 while ``GET``
works (an Artifactory-like remote) hid a moved tag: "warning: … not in its registry
(imported or fetched from a file?)", exit 0. ``HEAD`` is only a shortcut: whatever it
answers, ``outdated`` reports exactly what ``GET`` says.

The registry is the real ``docker-registry`` behind a front (tests/registryfront.py).
Hypothesis chooses what ``HEAD`` answers (passed through; 200 without
``Docker-Content-Digest``; 404, 405, 500) and what happened to the tag (unchanged, moved
to another manifest, deleted).
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore.digest import Digest
from blobstore.name import ModelName
from blobstore.store import Store
from catalog.updates import Change, outdated
from registry_client.pull import PullOptions, pull
from registry_client.retry import RetryPolicy
from tests.cli.clirun import run, run_proc
from tests.registryfront import RegistryFront
from tests.servers import DockerRegistry, sha

MODEL = "application/vnd.ollama.image.model"
CONFIG = b'{"model_format":"gguf","model_family":"llama"}'
_seq = itertools.count()


def _opts() -> PullOptions:
    return PullOptions(insecure=True, stall_timeout=5.0,
                       retry=RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.02))


@pytest.fixture(scope="module")
def front(registry: DockerRegistry) -> Iterator[RegistryFront]:
    with RegistryFront(registry.port) as f:
        yield f


@pytest.mark.timeout(180)
@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(head=st.sampled_from([0, 200, 404, 405, 500]),
       tag=st.sampled_from(["unchanged", "moved", "deleted"]))
def test_outdated_reports_what_get_says_whatever_head_answers(
        registry: DockerRegistry, front: RegistryFront, head: int, tag: str) -> None:
    repo = f"head/m{os.getpid()}x{next(_seq)}"
    v1 = registry.push(repo, "t", CONFIG, [(MODEL, os.urandom(1000))])
    name = ModelName.parse(f"{front.netloc}/{repo}:t")
    root = Path(tempfile.mkdtemp(prefix="outdated-head-"))
    try:
        store = Store(root / "store")
        front.manifest_head = 0
        pull(name, store=store, options=_opts())
        v2 = None
        if tag == "moved":
            v2 = registry.push(repo, "t", CONFIG, [(MODEL, os.urandom(1000))])
        elif tag == "deleted":
            r = httpx.delete(f"{registry.url}/v2/{repo}/manifests/{sha(v1)}", timeout=30)
            assert r.status_code == 202, r.text
        front.manifest_head = head
        report = outdated(store, options=_opts())
        assert report.failures == [], report.problems
        if tag == "deleted":
            assert report.gone == [name] and report.checked == 0
        else:
            assert report.gone == [] and report.checked == 1, report.problems
            want = [] if v2 is None else [
                Change(name, Digest.parse(sha(v1)), Digest.parse(sha(v2)))]
            assert report.changed == want
    finally:
        front.manifest_head = 0
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(120)
def test_cli_update_behind_head_404_pulls_the_moved_tag(
        registry: DockerRegistry, front: RegistryFront, tmp_path: Path) -> None:
    """As the outside tester ran it (t_head404.sh): pull, the tag moves, HEAD answers 404."""
    store = str(tmp_path / "s")
    repo = f"head/cli{os.getpid()}"
    registry.push(repo, "v3", CONFIG, [(MODEL, os.urandom(1000))])
    ref = f"{front.netloc}/{repo}:v3"
    try:
        p = run_proc("pull", ref, "--insecure", "--quiet", "--store", store)
        assert p.code == 0, p.err
        v2 = registry.push(repo, "v3", CONFIG, [(MODEL, os.urandom(1000))])
        front.manifest_head = 404
        r = run("outdated", "--insecure", "--json", "--store", store)
        assert r.code == 0, r.err
        assert "not in its registry" not in r.err
        assert [c["remote_digest"] for c in r.json()] == [sha(v2)]
        r = run_proc("update", "--insecure", "--quiet", "--store", store)
        assert r.code == 0, r.err
        assert run("show", ref, "--json", "--store", store).json()["digest"] == sha(v2)
    finally:
        front.manifest_head = 0
