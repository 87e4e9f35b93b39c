"""Benchmark commands: bench, compare, run (spec/cli.md; needs the extra ``llm``)."""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Any

import click

from cli.main import global_options
from cli.output import Styled, clean, echo, get_ctx, iso, print_json, print_table

if TYPE_CHECKING:
    from blobstore.name import ModelName
    from blobstore.store import Store
    from catalog.history import BenchRun

# llama.cpp makes no context smaller than 256 tokens (it pads n_ctx up to a multiple of
# 256: asked 16, it gives 256); --ctx below that would not be what runs
MIN_CTX = 256

# Every flat field of the JSON record (spec/cli.md, "bench"); the first ones in the
# order CSV had before the others were added, so that columns read by position stay.
_CSV_FIELDS = ["name", "started_at", "load_seconds", "prompt_tokens", "prompt_tps",
               "generated_tokens", "generation_tps", "ttft_seconds", "peak_rss",
               "context_used", "context_size", "n_gpu_layers", "n_threads",
               "llama_prompt_tps", "llama_generation_tps", "model_digest",
               "manifest_digest", "prompt_seconds", "generation_seconds", "rss_before_load",
               "llama_cpp_version"]


def _row(run: BenchRun) -> dict[str, Any]:
    import msgspec

    doc: dict[str, Any] = msgspec.to_builtins(run)
    doc["started_at"] = iso(run.started_at)
    p = run.llama
    doc["llama_prompt_tps"] = p.prompt_tokens / (p.prompt_eval_ms / 1000) \
        if p.prompt_eval_ms else None
    doc["llama_generation_tps"] = p.eval_tokens / (p.eval_ms / 1000) if p.eval_ms else None
    return doc


def _one_format(as_json: bool, as_csv: bool) -> None:
    """--json and --csv both ask for stdout's format: a usage error (CSV used to win)."""
    if as_json and as_csv:
        raise click.UsageError("--json and --csv exclude each other: give one")


def _emit_csv(runs: list[BenchRun]) -> None:
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in runs:
        w.writerow(_row(r))
    echo(buf.getvalue(), nl=False)


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _context_bar(run: BenchRun, color: bool, width: int = 10) -> str:
    frac = run.context_fraction
    fill = min(width, round(frac * width))
    bar = "█" * fill + "░" * (width - fill)
    text = f"{bar} {frac * 100:3.0f}%"
    if not color:
        return text
    code = "32" if frac < 0.5 else ("38;5;208" if frac < 0.8 else "31")  # green/orange/red
    return Styled(f"\x1b[{code}m{bar}\x1b[0m {frac * 100:3.0f}%")


# ---------------------------------------------------------------------- bench
@click.command("bench")
@click.argument("ref")
@click.option("--prompt", "-p", default=None, help="Prompt to evaluate (default: a fixed text).")
@click.option("--n-predict", "-n", default=128, show_default=True, type=click.IntRange(2, 1 << 20),
              help="Tokens to generate.")
@click.option("--ctx", "n_ctx", default=2048, show_default=True,
              type=click.IntRange(MIN_CTX, 1 << 22),
              help="Context size (tokens); prompt + --n-predict must fit it.")
@click.option("--gpu-layers", default=0, show_default=True, type=click.IntRange(-1, 10_000),
              help="Layers to offload to a GPU (-1: all).")
@click.option("--threads", default=None, type=click.IntRange(1, 1024),
              help="CPU threads (default: llama-cpp-python's choice).")
