"""``blobctl pull`` and its progress display (spec/cli.md, spec/pull.md)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from cli.main import global_options
from cli.output import clean, echo, get_ctx

if TYPE_CHECKING:
    from blobstore.name import ModelName
    from registry_client.pull import PullOptions


class _Progress:
    """Renders pull progress: bars on a TTY, plain lines otherwise, JSON lines with --json."""

    def __init__(self, mode: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.mode = mode  # "tty", "plain", "json", "quiet"
        self.clock = clock
        self.layers: dict[str, dict[str, Any]] = {}
        self.order: list[str] = []
        self.started: dict[str, tuple[float, int]] = {}
        self.drawn = 0
        self.last_draw = 0.0
        # plain lines: per blob (time, bytes) of its last line, bytes -1 once it ended;
        # the sums of every blob's bytes and size, and when the overall line was last
        self.last_plain: dict[str, tuple[float, int]] = {}
        self.sums = [0, 0, 0]  # bytes done, bytes in all, blobs done
        self.last_overall = (clock(), 0)
        self.last_json: dict[str, tuple[float, int]] = {}

    def __call__(self, event: dict[str, Any]) -> None:
        if self.mode == "quiet":
            return
        digest = event.get("digest")
        if self.mode == "json":
            self._json(event)
            return
        if digest is None:
            if self.mode == "plain" or event["status"] in ("success",):
                self._line(event["status"])
            return
        if str(event.get("status", "")).startswith("delta "):
            self._line(event["status"])
            return
        key = str(digest)
        prev = self.layers.get(key)
        if prev is None:
            self.order.append(key)
            self.started[key] = (self.clock(), int(event.get("completed") or 0))
        elif (prev.get("completed") == event.get("completed")
              and prev.get("total") == event.get("total") and self.mode == "plain"):
            return  # (a pull ticks every blob ten times a second: most did not move)
        self.layers[key] = event
        if self.mode == "tty":
            self._draw()
        else:
            self._plain(key, event, prev)

    def _json(self, event: dict[str, Any]) -> None:
        key = str(event.get("digest"))
        now = time.monotonic()
        done = event.get("completed")
        prev = self.last_json.get(key)
        final = done is not None and done == event.get("total")
        if prev is not None and prev[1] == done:
            return
        if prev is not None and not final and now - prev[0] < 0.25:
            return
        self.last_json[key] = (now, done if isinstance(done, int) else -1)
        click.echo(json.dumps(event, separators=(",", ":")))

    def _rate(self, key: str, done: int) -> tuple[float, float | None]:
        t0, c0 = self.started[key]
        dt = self.clock() - t0
        speed = (done - c0) / dt if dt > 0.2 else 0.0
        total = int(self.layers[key].get("total") or 0)
        eta = (total - done) / speed if speed > 0 else None
        return speed, eta

    def _fmt(self, key: str, columns: int | None = None) -> str:
        """One layer's line; with ``columns`` (a terminal's width) at most ``columns - 1``
        characters: the bar narrows (to 10), then the rate and ETA go, then the bar
        narrows more and goes, then the byte counts are cut. A line that wrapped would
        take two rows, and the redraw, which moves up one row per layer, would leave stale
        copies behind (found from outside on a 60-column terminal)."""
        from blobstore.units import human_bytes

        ev = self.layers[key]
        total, done = int(ev.get("total") or 0), int(ev.get("completed") or 0)
        pct = 100.0 * done / total if total else 100.0
        speed, eta = self._rate(key, done)
        tail = f"{human_bytes(int(speed))}/s" if speed else ""
        if eta is not None and done < total:
            tail += f" {int(eta) // 60}m{int(eta) % 60:02d}s"
        name = key.split(":", 1)[-1][:12]
        head = f"{name}  {pct:5.1f}% "
        counts = f"{human_bytes(done)}/{human_bytes(total)}"

        def line(width: int, with_tail: bool) -> str:
            # the bar only on a terminal: plain lines go to logs and files (found from
            # outside: `export -o - 2>file` filled the file with bar glyphs)
            fill = int(width * pct / 100)
            bar = (f"▕{'█' * fill}{' ' * (width - fill)}▏ "
                   if self.mode == "tty" and width else "")
            return f"{head}{bar}{counts}  {tail if with_tail else ''}".rstrip()

        full = line(25, True)
        if columns is None or len(full) < columns:
            return full
        room = columns - 1
        for with_tail, least in ((True, 10), (False, 5)):  # a narrower bar, then no rate
            width = 25 - (len(line(25, with_tail)) - room)
            if width >= least:
                return line(min(width, 25), with_tail)
        return line(0, False)[:room]

    def _draw(self, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self.last_draw < 0.1:
            return
        self.last_draw = now
        out = sys.stderr
        columns = _columns()  # (at each draw: a terminal may be resized meanwhile)
        if self.drawn:
            out.write(f"\x1b[{self.drawn}F")
        for key in self.order:
            out.write("\x1b[2K" + clean(self._fmt(key, columns)) + "\n")
        self.drawn = len(self.order)
        out.flush()

    def _plain(self, key: str, event: dict[str, Any], prev: dict[str, Any] | None) -> None:
        """A blob's line when it starts, when it moved (at most every 5 s) and when it
        ends, never for one not started or not moved (found from outside: a pull of
        4,000 layers wrote 33,000 "0.0% 0 B/N" lines); every 5 s, while anything moved,
        an overall line."""
        now = self.clock()
        total, done = int(event.get("total") or 0), int(event.get("completed") or 0)
        old_total = int(prev.get("total") or 0) if prev else 0
        old_done = int(prev.get("completed") or 0) if prev else 0
        self.sums[0] += done - old_done
        self.sums[1] += total - old_total
        ended = done >= total
        self.sums[2] += int(ended) - int(prev is not None and old_done >= old_total)
        last = self.last_plain.get(key)
        if last is not None and last[1] < 0:
            pass  # already reported as complete
        elif ended or (done > 0 and (last is None or (now - last[0] >= 5.0
                                                      and done != last[1]))):
            self.last_plain[key] = (now, -1 if ended else done)
            self._line(self._fmt(key))
        if now - self.last_overall[0] >= 5.0 and self.sums[0] != self.last_overall[1]:
            self.last_overall = (now, self.sums[0])
            self._line(self._overall())

    def _overall(self) -> str:
        from blobstore.units import human_bytes

        done, total, blobs = self.sums
        pct = 100.0 * done / total if total else 100.0
        return (f"total  {pct:5.1f}% {human_bytes(done)}/{human_bytes(total)}  "
                f"{blobs}/{len(self.layers)} blobs")

    def _line(self, text: str) -> None:
        if self.mode == "tty" and self.drawn:
            self._draw(force=True)  # final state of the bars, then the line below them
            self.drawn = 0          # later bars start below the line, never over it
        echo(text, err=True)

    def finish(self) -> None:
        if self.mode == "tty" and self.drawn:
            self._draw(force=True)


def _columns() -> int:
    """The width of the terminal stderr is on (``$COLUMNS`` when it cannot be asked)."""
    import os
    import shutil

    try:
        columns = os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError, AttributeError):
        columns = 0
    return max(columns or shutil.get_terminal_size().columns, 2)


def network_options(f: Any) -> Any:
    """pull's network options, shared with ``update``, ``fetch`` and ``pull --file``."""
    for opt in reversed([
        click.option("--insecure", is_flag=True,
                     help="Registries: allow plain http and unverified TLS (like 'ollama "
                          "pull --insecure'). A file URL (fetch, pull --file) is used as "
                          "given (http:// too); this flag only skips TLS verification."),
        click.option("--connections", default="16", show_default=True, metavar="N|auto",
                     help="Parallel connections for the whole pull (auto: start at 16 and add "
                          "more while the aggregate rate rises and CPU is idle, up to 48)."),
        click.option("--stall-timeout", default=30.0, show_default=True, metavar="SECONDS",
                     type=click.FloatRange(1, 3600),
                     help="Reconnect a stream that delivers no bytes for this long."),
        click.option("--retries", default=7, show_default=True, metavar="N",
                     type=click.IntRange(0, 50),
                     help="Retries per request/range on transient errors (backoff with jitter)."),
        click.option("--backoff", default=0.25, show_default=True, metavar="SECONDS",
                     type=click.FloatRange(0, 60),
                     help="Base delay of the exponential retry backoff (capped at 20 s)."),
        click.option("--chunk-size", default=None, metavar="SIZE",
                     help="Fixed range chunk size (e.g. 4M; default: up to 8 MiB, from the "
                          "window and connections)."),
        click.option("--quiet", "-q", is_flag=True, help="No progress output."),
    ]):
        f = opt(f)
    return f


