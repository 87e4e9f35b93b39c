"""What the page shows, gathered from the store (spec/serve.md, "Web page").

Each view here is plain data with an ``as_json`` twin (``/ui/api/...``); the HTML is
rendered from the same values by :mod:`registry_server.web.render`. Everything is
filtered through the policy: a caller sees only the models ``Policy.visible`` allows.
Functions here block (they read the store): routes run them in a worker thread.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import msgspec

from blobstore import ModelName, Store
from blobstore.benchlog import BenchRun, History
from blobstore.decoding import decode, decode_any
from blobstore.errors import BlobctlError
from blobstore.name import DEFAULT_HOST
from blobstore.store import ModelEntry, UsageReport
from blobstore.units import parse_size
from registry_server.context import ServerContext

__all__ = ["BenchRow", "ModelRow", "UsageView", "bench_rows", "model_rows",
           "url_repository", "usage_view"]

NEXT_IN_LINE = 3  # how many eviction candidates the page names when under the cap


def url_repository(name: ModelName) -> str:
    """The repository as the server's URLs (and the policy) name it: ``library/llama3``
    for the default host, ``HOST/ns/repo`` for others (spec/serve.md)."""
    if name.host.lower() == DEFAULT_HOST:
        return name.repository
    return f"{name.host}/{name.repository}"


def row_id(name: ModelName) -> str:
    """A stable HTML id for a model (names hold characters ids should not)."""
    return "m-" + hashlib.sha256(name.key.encode()).hexdigest()[:12]


class _Annotated(msgspec.Struct):
    annotations: dict[str, str] | None = None


_ANNOTATIONS = msgspec.json.Decoder(_Annotated)


EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"


def _is_artifact(entry: ModelEntry) -> bool:
    """An OCI artifact stored beside a model (a chunk index pushed with ``subject``, an
    ``artifactType`` manifest, the empty config), not a model: not listed."""
    m = entry.manifest
    if m is None:
        return False
    try:
        doc = decode_any(m.raw)
    except msgspec.DecodeError:
        return False
    if not isinstance(doc, dict):
        return False
    cfg = doc.get("config")
    return (isinstance(doc.get("subject"), dict) or isinstance(doc.get("artifactType"), str)
            or (isinstance(cfg, dict) and cfg.get("mediaType") == EMPTY_CONFIG))


def _annotations(entry: ModelEntry) -> dict[str, str] | None:
    m = entry.manifest
    if m is None:
        return None
    try:
        return decode(m.raw, _ANNOTATIONS).annotations
    except msgspec.DecodeError:
        return None


@dataclass
class ModelRow:
    name: ModelName
    repository: str
    model_id: str
    size: int
    own_bytes: int
    shared_bytes: int
    last_used: float | None
    pinned: bool
    tier: str
    error: str | None = None

    @property
    def html_id(self) -> str:
        return row_id(self.name)

    def as_json(self) -> dict[str, object]:
        return {"name": str(self.name), "display": self.name.display(),
                "repository": self.repository, "id": self.model_id, "size": self.size,
                "own_bytes": self.own_bytes, "shared_bytes": self.shared_bytes,
                "last_used": self.last_used, "pinned": self.pinned, "tier": self.tier,
                "error": self.error}


def model_rows(ctx: ServerContext, headers: Mapping[str, str],
               du: UsageReport | None = None) -> list[ModelRow]:
    """The models the caller may see, most recently used first (never used: newest
    manifest first), with own/shared bytes as ``blobctl du`` counts them (``du``: a
    usage report already taken for this request)."""
    store = ctx.store
    usage = {m.name.key: m for m in (du or store.disk_usage()).models}
    rows: list[ModelRow] = []
    for e in store.list_models():
        repo = url_repository(e.name)
        if not ctx.policy.visible(headers, repo) or _is_artifact(e):
            continue
        u = usage.get(e.name.key)
        rows.append(ModelRow(
            name=e.name, repository=repo,
            model_id=e.summary.digest.hex[:12] if e.summary is not None else "",
            size=e.summary.size if e.summary is not None else 0,
            own_bytes=u.own_bytes if u is not None else 0,
            shared_bytes=u.shared_bytes if u is not None else 0,
            last_used=e.last_used, pinned=e.pinned,
            tier=ctx.policy.tier_of(repo, _annotations(e)), error=e.error))
    rows.sort(key=lambda r: (-(r.last_used or 0.0), r.name.key))
    return rows


@dataclass
class UsageView:
    total_bytes: int
    referenced_bytes: int
    unreferenced_bytes: int
    ingest_bytes: int
    cap: int | None
    cap_text: str | None
    cap_error: str = ""
    over_cap: bool = False
    evict_now: list[str] = field(default_factory=list)    # GC would evict these now
    next_in_line: list[str] = field(default_factory=list)  # ...and these next, in order
    hidden_evictions: int = 0   # models the caller may not see, counted not named
    kept: list[tuple[str, str]] = field(default_factory=list)  # (model, why GC keeps it)
    cap_met: bool = True
    cap_reason: str = ""
    after_bytes: int = 0
    seconds: float = 0.0
    by_model: list[tuple[str, int]] = field(default_factory=list)  # (display, own bytes)

    def as_json(self) -> dict[str, object]:
        return {"total_bytes": self.total_bytes, "referenced_bytes": self.referenced_bytes,
                "unreferenced_bytes": self.unreferenced_bytes,
                "ingest_bytes": self.ingest_bytes, "cap": self.cap, "cap_text": self.cap_text,
                "cap_error": self.cap_error, "over_cap": self.over_cap,
                "evict_now": self.evict_now, "next_in_line": self.next_in_line,
                "hidden_evictions": self.hidden_evictions,
                "kept": [{"model": m, "reason": r} for m, r in self.kept],
                "cap_met": self.cap_met, "cap_reason": self.cap_reason,
                "after_bytes": self.after_bytes, "by_model": [
                    {"model": m, "own_bytes": b} for m, b in self.by_model]}


def usage_view(ctx: ServerContext, headers: Mapping[str, str],
               du: UsageReport | None = None) -> UsageView:
    """Disk use against the ``max-size`` cap and what GC would evict (a dry-run plan,
    the one ``blobctl gc --dry-run`` makes: LRU, dedupe-aware, default grace; one
    snapshot of the store, planned once with the cap and, when that evicts nothing,
    once with a zero cap for the order GC would follow)."""
    from blobstore.gc import GCOptions
    from blobstore.gc.plan import make_plan
    from blobstore.gc.snapshot import take_snapshot

    t0 = time.monotonic()
    store = ctx.store
    du = du or store.disk_usage()
    cap_text = store.get_config("max-size")
    view = UsageView(du.total_bytes, du.referenced_bytes, du.unreferenced_bytes,
                     du.ingest_bytes, None, cap_text)

    def seen(name: ModelName) -> bool:
        return ctx.policy.visible(headers, url_repository(name))

    # (artifacts, e.g. a pushed chunk index, are not models: found from outside, one was
    # listed here though the models table leaves it out)
    artifacts = {e.name.key for e in store.list_models() if _is_artifact(e)}
    view.by_model = [(m.name.display(), m.own_bytes) for m in du.models
                     if seen(m.name) and m.name.key not in artifacts]
    if cap_text:
        try:
            view.cap = parse_size(cap_text)
        except BlobctlError as exc:
            view.cap_error = f"the store's max-size setting {cap_text!r} does not parse: {exc}"
    if view.cap is not None:
        view.over_cap = du.total_bytes > view.cap
        opts = GCOptions(max_size=view.cap)
        snap = take_snapshot(store, time.time(), fork=False, lease_ttl=opts.lease_ttl)
        p = make_plan(snap, opts)
        view.cap_met, view.cap_reason, view.after_bytes = p.cap_met, p.cap_reason, p.total_after
        for m in p.evict:
            if seen(m.name):
                view.evict_now.append(m.name.display())
            else:
                view.hidden_evictions += 1
        view.kept = [(s.what, s.reason) for s in p.skipped
                     if s.kind == "model" and seen(ModelName.parse(s.what))]
        if not p.evict:
            # under the cap: the order GC would follow once the store grows past it
            order = make_plan(snap, GCOptions(max_size=0))
            view.next_in_line = [m.name.display() for m in order.evict
                                 if seen(m.name)][:NEXT_IN_LINE]
    view.seconds = time.monotonic() - t0
    return view


@dataclass
class BenchRow:
    name: str
    run: BenchRun

    def as_json(self) -> dict[str, object]:
        r = self.run
        return {"name": self.name, "started_at": r.started_at,
                "generation_tps": r.generation_tps, "prompt_tps": r.prompt_tps,
                "ttft_seconds": r.ttft_seconds, "load_seconds": r.load_seconds,
                "peak_rss": r.peak_rss, "generated_tokens": r.generated_tokens,
                "n_threads": r.n_threads, "n_gpu_layers": r.n_gpu_layers,
                "llama_cpp_version": r.llama_cpp_version}


def bench_rows(store: Store, ctx: ServerContext, headers: Mapping[str, str]) -> list[BenchRow]:
    """The newest benchmark run of each visible model that has one (``blobctl bench``)."""
    out: list[BenchRow] = []
    for full, run in sorted(History(store, quiet=True).all_latest().items()):
        try:
            name = ModelName.parse(full)
        except BlobctlError:
            continue
        if ctx.policy.visible(headers, url_repository(name)):
            out.append(BenchRow(name.display(), run))
    return out
