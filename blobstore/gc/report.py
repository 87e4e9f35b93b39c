"""GC options in, GC report out (spec/gc.md, "Report")."""

from __future__ import annotations

from dataclasses import dataclass, field

from blobstore.errors import CapNotMet
from blobstore.lease import LEASE_TTL
from blobstore.units import check_count, check_seconds

__all__ = ["DEFAULT_GRACE", "DEFAULT_INGEST_GRACE", "GCCapNotMet", "GCOptions", "GCReport",
           "Skipped", "cap_error"]

DEFAULT_GRACE = 3600.0
DEFAULT_INGEST_GRACE = 86400.0


@dataclass(frozen=True)
class GCOptions:
    """What to collect.

    ``fork``: let GC run its syscall-heavy scans in a forked child (second core). Off by
    default: a library never forks behind its caller's back. Even when asked, GC forks
    only from a single-threaded process (native threads counted) on Linux
    (``blobstore/_forked.py``); the result is the same either way.
    """

    max_size: int | None = None
    older_than: float | None = None  # seconds since last use
    grace: float = DEFAULT_GRACE
    ingest_grace: float = DEFAULT_INGEST_GRACE
    dry_run: bool = False
    lock_timeout: float = 30.0
    fork: bool = False
    lease_ttl: float = LEASE_TTL  # heartbeat age after which a foreign lease lapses

    def __post_init__(self) -> None:
        """Raises InvalidOption for a value out of range (a negative cap or age)."""
        check_count("GCOptions", "max_size", self.max_size, 0, none_ok=True)
        check_seconds("GCOptions", "older_than", self.older_than, none_ok=True)
        check_seconds("GCOptions", "grace", self.grace)
        check_seconds("GCOptions", "ingest_grace", self.ingest_grace)
        check_seconds("GCOptions", "lease_ttl", self.lease_ttl)


@dataclass
class Skipped:
    kind: str  # "model", "blob", "ingest"
    what: str
    reason: str


@dataclass
class GCReport:
    dry_run: bool
    removed_models: list[str] = field(default_factory=list)
    removed_blobs: list[str] = field(default_factory=list)
    removed_ingests: list[str] = field(default_factory=list)
    removed_dirs: int = 0
    freed_bytes: int = 0
    freed_blob_bytes: int = 0  # part of freed_bytes: blobs (not stale downloads)
    total_bytes_before: int = 0
    total_bytes_after: int = 0
    max_size: int | None = None
    skipped: list[Skipped] = field(default_factory=list)
    cap_met: bool = True
    cap_reason: str = ""
    finished_intent: bool = False
    # a live Ollama download in blobs/ (its data file and why it is live): then no
    # unreferenced blob goes, and these count the ones kept for that alone
    ollama_download: str | None = None
    ollama_kept_blobs: int = 0
    ollama_kept_bytes: int = 0
    plan_seconds: float = 0.0
    apply_seconds: float = 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "dry_run": self.dry_run,
            "removed_models": self.removed_models,
            "removed_blobs": self.removed_blobs,
            "removed_ingests": self.removed_ingests,
            "removed_dirs": self.removed_dirs,
            "freed_bytes": self.freed_bytes,
            "total_bytes_before": self.total_bytes_before,
            "total_bytes_after": self.total_bytes_after,
            "max_size": self.max_size,
            "cap_met": self.cap_met,
            "cap_reason": self.cap_reason or None,
            "skipped": [{"kind": s.kind, "what": s.what, "reason": s.reason}
                        for s in self.skipped],
            "finished_intent": self.finished_intent,
            "kept_for_ollama": None if self.ollama_download is None else {
                "blobs": self.ollama_kept_blobs, "bytes": self.ollama_kept_bytes,
                "reason": f"an Ollama download is running ({self.ollama_download}): it may "
                          "be about to reference any unreferenced blob"},
            "plan_seconds": round(self.plan_seconds, 3),
            "apply_seconds": round(self.apply_seconds, 3),
        }


class GCCapNotMet(CapNotMet):
    """CapNotMet that carries the GC report (for ``--json``)."""

    def __init__(self, cap: int, total: int, reason: str, report: GCReport) -> None:
        super().__init__(cap, total, reason)
        self.report = report


def cap_error(report: GCReport, cap: int) -> GCCapNotMet:
    reason = report.cap_reason or "models that cannot be evicted"
    return GCCapNotMet(cap, report.total_bytes_after, reason, report)
