"""``gc --dry-run`` reports what the real run does (spec/gc.md)."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore.gc import GCOptions, gc
from blobstore.store import Store
from tests.blobstore.gcutil import add_model

LATER = time.time() + 10 * 86400
REFS = ["a", "a:v2", "ns/b", "ns/b:v2", "ns/c", "other.host/ns/d", "other.host/x/e:1"]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(models=st.dictionaries(st.sampled_from(REFS), st.booleans(), min_size=1))
def test_a_dry_run_reports_the_folders_the_real_run_removes(models: dict[str, bool]) -> None:
    """Found from outside: ``gc --dry-run --json`` always said ``removed_dirs: 0`` while
    the real run then removed the folders its evictions emptied. Which models exist and
    which are old enough to go (``--older-than``) are searched."""
    root = Path(tempfile.mkdtemp(prefix="blobctl-dry-"))
    store = Store(root / "s")
    try:
        for i, (ref, old) in enumerate(sorted(models.items())):
            add_model(store, ref, [b"%d" % i * 100], used=1000 if old else LATER)
        opts = GCOptions(older_than=86400)
        dry = gc(store, GCOptions(older_than=86400, dry_run=True), now=LATER)
        real = gc(store, opts, now=LATER)
        assert dry.removed_models == real.removed_models
        assert dry.removed_dirs == real.removed_dirs
        assert dry.freed_bytes == real.freed_bytes
    finally:
        store.close()
        shutil.rmtree(root, ignore_errors=True)
