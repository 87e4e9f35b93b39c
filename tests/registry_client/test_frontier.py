"""The download engine's hash frontier (``BlobJob.on_frontier``, spec/pull.md "Hash
frontier"), searched under faults against the real ``docker-registry``.

Hypothesis chooses the blob size, chunk size, connections, retry budget and a fault
(reset, clean close, a flipped byte, or none). Invariants of the reported frontier:

* whenever ``n < size`` is reported, the data file holds the blob's true bytes ``[0, n)``
  for a cut or no fault (for corruption: the bytes the engine hashed, which are the file's);
* it only grows, except when the download starts over (then it restarts from below);
* ``n == size`` is reported twice and never for a blob that did not verify: once when the
  digest is verified (``status == "verifying"``: the data file holds the true blob, not
  yet committed), then once after the commit (``"done"``: under its name).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from blobstore.digest import Digest
from blobstore.errors import BlobctlError
from blobstore.store import Store
from registry_client.download import BlobJob
from registry_client.pull import PullOptions, fetch_blobs, pull
from registry_client.retry import RetryPolicy
from tests.faultproxy import Fault, FaultProxy
from tests.registry_client.pullcheck import KiB, push_model, run_bounded
from tests.servers import DockerRegistry

EXAMPLES = int(os.environ.get("BLOBCTL_FRONTIER_EXAMPLES", "25"))


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, object]:
    size = draw(st.integers(0, 1024 * KiB))
    kind = draw(st.sampled_from(["none", "rst", "fin", "corrupt"]))
    fault = None if kind == "none" else Fault(
        kind, draw(st.floats(0.0, 1.0) | st.integers(0, max(size, 1))),
        first=draw(st.integers(0, 3)))
    return {"size": size, "chunk": draw(st.integers(16 * KiB, 256 * KiB)),
            "connections": draw(st.integers(1, 4)), "attempts": draw(st.integers(1, 3)),
            "fault": fault, "whole_model": draw(st.booleans())}


@pytest.mark.timeout(600)
@settings(max_examples=EXAMPLES, deadline=None,
          phases=(Phase.explicit, Phase.reuse, Phase.generate),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(sc=scenarios())
def test_frontier_reports_only_hashed_true_bytes(registry: DockerRegistry, proxy: FaultProxy,
                                                 sc: dict[str, object]) -> None:
    size = sc["size"]
    assert isinstance(size, int)
    model = push_model(registry, [size])
    truth = next(b for b in model.blobs.values() if len(b) == size)
    digest = Digest.of_bytes(truth)
    fault = sc["fault"]
    root = Path(tempfile.mkdtemp(prefix="blobctl-frontier-"))
    store = Store(root / "store")
    seen: list[tuple[int, str]] = []
    problems: list[str] = []
    lock = threading.Lock()

    def on_frontier(job: BlobJob, n: int) -> None:
        if job.digest != digest:
            return
        with lock:
            prev = seen[-1][0] if seen else 0
            if n == size and job.status == "verifying":
                if any(kind != "data" for _, kind in seen):
                    problems.append("the verified end was reported twice")
                path = job.data_path  # type: ignore[assignment]
                with open(path, "rb") as f:
                    if f.read() != truth:
                        problems.append("the end was reported for bytes that are not the blob")
            elif n == size:
                if [kind for _, kind in seen if kind != "data"] != ["verified"]:
                    problems.append("the committed end came without one verified end first")
                if not store.has_blob(digest):
                    problems.append("the committed end was reported before the commit")
                path = store.blob_path(digest)
            else:
                path = job.data_path  # type: ignore[assignment]
                starts_over = job.restarted or (job.plan is not None and job.plan.single)
                if n < prev and not starts_over:
                    problems.append(f"the frontier went back from {prev} to {n}")
            seen.append((n, "data" if n < size else
                         "verified" if job.status == "verifying" else "end"))
        if n > prev and (fault is None or fault.kind != "corrupt"):
            with open(path, "rb") as f:
                f.seek(prev)
                if f.read(n - prev) != truth[prev:n]:
                    problems.append(f"bytes {prev}..{n} reported final are not the blob's")

    opts = PullOptions(insecure=True, connections=sc["connections"],  # type: ignore[arg-type]
                       chunk_size=sc["chunk"], stall_timeout=1.0, auto_gc=False,  # type: ignore[arg-type]
                       retry=RetryPolicy(attempts=sc["attempts"],  # type: ignore[arg-type]
                                         base_delay=0.01, max_delay=0.02),
                       on_frontier=on_frontier)
    if isinstance(fault, Fault):
        proxy.set_faults(Fault(fault.kind, fault.offset, first=fault.first,
                               match=f"{model.path_match}{digest}"))
    try:
        if sc["whole_model"]:
            _, exc = run_bounded(lambda: pull(model.ref(proxy.netloc), store=store,
                                              options=opts), 30, "pull")
        else:
            _, exc = run_bounded(lambda: fetch_blobs(model.ref(proxy.netloc), {digest: size},
                                                     store=store, options=opts), 30, "fetch")
    finally:
        proxy.set_faults()
    try:
        assert not problems, problems
        if exc is not None:
            assert isinstance(exc, BlobctlError), repr(exc)
            if not store.has_blob(digest):
                assert all(n < size for n, _ in seen), "an end was reported for a failure"
        else:
            assert store.blob_path(digest).read_bytes() == truth
            assert seen[-2:] == [(size, "verified"), (size, "end")], seen[-3:]
    finally:
        shutil.rmtree(root, ignore_errors=True)
