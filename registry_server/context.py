"""The seams between the server's rooms (spec/serve.md).

Everything a route needs is reached through one :class:`ServerContext`: the store
(thread-safe, shared by all requests), the options the server was started with, the
access policy, the optional pull-through mirror and the activity feed (live pulls and
mirror fetches for the web page and ``/metrics``).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Protocol

from blobstore import Digest, ModelName, Store
from registry_server.responses import DEFAULT_SEND_TIMEOUT

__all__ = [
    "TIERS",
    "TIER_ANNOTATION",
    "Action",
    "Activity",
    "ActivityFeed",
    "Decision",
    "Mirror",
    "MirroredManifest",
    "OpenAccess",
    "Policy",
    "ServeOptions",
    "ServerContext",
]

TIERS = ("lite", "standard", "professional")
TIER_ANNOTATION = "org.blobctl.tier"


class Action(str, Enum):
    """What a request wants to do; ``admin`` is the web page's pin/remove/pull."""

    READ = "read"
    PUSH = "push"
    ADMIN = "admin"


@dataclass(frozen=True)
class Decision:
    """The answer of a :class:`Policy`.

    ``status`` is 200 (allowed), 401 (no or bad credentials: send ``challenge`` as
    ``WWW-Authenticate``) or 403 (known caller, not allowed or model above its tier).
    ``subject`` names the caller for the access log ("anonymous" when none).
    """

    status: int
    subject: str = "anonymous"
    challenge: str | None = None
    reason: str = ""

    @property
    def allowed(self) -> bool:
        return self.status == 200


class Policy(Protocol):
    """Access control. ``repository`` is the URL form (``library/llama3``,
    ``hf.co/org/repo``), None when the request names none (``/v2/``, ``_catalog``: then
    only credentials count); ``tier`` is the resolved tier of what is asked for (see
    :meth:`tier_of`), None when the request names no model or a push creates one."""

    def authorize(self, headers: Mapping[str, str], repository: str | None,
                  action: Action, tier: str | None) -> Decision: ...

    def tier_of(self, repository: str, annotations: Mapping[str, str] | None) -> str:
        """A model's tier: the policy's pattern table (else ``lite``) as a floor, raised
        (never lowered) by the manifest annotation ``org.blobctl.tier``."""
        ...

    def visible(self, headers: Mapping[str, str], repository: str) -> bool:
        """Whether ``_catalog`` and the web page may list this repository to the caller."""
        ...


class OpenAccess:
    """The policy without ``--auth``: everything allowed (push only if the server allows)."""

    def authorize(self, headers: Mapping[str, str], repository: str | None,
                  action: Action, tier: str | None) -> Decision:
        return Decision(200)

    def visible(self, headers: Mapping[str, str], repository: str) -> bool:
        return True

    def tier_of(self, repository: str, annotations: Mapping[str, str] | None) -> str:
        tier = (annotations or {}).get(TIER_ANNOTATION, "lite")
        return tier if tier in TIERS else "lite"


@dataclass(frozen=True)
class MirroredManifest:
    """A manifest fetched upstream: ``name`` its repository, ``reference`` the tag or
    digest it was asked by ("": ``name``'s tag)."""

    name: ModelName
    digest: Digest
    media_type: str
    body: bytes
    reference: str = ""