# delta updates (spec/delta.md): pull and update
def base_option(f: Any) -> Any:
    f = click.option("--no-delta", "no_delta", is_flag=True,
                     help="Fetch changed layers whole, even where a chunk index would allow "
                          "a delta.")(f)
    return click.option(
        "--base", "base", multiple=True, metavar="REF",
        help="A local model to reuse chunks from (delta update; besides the other tags of "
             "the same model, which are always tried). Repeatable.")(f)


def pull_options(insecure: bool = False, connections: str = "16", stall_timeout: float = 30.0,
                 retries: int = 7, backoff: float = 0.25,
                 chunk_size: str | None = None, base: tuple[str, ...] = (),
                 no_delta: bool = False) -> PullOptions:
    from blobstore.units import parse_size
    from registry_client.pull import PullOptions
    from registry_client.retry import RetryPolicy

    count: int | None = None
    if str(connections) != "auto":
        if not str(connections).isdigit() or not 1 <= int(connections) <= 256:
            raise click.BadParameter("must be 'auto' or a number from 1 to 256",
                                     param_hint="--connections")
        count = int(connections)
    chunk = parse_size(chunk_size) if chunk_size is not None else None
    if chunk is not None and not 4096 <= chunk <= 64 << 20:
        raise click.BadParameter("must be between 4K and 64M", param_hint="--chunk-size")
    # an unreachable registry fails fast, unless --retries was given explicitly
    ctx = click.get_current_context(silent=True)
    explicit = ctx is not None and (ctx.get_parameter_source("retries")
                                    not in (None, click.core.ParameterSource.DEFAULT))
    unreachable = retries + 1 if explicit else RetryPolicy.unreachable_attempts
    return PullOptions(insecure=insecure, connections=count, stall_timeout=stall_timeout,
                       chunk_size=chunk, base=tuple(base), delta=not no_delta,
                       retry=RetryPolicy(attempts=retries + 1,
                                                           base_delay=backoff,
                                                           unreachable_attempts=unreachable))


