"""``blobctl``: the command line (spec/cli.md).

Commands are loaded lazily: ``blobctl --help`` imports click and this module only, so
it starts fast. The global options ``--store``, ``--json`` and ``--debug`` are accepted
before or after the subcommand.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, TypeVar

import click
from click.exceptions import NoArgsIsHelpError

from cli.output import (
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    Ctx,
    echo,
    end_progress_line,
    report_error,
    setup_logging,
)

F = TypeVar("F", bound=Callable[..., Any])

# name -> (module, attribute, one-line help). Help lives here so listing commands
# imports nothing.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "list": ("cli.store_cmds", "list_cmd", "List models in the store."),
    "show": ("cli.store_cmds", "show_cmd", "Show a model's manifest, layers and details."),
    "path": ("cli.store_cmds", "path_cmd", "Print the path of a model's GGUF file."),
    "rm": ("cli.store_cmds", "rm_cmd", "Remove models (and blobs no other model uses)."),
    "import": ("cli.transfer_cmds", "import_cmd",
               "Import a GGUF file, an OCI archive (.tar/.tar.zst/dir) or an HF cache."),
    "export": ("cli.transfer_cmds", "export_cmd",
               "Write models as an OCI image layout (.tar, .tar.zst, folder)."),
    "push": ("cli.transfer_cmds", "push_cmd", "Push a model to an OCI registry."),
    "index": ("cli.delta_cmds", "index_cmd",
              "Make (and push) a model's chunk index for delta updates."),
    "link": ("cli.transfer_cmds", "link_cmd",
             "Make a folder of links to models' GGUF files (LM Studio, flat)."),
    "verify": ("cli.store_cmds", "verify_cmd", "Rehash every blob; report damage."),
    "pin": ("cli.store_cmds", "pin_cmd", "Pin models so GC never evicts them."),
    "unpin": ("cli.store_cmds", "unpin_cmd", "Unpin models."),
    "du": ("cli.store_cmds", "du_cmd", "Disk usage: unique bytes, own vs shared per model."),
    "gc": ("cli.gc_cmds", "gc_cmd", "Remove unreferenced blobs; evict LRU models to a cap."),
    "config": ("cli.gc_cmds", "config_cmd", "Get or set store settings (e.g. max-size)."),
    "pull": ("cli.pull_cmds", "pull_cmd", "Pull a model from a registry."),
    "token": ("cli.token_cmds", "token_cmd", "Manage API tokens of 'serve --auth FILE'."),
    "catalog": ("cli.catalog_cmds", "catalog_cmd", "List the model catalog."),
    "recommend": ("cli.catalog_cmds", "recommend_cmd",
                  "Recommend the best catalog model for this machine."),
    "variants": ("cli.catalog_cmds", "variants_cmd",
                 "List a Hugging Face repo's GGUF quantizations."),
    "fetch": ("cli.catalog_cmds", "fetch_cmd", "Download a plain HTTP(S) GGUF as a model."),
    "outdated": ("cli.catalog_cmds", "outdated_cmd", "List models that changed upstream."),
    "update": ("cli.catalog_cmds", "update_cmd", "Pull newer manifests of local models."),
    "bench": ("cli.bench_cmds", "bench_cmd", "Benchmark a model with llama-cpp-python."),
    "compare": ("cli.bench_cmds", "compare_cmd", "Compare benchmark results of models."),
    "run": ("cli.bench_cmds", "run_cmd", "Generate text from a model (streams tokens)."),
    "serve": ("cli.serve_cmds", "serve_cmd", "Serve the store as an OCI registry."),
}


def _set_store(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value == "":  # (Path("") is the current folder: `--store "$UNSET"` made a store there)
        raise click.BadParameter("is empty; give the store's folder", ctx=ctx, param=param)
    if value is not None:
        _root_obj(ctx).store_path = Path(value).expanduser()


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        _root_obj(ctx).json = True


def _set_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        _root_obj(ctx).debug = True
        setup_logging(True)


def _root_obj(ctx: click.Context) -> Ctx:
    root = ctx.find_root()
    if not isinstance(root.obj, Ctx):
        root.obj = Ctx()
    return root.obj


def global_options(f: F) -> F:
    """Attach --store/--json/--debug to a command (also used on the group)."""
    f = click.option("--debug", is_flag=True, expose_value=False, is_eager=True,
                     callback=_set_debug, help="Show tracebacks and debug logs.")(f)
    f = click.option("--json", "json_", is_flag=True, expose_value=False,
                     callback=_set_json, help="Machine-readable JSON output.")(f)
    f = click.option("--store", metavar="DIR", expose_value=False, callback=_set_store,
                     help="Store folder (default: $BLOBCTL_STORE, $OLLAMA_MODELS, "
                          "~/.ollama/models).")(f)
    return f


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        spec = COMMANDS.get(cmd_name)
        if spec is None:
            return None
        module = importlib.import_module(spec[0])
        cmd = getattr(module, spec[1])
        assert isinstance(cmd, click.Command)
        return cmd

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in sorted(COMMANDS)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="blobctl", prog_name="blobctl")
@global_options
def cli() -> None:
    """blobctl: one content-addressed store for local AI models.

    The store is an Ollama models folder (blobs/ + manifests/), shared with Ollama.
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (systemd, docker, ``timeout``, a closed terminal): stopped the
    way Ctrl-C stops a command, so a pull writes its last checkpoint and leaves no owner
    file behind, and the exit is one ``error:`` line and 128 + the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminated(signum: int, frame: FrameType | None) -> None:
    # once: a second SIGTERM or SIGHUP (a closed terminal sends more than one; systemd
    # SIGTERM then SIGHUP) must not break off the cleanup the first one started
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    raise Terminated(signum)