@click.option("--history", "history", is_flag=True, help="Show the last runs of REF instead.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV output.")
@global_options
def bench_cmd(ref: str, prompt: str | None, n_predict: int, n_ctx: int, gpu_layers: int,
              threads: int | None, history: bool, as_csv: bool) -> None:
    """Benchmark model REF with llama-cpp-python: load time, tokens/s, TTFT, memory.

    Results are kept in the store (.blobctl/bench/, last 10 runs per model).
    """
    from blobstore.name import ModelName
    from blobstore.units import human_bytes
    from catalog.bench import DEFAULT_PROMPT, benchmark
    from catalog.history import History

    ctx = get_ctx()
    _one_format(ctx.json, as_csv)
    name = ModelName.parse(ref)
    if history:
        store = ctx.store(create=False)
        canonical = store.canonical_name(name)
        runs = History(store).runs(canonical)
        if not runs and not store.has_model(name):
            store.get_manifest(name)  # ModelNotFound: exit 3
        if as_csv:
            _emit_csv(runs)
        elif ctx.json:
            print_json([_row(r) for r in runs])
        else:
            if not runs:
                echo(f"no benchmark runs of {canonical.display()} yet", err=True)
                return
            print_table(["WHEN", "LOAD", "PROMPT T/S", "GEN T/S", "TTFT", "PEAK RSS",
                         "CONTEXT"],
                        [[iso(r.started_at) or "", _fmt_s(r.load_seconds),
                          f"{r.prompt_tps:.1f}", f"{r.generation_tps:.1f}",
                          _fmt_s(r.ttft_seconds), human_bytes(r.peak_rss),
                          f"{r.context_used}/{r.context_size}"] for r in reversed(runs)])
        return
    from catalog.errors import RunNotSaved

    store = ctx.store()
    try:
        run = benchmark(store, name, prompt=DEFAULT_PROMPT if prompt is None else prompt,
                        n_predict=n_predict,
                        n_ctx=n_ctx, n_gpu_layers=gpu_layers, n_threads=threads)
    except RunNotSaved as exc:  # measured: show it, then say it was not kept (exit 9)
        _show_run(store, name, exc.run, as_csv)
        raise
    _show_run(store, name, run, as_csv)


def _show_run(store: Store, name: ModelName, run: BenchRun, as_csv: bool) -> None:
    from blobstore.units import human_bytes

    ctx = get_ctx()
    if as_csv:
        _emit_csv([run])
        return
    if ctx.json:
        print_json(_row(run))
        return
    row = _row(run)
    lines = [
        ("model", f"{store.canonical_name(name).display()}  ({run.model_digest[7:19]})"),
        ("load time", _fmt_s(run.load_seconds)),
        ("prompt", f"{run.prompt_tokens} tokens, {run.prompt_tps:.1f} tokens/s"),
        ("generation", f"{run.generated_tokens} tokens, {run.generation_tps:.1f} tokens/s"),
        ("time to first token", _fmt_s(run.ttft_seconds)),
        ("peak RSS", f"{human_bytes(run.peak_rss)} (before load "
                     f"{human_bytes(run.rss_before_load)})"),
        ("context", f"{run.context_used} of {run.context_size} tokens "
                    f"({run.context_fraction * 100:.0f}%)"),
        ("llama.cpp's own timings",
         f"prompt {row['llama_prompt_tps'] or 0:.1f} tokens/s, "
         f"generation {row['llama_generation_tps'] or 0:.1f} tokens/s"),
        ("threads / GPU layers", f"{run.n_threads} / {run.n_gpu_layers}"),
    ]
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        echo(f"{k:<{width}}  {v}")


# ---------------------------------------------------------------------- compare
@click.command("compare")
@click.argument("refs", nargs=-1, metavar="[REF]...")
@click.option("--csv", "as_csv", is_flag=True, help="CSV output.")
@global_options
def compare_cmd(refs: tuple[str, ...], as_csv: bool) -> None:
    """Compare the latest benchmark of models (default: every benchmarked model)."""
    from blobstore.name import ModelName
    from blobstore.units import human_bytes
    from catalog.history import History

    ctx = get_ctx()
    _one_format(ctx.json, as_csv)
    store = ctx.store(create=False)
    hist = History(store)
    if refs:
        runs = []
        for ref in refs:
            name = store.canonical_name(ModelName.parse(ref))
            got = hist.runs(name)
            if not got:
                from blobstore.errors import NotFound

                store.get_manifest(name)  # unknown model: exit 3
                raise NotFound(f"no benchmark runs of {name.display()} yet",
                               hint=f"run 'blobctl bench {ref}' first")
            runs.append(got[-1])
    else:
        runs = list(hist.all_latest().values())
    runs.sort(key=lambda r: r.generation_tps, reverse=True)
    if as_csv:
        _emit_csv(runs)
        return
    fastest = runs[0].name if runs else None
    leanest = min(runs, key=lambda r: r.peak_rss - r.rss_before_load).name if runs else None
    if ctx.json:
        rows = []
        for r in runs:
            doc = _row(r)
            doc["fastest"] = r.name == fastest
            doc["most_memory_efficient"] = r.name == leanest
            doc["context_fraction"] = r.context_fraction
            rows.append(doc)
        print_json(rows)
        return
    if not runs:
        echo("no benchmark results yet: run 'blobctl bench REF'", err=True)
        return
    color = sys.stdout.isatty()
    table = []
    for r in runs:
        marks = []
        if r.name == fastest:
            marks.append("fastest")
        if r.name == leanest:
            marks.append("least memory")
        # CONTEXT last: its colour codes would throw off the padding of a later column
        table.append([ModelName.parse(r.name).display(), f"{r.generation_tps:.1f}",
                      f"{r.prompt_tps:.1f}", _fmt_s(r.ttft_seconds), _fmt_s(r.load_seconds),
                      human_bytes(r.peak_rss), ", ".join(marks) or "-",
                      _context_bar(r, color)])
    print_table(["MODEL", "GEN T/S", "PROMPT T/S", "TTFT", "LOAD", "PEAK RSS", "BEST",
                 "CONTEXT"], table)


