"""A part of ``manifests/`` that exists but cannot be read (a symlink loop at any level,
a folder or file without read permission) may hide models, and so the blobs they use.
Found from outside: such a loop hid a whole namespace, and ``gc`` deleted its models'
blobs; ``rm`` of another model deleted its manifest, then failed. Now GC and ``rm`` stop
with ``ManifestsUnreadable`` before removing anything, ``list`` warns and goes on, and
``verify`` reports ``unreadable-manifest``.

Hypothesis chooses where the unreadable entry sits (host, namespace, model or tag
level, in a hidden model's own path or beside it), what it is (a symlink to itself, two
links to each other), and which of GC's modes or ``rm`` runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore.errors import ManifestsUnreadable
from blobstore.gc import GCOptions, gc
from blobstore.name import ModelName
from blobstore.store import Store
from tests.blobstore.gcutil import add_model
from tests.cli.clirun import ROOT, run_proc

LATER = 10**10  # far past every blob's grace period

HOST, NS, MODEL = "registry.ollama.ai", "library", "hidden"


def _store(root: Path) -> Store:
    store = Store(root)
    add_model(store, f"{HOST}/{NS}/{MODEL}:1", [b"hidden model layer" * 100], used=1)
    add_model(store, "other/kept:1", [b"kept model layer" * 100], used=2)
    store.put_bytes(b"an orphan nobody references")
    return store


def _blobs(store: Store) -> set[str]:
    return {p.name for p in store.layout.blobs.iterdir()}


def _loop(where: Path, kind: str) -> None:
    if kind == "self":
        where.symlink_to(where.name)
    else:  # two links pointing at each other
        other = where.with_name(where.name + "-b")
        where.symlink_to(other.name)
        other.symlink_to(where.name)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(level=st.sampled_from(["host", "ns", "model", "tag"]),
       kind=st.sampled_from(["self", "pair"]),
       action=st.sampled_from(["sweep", "cap", "rm", "rm-hidden"]))
@pytest.mark.timeout(120)
def test_an_unreadable_part_of_manifests_stops_every_removal(
        level: str, kind: str, action: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = _store(Path(tmp) / "s")
        before = _blobs(store)
        m = store.layout.manifests
        where = {"host": m / "zz-loop",
                 "ns": m / HOST / "zz-loop",
                 "model": m / HOST / NS / "zz-loop",
                 "tag": m / HOST / NS / MODEL / "zz-loop"}[level]
        _loop(where, kind)
        with pytest.raises(ManifestsUnreadable) as err:
            if action == "sweep":
                gc(store, GCOptions(grace=0), now=LATER)
            elif action == "cap":
                gc(store, GCOptions(max_size=0, grace=0), now=LATER)
            elif action == "rm":
                store.remove_model(ModelName.parse("other/kept:1"))
            else:
                store.remove_model(ModelName.parse(f"{HOST}/{NS}/{MODEL}:1"))
        assert "zz-loop" in err.value.path
        assert _blobs(store) == before  # not even the orphan: the sweep never began
        # list warns and goes on: both models are there
        names = {e.name.display() for e in store.list_models()}
        assert {"hidden:1", "other/kept:1"} <= names
        report = store.verify()
        assert [p.problem for p in report.problems] == ["unreadable-manifest"] * (
            1 if kind == "self" else 2)  # (each link of a pair is a loop)
        # once it is gone, everything works again and nothing was lost
        for p in where.parent.iterdir():
            if p.name.startswith("zz-loop"):
                p.unlink()
        assert not store.verify().problems
        r = gc(store, GCOptions(grace=0), now=LATER)
        assert r.freed_bytes > 0  # the orphan
        assert not store.verify().problems
        store.close()


def _no_dac(*args: str) -> list[str]:
    """Run as root without the capabilities that bypass file permissions."""
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
            "--inh-caps=-dac_override,-dac_read_search", *args]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("what", ["file", "model-folder", "namespace-folder"])
def test_a_manifest_without_read_permission_stops_gc_and_rm(tmp_path: Path,
                                                             what: str) -> None:
    """EACCES (a manifest or folder another user owns): as root, run without the
    capabilities that bypass permissions."""
    if os.geteuid() != 0 and what != "file":
        pytest.skip("needs root to make a folder unreadable and still clean up")
    if shutil.which("setpriv") is None and os.geteuid() == 0:
        pytest.skip("needs setpriv (util-linux) to drop root's permission override")
    store = _store(tmp_path / "s")
    before = _blobs(store)
    m = store.layout.manifests
    target = {"file": m / HOST / NS / MODEL / "1", "model-folder": m / HOST / NS / MODEL,
              "namespace-folder": m / HOST / NS}[what]
    mode = target.stat().st_mode
    target.chmod(0)
    wrap: Callable[..., list[str]] = _no_dac if os.geteuid() == 0 else (lambda *a: list(a))
    try:
        s = str(store.root)
        env = {"BLOBCTL_STORE": s}
        for args in (["gc", "--grace", "0"], ["gc", "--max-size", "0"],
                     ["rm", "other/kept:1"]):
            r = _run_wrapped(wrap, args, env)
            assert r.returncode == 11, (args, r.returncode, r.stderr)
            assert r.stderr.startswith("error: cannot read "), r.stderr
            assert _blobs(store) == before, args
        r = _run_wrapped(wrap, ["verify", "--json"], env)
        assert r.returncode == 5, r.stderr
        assert "unreadable-manifest" in r.stdout
    finally:
        target.chmod(mode)
    assert not store.verify().problems
    assert run_proc("--store", str(store.root), "list").code == 0


def _run_wrapped(wrap: Callable[..., list[str]], args: list[str], env: dict[str, str]
                 ) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    return subprocess.run(wrap(sys.executable, "-m", "cli", *args), capture_output=True,
                          text=True, env=full, timeout=60, cwd=ROOT)


@pytest.mark.timeout(60)
def test_reports_go_on_where_removals_stop(tmp_path: Path) -> None:
    """`du` (and the web page, which uses it) is a report: it warns and goes on."""
    store = _store(tmp_path / "s")
    _loop(store.layout.manifests / HOST / "zz-loop", "self")
    usage = store.disk_usage()
    assert {m.name.display() for m in usage.models} == {"hidden:1", "other/kept:1"}
    r = run_proc("--store", str(store.root), "du", "--json")
    assert r.code == 0 and "cannot read" in r.err, (r.code, r.err)


@pytest.mark.timeout(60)
def test_what_holds_no_manifest_is_no_problem(tmp_path: Path) -> None:
    """Dangling links, stray files at the folder levels and a symlinked folder are what
    real Ollama folders hold: none of them stops GC (no false alarm)."""
    store = _store(tmp_path / "s")
    m = store.layout.manifests
    (m / "dangling-host").symlink_to(tmp_path / "gone")
    (m / HOST / "stray-file").write_text("x")
    (m / HOST / NS / "dangling-model").symlink_to("nowhere")
    (m / HOST / NS / MODEL / "dangling-tag").symlink_to("nowhere")
    elsewhere = tmp_path / "other-disk" / "ns2"
    (elsewhere / "linked").mkdir(parents=True)
    (elsewhere / "linked" / "1").write_bytes((m / HOST / NS / MODEL / "1").read_bytes())
    (m / HOST / "ns2").symlink_to(elsewhere)  # a namespace folder on another disk
    r = gc(store, GCOptions(grace=0), now=LATER)
    assert r.freed_bytes > 0  # the orphan went, nothing else
    assert not store.verify().problems
    names = {e.name.display() for e in store.list_models()}
    assert {"hidden:1", "other/kept:1", "ns2/linked:1"} <= names


@pytest.mark.timeout(120)
def test_rm_of_a_model_whose_own_manifest_cannot_be_read_keeps_its_blobs(
        tmp_path: Path) -> None:
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to drop root's permission override")
    store = _store(tmp_path / "s")
    before = _blobs(store)
    own = store.layout.manifests / HOST / NS / MODEL / "1"
    own.chmod(0)
    wrap: Callable[..., list[str]] = _no_dac if os.geteuid() == 0 else (lambda *a: list(a))
    r = _run_wrapped(wrap, ["rm", f"{HOST}/{NS}/{MODEL}:1"], {"BLOBCTL_STORE": str(store.root)})
    assert r.returncode == 0, r.stderr
    assert not own.exists() and _blobs(store) == before  # what it used is unknown: kept
    assert "cannot read" in r.stderr