def stop_on_termination() -> None:
    """Turn SIGTERM and SIGHUP into ``Terminated`` in the main thread, unless the signal
    is ignored (``nohup``) or handled by someone else already; and raise again a signal's
    exception that Python dropped (:func:`_dropped`)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, _terminated)
    sys.unraisablehook = _dropped


def _dropped(what: Any) -> None:
    """``sys.unraisablehook``: an exception raised where Python cannot pass it on (a
    finalizer such as the state database's close, a weakref callback such as one of
    importlib's, a ``__del__``) is printed as "Exception ignored" and dropped. For the
    ``KeyboardInterrupt`` or ``Terminated`` of a signal that would lose the signal: the
    command ran on to its end, exit 0, with SIGTERM ignored from then on (seen from
    outside, 3 in 700 rounds; a Ctrl-C in one of importlib's callbacks, found by the
    test of signals during error reports). It is raised again 5 ms later, by an alarm,
    in the code that runs then (not by a thread: starting one takes a lock the
    interrupted code may hold, found by review)."""
    exc = what.exc_value
    if not isinstance(exc, KeyboardInterrupt):
        sys.__unraisablehook__(what)
        return

    def again(_sig: int, _frame: object) -> None:
        raise exc

    signal.signal(signal.SIGALRM, again)
    signal.setitimer(signal.ITIMER_REAL, 0.005)


def _exit_interrupted() -> NoReturn:
    end_progress_line()
    echo("error: interrupted", err=True)
    sys.exit(EXIT_INTERRUPTED)


def _exit_terminated(exc: Terminated) -> NoReturn:
    end_progress_line()
    echo(f"error: terminated ({signal.Signals(exc.signum).name})", err=True)
    sys.exit(128 + exc.signum)


# spec/cli.md, "Exit codes": a reader that went away (`blobctl list | head -1`) ends the
# command quietly with the status a shell reports for a process killed by SIGPIPE.
EXIT_READER_GONE = 128 + signal.SIGPIPE


def _reader_gone(stream: Any) -> bool:
    """Whether ``stream`` is a pipe or socket whose reading end is closed (POLLERR on
    the writing end), not some other pipe a command wrote to."""
    import select

    try:
        poller = select.poll()
        poller.register(stream.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _fd, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _reader_went_away() -> NoReturn:
    """Stdout's reader closed it: nothing more to say to anyone (no ``error:`` line, which
    might go to the same pipe), exit 141. Stdout is pointed at /dev/null so that the
    final flush of what is still buffered cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    sys.exit(EXIT_READER_GONE)


