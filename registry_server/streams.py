"""Leases held by blob responses (spec/serve.md, "Blobs and GC").

Every blob response holds a lease naming its digest from before the file is opened
until the last byte is sent, so ``gc`` (in this or another process) never deletes a blob
mid-response. Streams of the same digest share one lease (reference-counted): sixteen
ranged GETs of one layer write one lease file, not sixteen. Thread-safe; acquire and
release do file I/O, so routes call them in a worker thread.
"""

from __future__ import annotations

import threading

from blobstore import Digest, Lease, Store

__all__ = ["StreamLeases"]


class StreamLeases:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._held: dict[Digest, tuple[Lease, int]] = {}
        self._lock = threading.Lock()  # held across acquire: a second stream waits for it

    def acquire(self, digest: Digest) -> None:
        """Lease ``digest`` (durable when this returns). Raises StoreBusy.

        A new lease is followed by one pass through the store lock: GC reads the leases
        once, under that lock, before it unlinks, so a lease written while a GC applies
        would not stop that GC. Once the lock was free after the lease was written, every
        GC that follows sees it; the caller's existence check after this is final.
        """
        with self._lock:
            hit = self._held.get(digest)
            if hit is not None:
                self._held[digest] = (hit[0], hit[1] + 1)
                return
            lease = Lease(self.store.layout, "serve", digests={digest}).acquire()
            try:
                with self.store.lock():
                    pass
            except BaseException:
                lease.release()
                raise
            self._held[digest] = (lease, 1)

    def release(self, digest: Digest) -> None:
        with self._lock:
            lease, n = self._held[digest]
            if n > 1:
                self._held[digest] = (lease, n - 1)
                return
            del self._held[digest]
            lease.release()

    @property
    def active(self) -> int:
        with self._lock:
            return sum(n for _, n in self._held.values())

    def close(self) -> None:
        with self._lock:
            for lease, _ in self._held.values():
                lease.release()
            self._held.clear()