class Mirror(Protocol):
    """Pull-through mirror, consulted by the OCI routes on a miss (spec/serve.md)."""

    def covers(self, name: ModelName) -> bool:
        """Whether misses under this name's host go upstream."""
        ...

    async def manifest(self, name: ModelName, reference: str) -> MirroredManifest | None:
        """Fetch the manifest (tag or digest) upstream; None when upstream has no such
        manifest. Touches nothing in the store and starts no download: the route first
        decides on the manifest's own tier (a refused caller must cost no store write,
        no recorded use, no GC), then calls :meth:`prefetch`."""
        ...

    async def prefetch(self, got: MirroredManifest) -> None:
        """Store what :meth:`manifest` returned as ``blobctl pull`` would, in the
        background (by tag: the model, its use recorded, the size cap applied; by digest:
        the image manifest's missing blobs). Call only for an authorized caller."""
        ...

    async def blob(self, name: ModelName,
                   digest: Digest) -> tuple[int, AsyncIterator[bytes]] | None:
        """(size, verified-frontier byte stream) for a blob that is not in the store yet;
        None when upstream has none. The iterator raises when the upstream fails, so the
        route cuts the client's connection; concurrent callers share one fetch."""
        ...


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 5050
    push: bool = False
    auth_file: Path | None = None
    upstreams: dict[str, str] = field(default_factory=dict)  # registry host -> base URL
    insecure_upstream: bool = False
    # seconds a request head may take (``--head-timeout``); a web form's body gets as
    # long from its head's end (spec/serve.md, "Slow clients")
    head_timeout: float = 30.0
    # a response the client takes nothing of for this long is cut (``--send-timeout``)
    send_timeout: float = DEFAULT_SEND_TIMEOUT


@dataclass
class Activity:
    """One live operation (a pull started from the page, a mirror fetch)."""

    id: int
    kind: str          # "pull" | "mirror"
    name: str
    total: int = 0
    done: int = 0
    state: str = "running"   # running | done | failed
    error: str = ""
    started: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)

    def as_json(self) -> dict[str, object]:
        return {"id": self.id, "kind": self.kind, "name": self.name, "total": self.total,
                "done": self.done, "state": self.state, "error": self.error,
                "started": self.started, "updated": self.updated}


class ActivityFeed:
    """Thread-safe list of live operations with a change counter to wait on.

    Producers (pull threads, mirror fetches) call :meth:`start`/:meth:`update`/:meth:`end`;
    readers (SSE, metrics) call :meth:`snapshot` and :meth:`wait_change`. Finished
    operations stay visible for ``keep`` seconds.
    """

    def __init__(self, keep: float = 60.0) -> None:
        self._ids = itertools.count(1)
        self._items: dict[int, Activity] = {}
        self._cond = threading.Condition()
        self._version = 0
        self._keep = keep

    def start(self, kind: str, name: str, total: int = 0) -> Activity:
        with self._cond:
            a = Activity(next(self._ids), kind, name, total)
            self._items[a.id] = a
            self._bump()
            return a

    def update(self, act: Activity, *, done: int | None = None, total: int | None = None) -> None:
        with self._cond:
            if done is not None:
                act.done = done
            if total is not None:
                act.total = total
            act.updated = time.time()
            self._bump()

    def end(self, act: Activity, error: str = "") -> None:
        with self._cond:
            act.state = "failed" if error else "done"
            act.error = error
            act.updated = time.time()
            self._bump()

    def snapshot(self) -> tuple[int, list[Activity]]:
        with self._cond:
            now = time.time()
            for k in [k for k, a in self._items.items()
                      if a.state != "running" and now - a.updated > self._keep]:
                del self._items[k]
            return self._version, [Activity(**vars(a)) for a in self._items.values()]

    def wait_change(self, seen: int, timeout: float) -> int:
        """Block (in a worker thread) until the version passes ``seen`` or timeout."""
        with self._cond:
            self._cond.wait_for(lambda: self._version != seen, timeout)
            return self._version

    def _bump(self) -> None:
        self._version += 1
        self._cond.notify_all()


@dataclass
class ServerContext:
    store: Store
    options: ServeOptions
    policy: Policy = field(default_factory=OpenAccess)
    mirror: Mirror | None = None
    activity: ActivityFeed = field(default_factory=ActivityFeed)
    # set by the metrics room; routes call ctx.count(name, value) without knowing it
    counter: Callable[[str, float], None] = field(default=lambda name, value: None)

    def count(self, name: str, value: float = 1.0) -> None:
        self.counter(name, value)