def _invoke(args: list[str]) -> Any:
    """The command's return value, or the code of a ``ctx.exit(code)``.

    What ``click.Command.main`` does without its own error handling, which would print
    an empty line on stderr before every Ctrl-C (a progress line's end, when none may be
    open: ``main`` decides) and turn a closed stdout into exit 1.
    """
    try:
        with cli.make_context("blobctl", list(args)) as ctx:
            return cli.invoke(ctx)
    except click.exceptions.Exit as exc:
        return exc.exit_code


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI inside the one error boundary."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args[: args.index("--")] if "--" in args else "--debug" in args
    if not debug:
        setup_logging(False)
    try:
        rv = _invoke(args)
    except click.Abort as exc:  # (click turns a KeyboardInterrupt into this)
        if isinstance(exc.__cause__, Terminated):
            _exit_terminated(exc.__cause__)
        _exit_interrupted()
    except click.ClickException as exc:
        if isinstance(exc, NoArgsIsHelpError):  # (`blobctl`, `blobctl token`): a usage error
            # whose message is the whole help: printed as --help prints it, on stderr, and
            # exit 2, as click does (spec/cli.md)
            click.echo(exc.format_message(), err=True)
            sys.exit(EXIT_USAGE)
        echo(f"error: {' '.join(exc.format_message().split())}", err=True)
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            echo(f"hint: see '{exc.ctx.command_path} --help'", err=True)
        sys.exit(EXIT_USAGE if isinstance(exc, click.UsageError) else exc.exit_code)
    except Terminated as exc:
        _exit_terminated(exc)
    except KeyboardInterrupt:
        _exit_interrupted()
    except BrokenPipeError as exc:
        if not _reader_gone(sys.stdout):  # another pipe or socket: an error like any other
            _report(exc, debug)
        _reader_went_away()
    except Exception as exc:  # noqa: BLE001  (the CLI's one error boundary)
        _report(exc, debug)
    sys.exit(rv if isinstance(rv, int) else 0)


def _report(exc: BaseException, debug: bool) -> NoReturn:
    """Report a command's error and exit with its code; a SIGTERM or Ctrl-C meanwhile
    (reporting imports the error classes of every package: a tenth of a second) is that
    signal's exit, not a traceback and exit 1 (found from outside: ``timeout`` killing a
    command that was failing)."""
    try:
        code = report_error(exc, debug=debug)
    except Terminated as stop:
        _exit_terminated(stop)
    except KeyboardInterrupt:
        _exit_interrupted()
    sys.exit(code)


def run() -> NoReturn:
    """The ``blobctl`` command: ``main()``, then leave without tearing the heap down.

    After a big GC or list the interpreter would spend a tenth of a second freeing
    objects nobody will look at again. Everything that matters is already on disk
    (state commits, leases released, locks dropped, files fsynced) when ``main`` returns,
    so only the standard streams need flushing.

    Two imports are refused up front: httpcore imports ``trio`` whenever it is installed
    (only for async code under trio, which blobctl never runs) and httpx its own command
    line's ``pygments``; together ~0.1 s of CPU per command here (README, "Measured").
    """
    for unused in ("trio", "pygments"):
        sys.modules.setdefault(unused, None)  # type: ignore[arg-type]
    from cli import streams
    from cli.early import release

    streams.setup()  # stdout: output that must arrive; stderr: best-effort (cli/streams.py)

    release()  # (the start-up's guard: cli/early.py)
    stop_on_termination()
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            sys.stderr.write(f"{exc.code}\n")
    logging.shutdown()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader went away before the buffered output was written (list | true)
        code = code or EXIT_READER_GONE
    except streams.OutputError as exc:  # (>&-, >/dev/full): the output is lost
        if not code:
            code = report_error(exc, debug=False)
    except ValueError:  # closed by the command itself
        code = code or 1
    sys.stderr.flush()  # (never fails: cli/streams.py)
    os._exit(code)


if __name__ == "__main__":
    run()