# ---------------------------------------------------------------------- run
@click.command("run")
@click.argument("ref")
@click.option("--prompt", "-p", required=True, help="The prompt.")
@click.option("--n-predict", "-n", default=128, show_default=True, type=click.IntRange(1, 1 << 20),
              help="Maximum tokens to generate.")
@click.option("--ctx", "n_ctx", default=2048, show_default=True,
              type=click.IntRange(MIN_CTX, 1 << 22),
              help="Context size (tokens); prompt + --n-predict must fit it.")
@click.option("--gpu-layers", default=0, show_default=True, type=click.IntRange(-1, 10_000),
              help="Layers to offload to a GPU (-1: all).")
@click.option("--temperature", default=0.8, show_default=True, type=click.FloatRange(0, 10))
# llama.cpp takes 0xFFFFFFFF (LLAMA_DEFAULT_SEED) as "random", and a negative seed wraps
# to it: both were a random seed without a word (found from outside)
@click.option("--seed", default=None, type=click.IntRange(0, 0xFFFFFFFE),
              help="Sampling seed, 0-4294967294 (default: random).")
@global_options
def run_cmd(ref: str, prompt: str, n_predict: int, n_ctx: int, gpu_layers: int,
            temperature: float, seed: int | None) -> None:
    """Generate from model REF, streaming tokens to stdout; tokens/s on stderr.

    With --json: one object at the end, {model, text, tokens, seconds, tokens_per_second}.
    """
    from blobstore.name import ModelName
    from catalog.bench import generate

    ctx = get_ctx()
    pieces: list[str] = []
    line_open = [False]  # the text's last line is not ended yet

    def out(text: str) -> None:
        if ctx.json:
            pieces.append(text)
            return
        sys.stdout.write(clean(text, keep="\n\t"))  # the model's text, not its escapes
        sys.stdout.flush()
        line_open[0] = not text.endswith("\n")

    store = ctx.store()
    name = ModelName.parse(ref)
    try:
        n, seconds = generate(store, name, prompt, n_predict=n_predict,
                              n_ctx=n_ctx, n_gpu_layers=gpu_layers, temperature=temperature,
                              seed=seed, on_text=out)
    except BaseException:
        # Ctrl-C (or an error) mid-text: end the text's line, so that the "error:" line
        # starts one of its own on a terminal (found from outside: "… can canerror:
        # interrupted"); a stdout that is gone is left alone
        if line_open[0]:
            with contextlib.suppress(OSError, ValueError):
                sys.stdout.write("\n")
                sys.stdout.flush()
        raise
    tps = (n - 1) / seconds if n > 1 and seconds > 0 else 0.0
    if ctx.json:
        print_json({"model": str(store.canonical_name(name)), "text": "".join(pieces),
                    "tokens": n, "seconds": seconds, "tokens_per_second": tps})
        return
    sys.stdout.write("\n")
    echo(f"{n} tokens, {tps:.1f} tokens/s", err=True)
