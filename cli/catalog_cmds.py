"""Catalog commands: catalog, recommend, variants, fetch, outdated, update (spec/cli.md)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import click

from cli.main import global_options
from cli.output import echo, get_ctx, json_text, print_json, print_table
from cli.pull_cmds import base_option, network_options, progress_for, pull_options

if TYPE_CHECKING:
    from blobstore.name import ModelName
    from blobstore.store import Store
    from catalog.catalog import Catalog
    from catalog.fetch import FetchResult
    from catalog.updates import OutdatedReport
    from registry_client.pull import PullOptions


def _present_ids(store: Store | None, cat: Catalog) -> set[str]:
    if store is None:
        return set()
    return {e.id for e in cat.entries if store.has_model(e.source)}


def _open_store_if_exists() -> Store | None:
    ctx = get_ctx()
    if not os.path.lexists(ctx.resolved_store_path):
        return None
    return ctx.store(create=False)  # (a file there is exit 3, as for every command)


# ---------------------------------------------------------------------- catalog
@click.command("catalog")
@click.option("--tier", type=click.Choice(["lite", "standard", "professional"]),
              help="Only this tier.")
@click.option("--tag", metavar="TAG", help="Only entries with this tag (code, chat, …).")
@click.option("--fits", "only_fits", is_flag=True,
              help="Only models that fit this machine (or --ram).")
@click.option("--ram", metavar="SIZE", help="Plan for a machine with SIZE of available RAM.")
@global_options
def catalog_cmd(tier: str | None, tag: str | None, only_fits: bool, ram: str | None) -> None:
    """List the model catalog (shipped + ~/.config/blobctl/catalog.toml)."""
    from blobstore.units import human_bytes, parse_size
    from catalog.catalog import load_catalog
    from catalog.recommend import fits, machine

    ctx = get_ctx()
    cat = load_catalog()
    entries = cat.select(tier=tier, tag=tag)
    store = _open_store_if_exists()
    present = _present_ids(store, cat)
    m = None
    if only_fits or ram is not None:
        m = machine(ctx.resolved_store_path, ram=parse_size(ram) if ram is not None else None)
    if only_fits:
        assert m is not None
        entries = [e for e in entries if fits(e, m, present=e.id in present)]
    if ctx.json:
        rows = []
        for e in entries:
            doc = e.to_json()
            doc["in_store"] = e.id in present
            if m is not None:
                doc["fits"] = fits(e, m, present=e.id in present)
            rows.append(doc)
        print_json(rows)
        return
    table = []
    for e in entries:
        mark = "*" if e.recommended else ""
        table.append([e.id + mark, e.name, e.parameters, e.quantization,
                      f"{e.context // 1024}k" if e.context >= 1024 else str(e.context),
                      ("~" if e.approximate else "") + human_bytes(e.file_size),
                      ("~" if e.approximate else "") + human_bytes(e.ram_required),
                      e.tier, ",".join(e.tags), "yes" if e.id in present else ""])
    print_table(["ID", "NAME", "PARAMS", "QUANT", "CONTEXT", "FILE", "RAM", "TIER", "TAGS",
                 "IN STORE"], table)
    if entries:
        echo("* recommended; ~ approximate figures; 'blobctl pull ID' fetches one",
             err=True)


# ---------------------------------------------------------------------- recommend
@click.command("recommend")
@click.option("--ram", metavar="SIZE",
              help="Plan for a machine with SIZE of available RAM (GPU/disk not counted).")
@click.option("--tier", type=click.Choice(["lite", "standard", "professional"]),
              help="Only consider this tier.")
@click.option("--tag", metavar="TAG", help="Only consider entries with this tag.")
@click.option("--pull", "do_pull", is_flag=True, help="Pull the recommended model.")
@click.option("--insecure", is_flag=True, help="With --pull: allow plain http / unverified TLS.")
@click.option("--quiet", "-q", is_flag=True, help="With --pull: no progress output.")
@global_options
def recommend_cmd(ram: str | None, tier: str | None, tag: str | None, do_pull: bool,
                  insecure: bool, quiet: bool) -> None:
    """Recommend the best catalog model for this machine, and say why."""
    from blobstore.units import parse_size
    from catalog.catalog import load_catalog
    from catalog.recommend import machine, recommend

    ctx = get_ctx()
    cat = load_catalog()
    store = _open_store_if_exists()
    m = machine(ctx.resolved_store_path, ram=parse_size(ram) if ram is not None else None)
    rec = recommend(cat, m, present=_present_ids(store, cat),
                    entries=cat.select(tier=tier, tag=tag))
    if ctx.json and do_pull:
        # JSON lines, as pull --json prints them: this line, pull's progress lines, and
        # pull's one-line summary last (spec/cli.md, "recommend")
        import msgspec

        click.echo(msgspec.json.encode({"status": "recommended", **rec.to_json()},
                                       enc_hook=str).decode())
    elif ctx.json:
        print_json(rec.to_json())
    else:
        e = rec.entry
        echo(f"{e.id}: {e.name} {e.parameters} {e.quantization} ({e.source})")
        for line in rec.reasons:
            echo(f"  - {line}")
    if do_pull:
        from cli.pull_cmds import run_pull

        run_pull(rec.entry.source, quiet=quiet or ctx.json,
                 options=pull_options(insecure=insecure))


# ---------------------------------------------------------------------- Hugging Face files
@click.command("variants")
@click.argument("repo", metavar="hf.co/ORG/REPO")
@click.option("--revision", default="main", show_default=True, metavar="REV",
              help="Branch, tag or commit.")
@click.option("--insecure", is_flag=True, help="Do not verify TLS.")
@global_options
def variants_cmd(repo: str, revision: str, insecure: bool) -> None:
    """List the GGUF quantization variants of a Hugging Face repo, with sizes."""
    from blobstore.units import human_bytes
    from catalog.hf import parse_repo, variants
    from registry_client.pull import PullOptions

    ctx = get_ctx()
    org, name = parse_repo(repo)
    files = variants(org, name, revision, options=PullOptions(insecure=insecure))
    if ctx.json:
        print_json([f.to_json() for f in files])
        return
    if not files:
        echo(f"hf.co/{org}/{name} has no GGUF files at revision {revision}", err=True)
        return
    rows = []
    for f in files:
        note = "split" if f.split else ("projector" if f.projector else "")
        rows.append([f.quant or "?", human_bytes(f.size), f.path, note])
    print_table(["QUANT", "SIZE", "FILE", "NOTE"], rows)
    echo(f"pull one with: blobctl pull hf.co/{org}/{name} --file FILE", err=True)


def _print_fetch(result: FetchResult) -> None:
    ctx = get_ctx()
    m = result.model.manifest
    if ctx.json:
        import json

        click.echo(json.dumps({
            "status": "success", "name": str(result.name), "digest": str(m.digest),
            "size": m.size, "model_digest": str(result.model.model_digest),
            "url": result.url, "bytes_fetched": result.bytes_fetched,
            "bytes_resumed": result.bytes_resumed, "already_present": result.already_present,
            "seconds": round(result.seconds, 3)}, separators=(",", ":")))
    else:
        echo(f"{result.name.display()}  {m.digest.short}", err=True)


def run_file_pull(ref: str, filename: str, revision: str, options: PullOptions,
                  *, quiet: bool) -> None:
    """``blobctl pull hf.co/ORG/REPO --file NAME.gguf``."""
    from catalog.hf import parse_repo, pull_file

    org, repo = parse_repo(ref)
    progress = progress_for(quiet)
    try:
        result = pull_file(get_ctx().store(), org, repo, filename, revision=revision,
                           options=options, progress=progress)
    finally:
        progress.finish()
    _print_fetch(result)


@click.command("fetch")
@click.argument("url")
@click.option("--sha256", "sha256", required=True, metavar="HEX",
              help="The file's sha256 (64 hex digits); the download is verified against it.")
@click.option("--name", "ref", required=True, metavar="REF", help="The model name to create.")
@network_options
@global_options
def fetch_cmd(url: str, sha256: str, ref: str, insecure: bool, connections: str,
              stall_timeout: float, retries: int, backoff: float, chunk_size: str | None,
              quiet: bool) -> None:
    """Download a GGUF from any HTTP(S) URL (parallel ranges, resume) as model REF."""
    from blobstore.digest import Digest
    from blobstore.errors import InvalidInput
    from blobstore.name import ModelName
    from catalog.fetch import fetch_file
    from registry_client.client import check_url

    check_url(url)  # before the store is opened (exit 4)
    digest = Digest.parse(sha256 if ":" in sha256 else f"sha256:{sha256.lower()}")
    if digest.algorithm != "sha256":
        raise InvalidInput(f"--sha256 takes a sha256, got {digest.algorithm}")
    name = ModelName.parse(ref)
    opts = pull_options(insecure, connections, stall_timeout, retries, backoff, chunk_size)
    progress = progress_for(quiet)
    try:
        result = fetch_file(get_ctx().store(), url, digest, name, options=opts,
                            progress=progress)
    finally:
        progress.finish()
    _print_fetch(result)


# ---------------------------------------------------------------------- updates
def _names(refs: tuple[str, ...]) -> list[ModelName] | None:
    from catalog.catalog import resolve_ref

    if not refs:
        return None
    names = [resolve_ref(r)[0] for r in refs]
    store = get_ctx().store(create=False)
    for n in names:
        store.get_manifest(n)  # every name checked first: unknown -> exit 3, nothing done
    return names


def _report_problems(report: OutdatedReport) -> None:
    from cli.output import warn

    for name, message in report.problems:
        warn(f"{name.display()}: {message}")


def _up_to_date(report: OutdatedReport) -> str:
    return report.summary()


def _raise_failures(report: OutdatedReport) -> None:
    """After everything was reported: a check that failed is an error, with the exit
    code of its cause (a cron job must notice an outage, not read "up to date")."""
    if report.failures:
        name, exc = report.failures[0]
        n = len(report.failures)
        message = (f"{n} model{'s' if n > 1 else ''} could not be checked "
                   f"({name.display()}: {exc.message})")
        # a copy of the same class (its exit code) with the summary as its message; the
        # report's own error stays as it was
        summary = type(exc).__new__(type(exc))
        summary.__dict__.update(exc.__dict__)
        summary.args, summary.message = (message,), message
        raise summary from exc


@click.command("outdated")
@click.argument("refs", nargs=-1, metavar="[REF]...")
@click.option("--insecure", is_flag=True, help="Allow plain http and unverified TLS.")
@click.option("--retries", default=2, show_default=True, metavar="N",
              type=click.IntRange(0, 50), help="Retries per registry request.")
@global_options
def outdated_cmd(refs: tuple[str, ...], insecure: bool, retries: int) -> None:
    """List local models whose manifest changed at their registry (HEAD, no download)."""
    from catalog.updates import outdated

    ctx = get_ctx()
    names = _names(refs)
    report = outdated(ctx.store(create=False), names,
                      options=pull_options(insecure=insecure, retries=retries))
    _report_problems(report)
    if ctx.json:
        print_json([c.to_json() for c in report.changed])
    elif not report.changed:
        echo(_up_to_date(report), err=True)
    else:
        print_table(["NAME", "LOCAL", "REMOTE"],
                    [[c.name.display(), c.local_digest.short, c.remote_digest.short]
                     for c in report.changed])
    _raise_failures(report)


def _dry_run(report: OutdatedReport, opts: PullOptions) -> None:
    """``update --dry-run``: one row (or JSON object) per changed model."""
    from blobstore.units import human_bytes
    from registry_client.pull import estimate

    ctx = get_ctx()
    rows: list[dict[str, Any]] = []
    for change in report.changed:
        e = estimate(change.name, store=ctx.store(create=False), options=opts)
        rows.append({"name": str(change.name), "local_digest": str(change.local_digest),
                     "remote_digest": str(e.manifest.digest), "size": e.manifest.size,
                     "bytes_missing": e.bytes_missing, "bytes_reused": e.bytes_reused,
                     "bytes_to_fetch": e.bytes_to_fetch, "delta_blobs": e.delta_blobs})
    if ctx.json:
        print_json(rows)
        return
    if not rows:
        echo(_up_to_date(report), err=True)
        return
    print_table(["NAME", "LOCAL", "REMOTE", "CHANGED", "REUSED", "TO FETCH"],
                [[r["name"], change.local_digest.short, change.remote_digest.short,
                  human_bytes(int(r["bytes_missing"])), human_bytes(int(r["bytes_reused"])),
                  human_bytes(int(r["bytes_to_fetch"]))]
                 for r, change in zip(rows, report.changed, strict=True)])


@click.command("update")
@click.argument("refs", nargs=-1, metavar="[REF]...")
@click.option("--dry-run", is_flag=True,
              help="Say what each update would transfer (delta decision included); fetch "
                   "no blob.")
@network_options
@base_option
@global_options
def update_cmd(refs: tuple[str, ...], dry_run: bool, insecure: bool, connections: str,
               stall_timeout: float, retries: int, backoff: float, chunk_size: str | None,
               base: tuple[str, ...], no_delta: bool, quiet: bool) -> None:
    """Pull the newer manifests of changed models (only changed layers transfer; a changed
    large layer with a chunk index transfers only its changed chunks, spec/delta.md)."""
    from catalog.updates import outdated
    from cli.pull_cmds import run_pull
    from registry_client.pull import check_bases

    ctx = get_ctx()
    names = _names(refs)
    opts = pull_options(insecure, connections, stall_timeout, retries, backoff, chunk_size,
                        base, no_delta)
    # (no store made where there is none: nothing to update, as for outdated)
    check_bases(ctx.store(create=False), opts)  # before any request (spec/cli.md)
    report = outdated(ctx.store(create=False), names, options=opts)
    _report_problems(report)
    if dry_run:
        _dry_run(report, opts)
        _raise_failures(report)
        return
    if not report.changed:
        if ctx.json:
            status = ("not all checked" if report.failures else
                      "up to date" if not (report.gone or report.unreadable) else
                      "nothing to pull")
            # one line: with models to pull, --json is JSON lines (pull's)
            click.echo(json_text({"status": status, "summary": report.summary(),
                                  "checked": report.checked,
                                  "failed": [str(n) for n, _ in report.failures],
                                  "gone": [str(n) for n in report.gone],
                                  "unreadable": [str(n) for n in report.unreadable]},
                                 indent=0))
        else:
            echo(_up_to_date(report), err=True)
    for change in report.changed:
        if not ctx.json and not quiet:
            echo(f"updating {change.name.display()} "
                 f"({change.local_digest.short} -> {change.remote_digest.short})",
                 err=True)
        run_pull(change.name, quiet=quiet, options=opts)
    _raise_failures(report)
