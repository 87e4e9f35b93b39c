"""Comparing two chunk indexes, the delta decision, and seeding a new blob's ingest with
the chunks a local blob already has (spec/delta.md, "Plan" and "Decision rule").

A :class:`DeltaPlan` says, for one new blob, which byte runs can be copied from one local
(base) blob and which must be fetched. :meth:`DeltaPlan.seed` copies the runs into the
new blob's :class:`ResumableIngest` at their new offsets, checking every copied chunk's
blake3 against the index on the way, and marks them done; the download engine then
fetches only the bytes still missing (spec/pull.md, "Seeded ranges") and the full sha256
is verified at the end as for any pull: the index only decides *where bytes come from*,
never whether the blob is right.
"""

from __future__ import annotations

import bisect
import logging
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import blake3

from blobstore.digest import Digest
from blobstore.ingest import ResumableIngest, coalesce
from registry_client.delta.index import ChunkIndex

__all__ = ["GAP", "MIN_BLOB", "MIN_FRACTION", "DeltaPlan", "Run", "compare", "worth_it"]

log = logging.getLogger("blobctl.delta")

MIN_BLOB = 8 << 20      # smaller blobs are never indexed nor delta-fetched
MIN_FRACTION = 0.10     # a delta runs only if at least this share of the blob is reused
GAP = 128 << 10         # reused runs shorter than this between two fetches are fetched
_SLICE = 32 << 20       # bytes per seeding task
_THREADS = 4


@dataclass
class Run:
    """``sum(lengths)`` bytes at ``new`` in the new blob equal the bytes at ``old`` in the
    base blob, chunk by chunk (``hashes``: each chunk's blake3, for the copy check)."""

    new: int
    old: int
    lengths: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)
    length: int = 0   # sum(lengths), kept as chunks are added

    def add(self, n: int, h: bytes) -> None:
        self.lengths.append(n)
        self.hashes.append(h)
        self.length += n


@dataclass
class DeltaPlan:
    digest: Digest          # the new blob
    size: int
    base: Digest            # the local blob chunks are copied from
    base_path: Path
    runs: list[Run]

    @property
    def reused(self) -> int:
        return sum(r.length for r in self.runs)

    @property
    def to_fetch(self) -> int:
        return self.size - self.reused

    def missing(self) -> list[tuple[int, int]]:
        """The byte ranges of the new blob not covered by a run (coalesced)."""
        out: list[tuple[int, int]] = []
        pos = 0
        for r in sorted(self.runs, key=lambda r: r.new):
            if r.new > pos:
                out.append((pos, r.new))
            pos = r.new + r.length
        if pos < self.size:
            out.append((pos, self.size))
        return out

    def seed(self, ingest: ResumableIngest) -> list[tuple[int, int]]:
        """Copy the runs into ``ingest`` (skipping what it adopted from an earlier run),
        mark them done and return the ranges written. A chunk whose bytes in the base
        blob do not match its hash is left out (it will be fetched).

        The base is mapped read-only: each chunk's blake3 is computed on the mapping (no
        copy), and the verified spans are copied by the kernel (``copy_file_range``),
        with a plain write where that is not available; slices of ~32 MiB are verified
        and copied by a few threads at once (both release the GIL; an unaligned kernel
        copy, as after a header that grew by a few bytes, is CPU-bound)."""
        # (whole chunks and the parts an earlier run wrote: neither is copied again)
        adopted = coalesce([*ingest.adopted, *ingest.adopted_parts])
        starts = [s for s, _ in adopted]
        groups: list[list[tuple[int, int, int, bytes]]] = [[]]  # (new, old, length, hash)
        size = 0
        for run in self.runs:
            new, old = run.new, run.old
            for ln, h in zip(run.lengths, run.hashes, strict=True):
                if size >= _SLICE:
                    groups.append([])
                    size = 0
                groups[-1].append((new, old, ln, h))
                size += ln
                new, old = new + ln, old + ln
        try:
            with open(self.base_path, "rb") as f, \
                    mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                view = memoryview(mm)
                try:
                    def one(group: list[tuple[int, int, int, bytes]]) -> tuple[
                            list[tuple[int, int]], int]:
                        good, bad = _verify(view, group)
                        return self._copy(f.fileno(), view, ingest, good, adopted, starts), bad

                    workers = max(1, min(_THREADS, os.cpu_count() or 1, len(groups)))
                    with ThreadPoolExecutor(workers, thread_name_prefix="blobctl-seed") as ex:
                        done = list(ex.map(one, groups))
                finally:
                    view.release()
        except (OSError, ValueError) as exc:  # unreadable base (ValueError: empty mmap)
            log.warning("delta: cannot read the base blob %s (%s): fetching %s whole",
                        self.base.short, exc, self.digest.short)
            return []
        bad = sum(b for _, b in done)
        if bad:
            log.warning("delta: %d chunks of the base blob %s did not match their index; "
                        "fetching them instead", bad, self.base.short)
        merged = coalesce([r for w, _ in done for r in w])
        for s, e in merged:
            ingest.mark_done(s, e)
        return merged

    @staticmethod
    def _copy(src: int, view: memoryview, ingest: ResumableIngest,
              spans: list[tuple[int, int, int]], adopted: list[tuple[int, int]],
              starts: list[int]) -> list[tuple[int, int]]:
        written: list[tuple[int, int]] = []
        kernel = hasattr(os, "copy_file_range")
        for gs, ge, go in spans:
            for s, e in _subtract(gs, ge, adopted, starts):
                o = go + (s - gs)
                pos = s
                while kernel and pos < e:
                    try:
                        n = os.copy_file_range(src, ingest.fd, e - pos, o + (pos - s), pos)
                    except OSError:
                        kernel = False  # e.g. not supported here: plain writes from now
                        break
                    if n <= 0:
                        kernel = False
                        break
                    pos += n
                if pos < e:
                    ingest.write_at(view[o + (pos - s):o + (e - s)], pos)
                written.append((s, e))
        return written


