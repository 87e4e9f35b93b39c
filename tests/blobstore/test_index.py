from __future__ import annotations

import os
import time
from pathlib import Path

from blobstore.digest import Digest
from blobstore.index import RACY_SECONDS, FileKey, ManifestIndex, Summary
from blobstore.name import ModelName
from blobstore.store import Store
from tests.blobstore.gcutil import add_model

D = Digest.of_bytes(b"x")
SUMMARY = Summary(D, 10, frozenset({D}), D)


def test_trust_rule() -> None:
    key = FileKey(1, 100, 5_000_000_000, 5_000_000_000)
    later = key.ctime_ns + int(RACY_SECONDS * 1e9) + 1
    assert ManifestIndex.trusted((key, later, SUMMARY), key) is SUMMARY
    assert ManifestIndex.trusted((key, key.ctime_ns + 1000, SUMMARY), key) is None  # racy
    for changed in (FileKey(2, 100, key.mtime_ns, key.ctime_ns),
                    FileKey(1, 101, key.mtime_ns, key.ctime_ns),
                    FileKey(1, 100, key.mtime_ns + 1, key.ctime_ns),
                    FileKey(1, 100, key.mtime_ns, key.ctime_ns + 1)):
        assert ManifestIndex.trusted((key, later, SUMMARY), changed) is None
    assert ManifestIndex.trusted(None, key) is None


def test_list_uses_index_and_sees_rewrites(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    add_model(store, "a", [b"layer a"])
    add_model(store, "b", [b"layer b"])
    first = {e.name.model: e.summary for e in store.list_models()}
    time.sleep(RACY_SECONDS + 0.1)
    store.list_models()  # now the summaries are taken outside the racy window
    assert store.state is not None
    rows = store.state.manifest_index().load()
    assert len(rows) == 2
    # a rewrite with identical size and mtime (utime back) is still noticed (ctime moved)
    path = store.find_manifest_path(ModelName.parse("a"))
    assert path is not None
    st = os.stat(path)
    other = Store(tmp_path / "s")
    add_model(other, "a", [b"layer c"])  # same length content, new digest
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    now = {e.name.model: e.summary for e in store.list_models()}
    assert now["a"] != first["a"] and now["b"] == first["b"]
    assert now["a"] is not None and now["a"].digest == Digest.of_bytes(path.read_bytes())
    # removed manifests drop out of the index
    store.remove_model(ModelName.parse("b"))
    store.list_models()
    assert set(store.state.manifest_index().load()) == {str(path)}
