"""Which local models changed at their registry, and pulling the newer ones.

``outdated``: for each local model (or the names given), ``HEAD`` its manifest at its
registry (``Accept``: every manifest and index type) and compare the
``Docker-Content-Digest`` with the sha256 of the local manifest file. When the header is
absent or differs (it may name an image index: a multi-platform model, whose platform
manifest is what the store keeps), or HEAD fails (404, 405, 5xx after retries: only
the ``GET``'s 404 says a tag is gone), the manifest is fetched and resolved exactly as
``pull`` does, and its digest compared.
Nothing is written.

``update``: pull the changed models with ``registry_client.pull`` — the new manifest's
blobs that the store already has are not transferred (only changed layers are; a changed
large layer with a chunk index only its changed chunks, copying the rest from the local
version: spec/delta.md), and the manifest is replaced last, atomically.
``registry_client.pull.estimate`` answers ``update --dry-run``.

Per-model failures (registry unreachable, model unknown there) are reported in the
result's ``problems``, never raised: one unreachable registry does not hide the others.
Checks that failed (all but "not in the registry") are also in ``failures``: the CLI
reports every model, then exits with the first failure's code (never "up to date").
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from blobstore.digest import Digest
from blobstore.errors import BlobctlError, InvalidDigest
from blobstore.name import ModelName
from blobstore.store import Store
from registry_client.client import ACCEPT_MANIFESTS, RegistryClient
from registry_client.errors import AuthError, RateLimited, RegistryError, RemoteNotFound
from registry_client.pull import PullOptions, PullResult, _resolve_manifest, check_bases, pull

__all__ = ["Change", "OutdatedReport", "outdated", "update"]

log = logging.getLogger("blobctl.updates")


@dataclass(frozen=True)
class Change:
    name: ModelName
    local_digest: Digest
    remote_digest: Digest

    def to_json(self) -> dict[str, str]:
        return {"name": str(self.name), "local_digest": str(self.local_digest),
                "remote_digest": str(self.remote_digest)}


@dataclass
class OutdatedReport:
    checked: int = 0  # models whose registry answered with a manifest digest
    changed: list[Change] = field(default_factory=list)
    problems: list[tuple[ModelName, str]] = field(default_factory=list)  # (name, message)
    # the checks that failed (unreachable, auth, protocol): not "up to date"; the CLI
    # exits with the first one's code after reporting the rest (a model the registry does
    # not have, e.g. an imported one, is only a problem)
    failures: list[tuple[ModelName, BlobctlError]] = field(default_factory=list)
    gone: list[ModelName] = field(default_factory=list)        # not in their registry
    unreadable: list[ModelName] = field(default_factory=list)  # local manifest undecodable

    def summary(self) -> str:
        """One sentence that is true of this report for every mix of up-to-date, changed,
        gone, unreadable and failed models (e.g. never "all 0 checked models are up to
        date" when the only model is gone from its registry)."""
        up = self.checked - len(self.changed)
        counts = [(len(self.changed), "outdated"), (len(self.gone), "not in the registry"),
                  (len(self.unreadable), "with an unreadable local manifest"),
                  (len(self.failures), "could not be checked")]
        total = up + sum(n for n, _ in counts)
        if total == 0:
            return "no models to check"
        if up == total:
            return ("the 1 checked model is up to date" if up == 1
                    else f"all {up} checked models are up to date")
        if len(self.failures) == total:
            return f"no model could be checked ({total} failed)"
        rest = ", ".join(f"{n} {what}" for n, what in counts if n)
        return f"{up} of {total} model{'s' if total > 1 else ''} up to date; {rest}"


def _remote_digest(client: RegistryClient, name: ModelName, local: Digest,
                   opts: PullOptions) -> Digest:
    url = client.manifest_url(name, name.tag)
    try:
        resp = client.request("HEAD", url, scope=client.scope(name), what=f"manifest {name}",
                              headers={"Accept": ACCEPT_MANIFESTS})
    except (AuthError, RateLimited):
        raise
    except RegistryError as exc:
        if exc.status is None:
            # no answer at all (refused, reset, timed out, after its retries): a GET
            # would only wait as long again (found from outside: two "retry 1/1" lines
            # and twice the wait per model of a registry that cannot be reached)
            raise
        # a registry that refuses HEAD (405, 5xx), or answers it 404 while GET works (an
        # Artifactory-like remote): ask with GET, whose 404 alone says the tag is gone
        # (found from outside: a moved tag behind HEAD 404 was "not in its registry")
        log.info("HEAD of %s failed (%s); trying GET", name, exc.message)
        return _resolve_manifest(client, name, opts).digest
    resp.close()
    header = resp.headers.get("docker-content-digest", "").strip()
    if header:
        try:
            remote = Digest.parse(header)
        except InvalidDigest:
            remote = None
        if remote == local:
            return remote
    # no header, or a different digest (maybe an index): resolve as pull does
    return _resolve_manifest(client, name, opts).digest


def outdated(store: Store, names: list[ModelName] | None = None, *,
             options: PullOptions | None = None) -> OutdatedReport:
    """Compare local manifests with their registries; see the module docstring."""
    opts = options or PullOptions()
    report = OutdatedReport()
    if names is None:
        entries = [(e.name, e.manifest) for e in store.list_models()]
    else:
        entries = [(store.canonical_name(n), store.get_manifest(n)) for n in names]
    with RegistryClient(insecure=opts.insecure, max_connections=4,
                        stall_timeout=opts.stall_timeout, retry=opts.retry) as client:
        for name, manifest in entries:
            if manifest is None:
                report.problems.append((name, "local manifest does not decode"))
                report.unreadable.append(name)
                continue
            try:
                remote = _remote_digest(client, name, manifest.digest, opts)
            except RemoteNotFound:
                report.problems.append((name, "not in its registry (imported or fetched "
                                              "from a file?)"))
                report.gone.append(name)
                continue
            except BlobctlError as exc:
                report.problems.append((name, exc.message))
                report.failures.append((name, exc))
                continue
            report.checked += 1
            if remote != manifest.digest:
                report.changed.append(Change(name, manifest.digest, remote))
    return report


def update(store: Store, names: list[ModelName] | None = None, *,
           options: PullOptions | None = None,
           progress: Callable[[dict[str, Any]], None] | None = None,
           ) -> tuple[OutdatedReport, list[PullResult]]:
    """Pull every changed model among ``names`` (default: all). Raises the first pull's
    failure (earlier updates stay done; each pull is atomic); a bad ``options.base`` before
    any request (:func:`check_bases`)."""
    check_bases(store, options or PullOptions())
    report = outdated(store, names, options=options)
    results = [pull(c.name, store=store, progress=progress, options=options)
               for c in report.changed]
    return report, results