def _verify(view: memoryview, chunks: list[tuple[int, int, int, bytes]]) -> tuple[
        list[tuple[int, int, int]], int]:
    """The spans (new start, new end, old start) of ``chunks`` whose bytes in the base
    match their hash, merged where contiguous on both sides; and the count of bad ones."""
    good: list[tuple[int, int, int]] = []
    bad = 0
    for new, old, ln, h in chunks:
        piece = view[old:old + ln]
        try:
            ok = len(piece) == ln and blake3.blake3(piece).digest() == h
        finally:
            piece.release()
        if not ok:
            bad += 1
        elif good and good[-1][1] == new and good[-1][2] + (new - good[-1][0]) == old:
            good[-1] = (good[-1][0], new + ln, good[-1][2])
        else:
            good.append((new, new + ln, old))
    return good, bad


def _subtract(s: int, e: int, adopted: list[tuple[int, int]],
              starts: list[int]) -> list[tuple[int, int]]:
    """[s, e) minus the (sorted, disjoint) adopted ranges."""
    out: list[tuple[int, int]] = []
    k = max(0, bisect.bisect_right(starts, s) - 1)
    pos = s
    while k < len(adopted) and adopted[k][0] < e:
        a, b = adopted[k]
        if b > pos:
            if a > pos:
                out.append((pos, min(a, e)))
            pos = max(pos, b)
        k += 1
    if pos < e:
        out.append((pos, e))
    return out


def compare(new: ChunkIndex, old: ChunkIndex, base_path: Path) -> DeltaPlan:
    """Which chunks of ``new`` the blob ``old`` describes has, as runs of contiguous
    copies; reused runs shorter than GAP between two fetched ranges are dropped (one range
    request instead of two costs less than the bytes saved)."""
    where: dict[bytes, tuple[int, int]] = {}
    pos = 0
    for i, n in enumerate(old.lengths):
        where.setdefault(old.hash(i), (pos, n))
        pos += n
    runs: list[Run] = []
    pos = 0
    for i, n in enumerate(new.lengths):
        h = new.hash(i)
        hit = where.get(h)
        if hit is not None and hit[1] == n:
            last = runs[-1] if runs else None
            if last is not None and last.new + last.length == pos \
                    and last.old + last.length == hit[0]:
                last.add(n, h)
            else:
                runs.append(Run(pos, hit[0], [n], [h], n))
        pos += n
    kept = [r for r in runs
            if r.length >= GAP or r.new == 0 or r.new + r.length == new.size]
    return DeltaPlan(new.blob, new.size, old.blob, base_path, kept)


def worth_it(plan: DeltaPlan) -> bool:
    """The decision rule (spec/delta.md): a delta pays off when the blob is large enough
    and it reuses at least MIN_FRACTION of it."""
    return plan.size >= MIN_BLOB and plan.reused >= MIN_FRACTION * plan.size
