"""Leases held by blob responses (spec/serve.md, "Blobs and GC").

Every blob response holds a lease naming its digest from before the file is opened
until the last byte is sent, so ``gc`` (in this or another process) never deletes a blob
mid-response. Streams of the same digest share one lease (reference-counted): sixteen
ranged GETs of one layer write one lease file, not sixteen. Thread-safe; acquire and
release do file I/O, so routes call them in a worker thread.

The table lock guards only the table: the first stream of a digest writes the lease and
passes the store lock (up to ``lock_timeout`` seconds while a GC applies) without it, so
streams of other digests, and releases, never wait behind a GC; later streams of the same
digest wait for that first one (bounded) and share its lease.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from blobstore import Digest, Lease, Store, StoreBusy
from blobstore.errors import InsufficientSpace, StoreUnwritable
from blobstore.store import STORE_LOCK_TIMEOUT

__all__ = ["StreamLeases"]

log = logging.getLogger("blobctl.serve")


@dataclass
class _Entry:
    count: int = 1
    lease: Lease | None = None  # None while the first stream is still acquiring it
    error: BaseException | None = None
    ready: threading.Event = field(default_factory=threading.Event)


class StreamLeases:
    def __init__(self, store: Store, *, lock_timeout: float = STORE_LOCK_TIMEOUT) -> None:
        self.store = store
        self.lock_timeout = lock_timeout
        self._held: dict[Digest, _Entry] = {}
        self._lock = threading.Lock()  # the table only; never held across file I/O
        self._closed = False
        self._warned = False

    def acquire(self, digest: Digest) -> None:
        """Lease ``digest`` (durable when this returns). Raises StoreBusy.

        A new lease is followed by one pass through the store lock: GC reads the leases
        once, under that lock, before it unlinks, so a lease written while a GC applies
        would not stop that GC. Once the lock was free after the lease was written, every
        GC that follows sees it; the caller's existence check after this is final.
        """
        with self._lock:
            if self._closed:
                raise StoreBusy("the stream leases (shutting down)", 0)
            joined = self._held.get(digest)
            if joined is not None:
                joined.count += 1
            else:
                self._held[digest] = e = _Entry()
        if joined is not None:
            self._await(digest, joined)
            return
        try:
            try:
                lease: Lease | None = Lease(self.store.layout, "serve",
                                            digests={digest}).acquire()
            except (StoreUnwritable, InsufficientSpace) as why:
                # a store this process cannot write (a read-only mount, another user's
                # Ollama folder, a full disk) is still served (found from outside:
                # every blob GET was a 500): no lease can be written, and this process
                # runs no GC on it; the open file keeps its bytes readable to the end
                lease = None
                if not self._warned:
                    self._warned = True
                    log.warning("serving without blob leases: %s", why.message)
            if lease is not None:
                try:
                    with self.store.lock(self.lock_timeout):
                        pass
                except BaseException:
                    lease.release()
                    raise
        except BaseException as exc:
            with self._lock:
                e.error = exc
                if self._held.get(digest) is e:
                    del self._held[digest]  # waiters that joined it fail with it
            e.ready.set()
            raise
        with self._lock:
            closed = self._closed
            if not closed:
                e.lease = lease
        if closed:
            if lease is not None:
                lease.release()
            e.error = StoreBusy("the stream leases (shutting down)", 0)
            e.ready.set()
            raise e.error
        e.ready.set()

    def _await(self, digest: Digest, e: _Entry) -> None:
        """A later stream of a digest whose lease the first stream is still taking."""
        if not e.ready.wait(self.lock_timeout + 5):
            self._drop(digest, e)
            raise StoreBusy(f"the lease of {digest}", self.lock_timeout + 5)
        if e.error is not None:
            if isinstance(e.error, StoreBusy):
                raise StoreBusy(e.error.what, e.error.timeout)
            raise StoreBusy(f"the lease of {digest} ({e.error})", 0)

    def _drop(self, digest: Digest, e: _Entry) -> None:
        lease = None
        with self._lock:
            e.count -= 1
            if e.count == 0 and self._held.get(digest) is e:
                del self._held[digest]
                lease = e.lease
        if lease is not None:
            lease.release()

    def release(self, digest: Digest) -> None:
        with self._lock:
            e = self._held.get(digest)
        if e is not None:
            self._drop(digest, e)

    @property
    def active(self) -> int:
        with self._lock:
            return sum(e.count for e in self._held.values() if e.lease is not None)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            leases = [e.lease for e in self._held.values() if e.lease is not None]
            self._held.clear()
        for lease in leases:
            lease.release()