def progress_for(quiet: bool) -> _Progress:
    ctx = get_ctx()
    if ctx.json:
        mode = "json"
    elif quiet:
        mode = "quiet"
    else:
        mode = "tty" if sys.stderr.isatty() else "plain"
    return _Progress(mode)


def run_pull(name: ModelName, *, quiet: bool = False, options: PullOptions | None = None) -> None:
    """Pull ``name`` with progress and the --json summary line (pull, recommend, update)."""
    from registry_client.pull import pull

    ctx = get_ctx()
    progress = progress_for(quiet)
    store = ctx.store()
    try:
        result = pull(name, store=store, progress=progress, options=options)
    finally:
        progress.finish()
    if ctx.json:  # one line: stdout stays valid JSON lines
        click.echo(json.dumps({
            "status": "success",
            "name": str(store.canonical_name(name)),
            "digest": str(result.manifest.digest),
            "size": result.manifest.size,
            "blobs_total": result.blobs_total,
            "blobs_present": result.blobs_present,
            "blobs_fetched": result.blobs_fetched,
            "blobs_from_other_process": result.blobs_from_other_process,
            "bytes_fetched": result.bytes_fetched,
            "bytes_resumed": result.bytes_resumed,
            "bytes_read_back": result.bytes_read_back,
            "bytes_reused": result.bytes_reused,
            "delta_blobs": result.delta_blobs,
            "ranges_moved": result.ranges_moved,
            "seconds": round(result.seconds, 3),
        }, separators=(",", ":")))


@click.command("pull")
@click.argument("ref")
@click.option("--file", "file_", metavar="NAME.gguf",
              help="hf.co/ORG/REPO only: download this GGUF file of the repo (see "
                   "'blobctl variants') and make a model of it.")
@click.option("--revision", default=None, metavar="REV",
              help="With --file: the repo revision (branch, tag or commit; default: main).")
@network_options
@base_option
@global_options
def pull_cmd(ref: str, file_: str | None, revision: str | None, insecure: bool,
             connections: str,
             stall_timeout: float, retries: int, backoff: float, chunk_size: str | None,
             base: tuple[str, ...], no_delta: bool, quiet: bool) -> None:
    """Pull model REF (Ollama registry, hf.co/<user>/<repo>:<quant>, any OCI registry,
    or a catalog id from 'blobctl catalog').

    Downloads in parallel range chunks, verifies while writing, resumes an interrupted
    pull, and writes the manifest only when every blob is in place.
    """
    from catalog.catalog import resolve_ref

    if file_ is not None and base:  # (found by review: accepted, never used nor checked)
        raise click.UsageError("--base does not apply to --file (a whole-file download)")
    # judged when given at all (found from outside: an explicit --revision main, the
    # default's value, was accepted without --file)
    if file_ is None and revision is not None:
        raise click.UsageError("--revision applies only with --file")
    opts = pull_options(insecure, connections, stall_timeout, retries, backoff, chunk_size,
                        base, no_delta)
    if file_ is not None:
        from cli.catalog_cmds import run_file_pull

        run_file_pull(ref, file_, revision or "main", opts, quiet=quiet)
        return
    name, _entry = resolve_ref(ref)
    name.registry_address()  # a host no URL can hold: exit 4 before the store is made
    run_pull(name, quiet=quiet, options=opts)
