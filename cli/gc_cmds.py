"""``gc`` and ``config`` (spec/gc.md, spec/cli.md)."""

from __future__ import annotations

import dataclasses
import math

import click

from cli.main import global_options
from cli.output import echo, get_ctx, print_json


def _seconds(value: float) -> float:
    """A wait in seconds: finite and not negative (``nan`` and ``-1`` were taken, and
    reported as 'within nans')."""
    if not math.isfinite(value) or value < 0:
        raise click.BadParameter(f"{value} is not a number of seconds (0 or more)")
    return value


SETTINGS = {"max-size": "size cap applied by 'gc' after each pull (e.g. 50G); unset = none"}


@click.command("gc")
@click.option("--max-size", metavar="SIZE",
              help="Evict least recently used models until blobs total <= SIZE "
                   "(50G = 50GiB = 50*2^30, 50GB = 50*10^9, plain number = bytes).")
@click.option("--older-than", metavar="AGE", help="Also evict models unused for AGE (e.g. 30d).")
@click.option("--grace", default="1h", show_default=True, metavar="AGE",
              help="Never touch blobs or models younger than this.")
@click.option("--ingest-grace", default="24h", show_default=True, metavar="AGE",
              help="Remove unfinished downloads idle for longer than this.")
@click.option("--dry-run", is_flag=True, help="Print the plan; change nothing.")
@click.option("--lock-timeout", default=30.0, show_default=True, metavar="SECONDS",
              callback=lambda ctx, param, v: _seconds(v),
              help="How long to wait for the store lock.")
@global_options
def gc_cmd(max_size: str | None, older_than: str | None, grace: str, ingest_grace: str,
           dry_run: bool, lock_timeout: float) -> None:
    """Remove unreferenced blobs and stale downloads; evict LRU models to a size cap.

    Never deletes a blob a remaining model references, a pinned model, anything a
    running pull holds or a running process has open or mapped, or anything younger
    than --grace. Without --max-size the store's 'max-size' setting is used.
    """
    from blobstore.gc import GCCapNotMet, GCOptions, fork_is_safe, gc
    from blobstore.units import parse_duration, parse_size

    ctx = get_ctx()
    store = ctx.store(create=False)
    cap: int | None = None
    if max_size is not None:
        cap = parse_size(max_size)  # ("" is refused as any bad size, not "no cap")
    opts = GCOptions(
        max_size=cap,
        older_than=parse_duration(older_than) if older_than else None,
        grace=parse_duration(grace),
        ingest_grace=parse_duration(ingest_grace),
        dry_run=dry_run,
        lock_timeout=lock_timeout,
        # the CLI is a single-threaded process: GC may use a forked child for its scans
        # (checked again here, native threads included: spec/gc.md)
        fork=fork_is_safe(),
    )
    if not store.root.is_dir():  # a mistyped --store: say so, and make nothing there
        from blobstore.errors import NotFound

        raise NotFound(f"no store at {store.root}",
                       hint="check --store / BLOBCTL_STORE / OLLAMA_MODELS")
    if max_size is None:
        cap_text = store.get_config("max-size")
        if cap_text:
            opts = dataclasses.replace(opts, max_size=parse_size(cap_text))
    try:
        report = gc(store, opts)
    except GCCapNotMet as exc:
        _print(exc.report, ctx.json)
        raise
    _print(report, ctx.json)


def _print(report: object, as_json: bool) -> None:
    from blobstore.gc import GCReport
    from blobstore.units import human_bytes

    assert isinstance(report, GCReport)
    if as_json:
        print_json(report.to_json())
        return
    verb = "would remove" if report.dry_run else "removed"
    for name in report.removed_models:
        echo(f"{verb} model {name}")
    for s in report.skipped:
        if s.kind == "model":
            echo(f"kept model {s.what}: {s.reason}")
    kept_blobs = [s for s in report.skipped if s.kind == "blob"]
    if kept_blobs:
        echo(f"kept {len(kept_blobs)} unreferenced blob(s): "
             + "; ".join(sorted({s.reason for s in kept_blobs})))
    echo(
        f"{verb} {len(report.removed_models)} model(s), {len(report.removed_blobs)} blob(s), "
        f"{len(report.removed_ingests)} stale download(s): {human_bytes(report.freed_bytes)} "
        f"freed; blobs total {human_bytes(report.total_bytes_after)}"
        + (f" (cap {human_bytes(report.max_size)})" if report.max_size is not None else ""))


@click.group("config", invoke_without_command=True)
@global_options
@click.pass_context
def config_cmd(cctx: click.Context) -> None:
    """Show or change store settings (kept in the store's .blobctl/state.db)."""
    if cctx.invoked_subcommand is None:
        _show_all()


def _show_all() -> None:
    ctx = get_ctx()
    values = ctx.store(create=False).state
    current = values.all_config() if values is not None else {}
    if ctx.json:
        print_json({k: current.get(k) for k in SETTINGS})
        return
    for key, doc in SETTINGS.items():
        echo(f"{key} = {current.get(key, '')}    # {doc}")


def _check_key(key: str) -> None:
    from blobstore.errors import InvalidInput

    if key not in SETTINGS:
        raise InvalidInput(f"unknown setting {key!r}", hint=f"settings: {', '.join(SETTINGS)}")


@config_cmd.command("get")
@click.argument("key")
@global_options
def config_get(key: str) -> None:
    """Print one setting."""
    _check_key(key)
    ctx = get_ctx()
    value = ctx.store(create=False).get_config(key)
    if ctx.json:
        print_json({key: value})
    else:
        echo(value or "")


@config_cmd.command("set")
@click.argument("key")
@click.argument("value")
@global_options
def config_set(key: str, value: str) -> None:
    """Set a setting: 'blobctl config set max-size 50G'."""
    from blobstore.units import parse_size

    _check_key(key)
    if key == "max-size":
        parse_size(value)  # refuse a bad size now, not at the next pull
    ctx = get_ctx()
    ctx.store().set_config(key, value)
    if ctx.json:
        print_json({key: value})
    else:
        echo(f"{key} = {value}")


@config_cmd.command("unset")
@click.argument("key")
@global_options
def config_unset(key: str) -> None:
    """Remove a setting."""
    _check_key(key)
    ctx = get_ctx()
    ctx.store().set_config(key, None)
    if ctx.json:
        print_json({key: None})
    else:
        echo(f"{key} unset")
