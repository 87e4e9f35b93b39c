"""Moving models: export, import (GGUF, OCI archives, HF cache), push, link
(spec/cli.md, spec/archive.md)."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import click

from cli.main import global_options
from cli.output import echo, get_ctx, print_json, warn


def _lines(ctx_json: bool, quiet: bool = False) -> Any:
    """Progress callback: JSON lines on stdout with --json, plain lines on stderr."""
    from cli.pull_cmds import _Progress

    if ctx_json:
        return _Progress("json")
    if quiet:
        return _Progress("quiet")
    return _Progress("tty" if sys.stderr.isatty() else "plain")


# ---------------------------------------------------------------------- export
@click.command("export")
@click.argument("refs", nargs=-1, required=True)
@click.option("-o", "--output", "output", required=True, metavar="FILE",
              help="FILE.tar, FILE.tar.zst, DIR/ for a folder, or - for stdout "
                   "(with --format).")
@click.option("--format", "fmt", type=click.Choice(["tar", "tar.zst", "dir"]),
              help="Archive format (default: from the output name).")
@click.option("--zstd-level", default=3, show_default=True, type=click.IntRange(1, 19),
              help="zstd compression level for .tar.zst.")
@global_options
def export_cmd(refs: tuple[str, ...], output: str, fmt: str | None, zstd_level: int) -> None:
    """Write models as an OCI image layout (.tar, .tar.zst or a folder)."""
    from blobstore.archive import export_models
    from blobstore.name import ModelName
    from blobstore.units import human_bytes

    ctx = get_ctx()
    names = [ModelName.parse(r) for r in refs]
    dest: str | int = output
    if output == "-":  # spec/cli.md: the archive streams to stdout
        if ctx.json:
            raise click.UsageError("--json and -o - would both write to stdout")
        if fmt not in ("tar", "tar.zst"):
            from blobstore.errors import InvalidInput

            if fmt == "dir":  # (found from outside: "needs its format" with one given)
                raise InvalidInput("a folder (--format dir) cannot be streamed to stdout "
                                   "(-o -)", hint="give a folder with -o DIR/, or stream "
                                                  "--format tar or --format tar.zst")
            raise InvalidInput("-o - streams the archive to stdout and needs its format",
                               hint="add --format tar or --format tar.zst")
        sys.stdout.flush()
        dest = sys.stdout.fileno()
    store = ctx.store(create=False)
    progress = _lines(False, quiet=ctx.json)  # stdout stays one JSON document
    try:
        r = export_models(store, names, dest, format=fmt, zstd_level=zstd_level,
                          progress=progress)
    finally:
        progress.finish()
    if r.path is None:  # stdout holds the archive: the summary goes to stderr
        click.echo(f"exported {len(r.models)} model(s), {r.blobs} blobs "
                   f"({human_bytes(r.bytes_in)}) to stdout ({r.format}, "
                   f"{human_bytes(r.bytes_out)}) in {r.seconds:.1f}s", err=True)
        return
    if ctx.json:
        print_json({"path": str(r.path), "format": r.format,
                    "models": [{"name": str(n), "digest": str(d)} for n, d in r.models],
                    "blobs": r.blobs, "bytes_in": r.bytes_in, "bytes_out": r.bytes_out,
                    "seconds": round(r.seconds, 3)})
        return
    echo(f"exported {len(r.models)} model(s), {r.blobs} blobs "
         f"({human_bytes(r.bytes_in)}) to {r.path} ({r.format}, "
         f"{human_bytes(r.bytes_out)}) in {r.seconds:.1f}s")


# ---------------------------------------------------------------------- import
def _one_mode(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """--copy, --hardlink and --move: at most one (the last one silently winning made
    ``--copy --move`` unlink the source). The choice is ``ctx.meta["blobctl.mode"]``."""
    if not value:
        return
    mode = param.name
    prev = ctx.meta.get("blobctl.mode")
    if prev is not None and prev != mode:
        raise click.UsageError(f"--{prev} and --{mode} exclude each other: give one")
    ctx.meta["blobctl.mode"] = mode


@click.command("import")
@click.argument("file", required=False, type=click.Path(path_type=Path))
@click.option("--name", "ref", metavar="REF",
              help="Model name (a GGUF; or an archive holding exactly one model).")
@click.option("--hf-cache", "hf_cache", is_flag=False, flag_value="", default=None,
              metavar="[DIR]", help="Adopt the GGUF files of a Hugging Face hub cache "
              "(default $HF_HUB_CACHE, $HF_HOME/hub, ~/.cache/huggingface/hub).")
@click.option("--hardlink", "hardlink", is_flag=True, expose_value=False, callback=_one_mode,
              help="Hardlink instead of copy.")
@click.option("--move", "move", is_flag=True, expose_value=False, callback=_one_mode,
              help="Move the file into the store.")
@click.option("--copy", "copy", is_flag=True, expose_value=False, callback=_one_mode,
              help="Copy (GGUF default).")
@click.option("--template", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="File with the prompt template (Go template).")
@click.option("--system", help="System prompt text.")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Model parameter (repeatable), e.g. --param temperature=0.7.")
@click.option("--license", "license_file",
              type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="File with the model's license text.")
@global_options
def import_cmd(file: Path | None, ref: str | None,
               hf_cache: str | None, template: Path | None,
               system: str | None, params: tuple[str, ...],
               license_file: Path | None) -> None:
    """Import a GGUF file (--name REF), an OCI image layout (FILE.tar, FILE.tar.zst,
    DIR; detected by content), or a Hugging Face cache (--hf-cache)."""
    mode: str | None = click.get_current_context().meta.get("blobctl.mode")
    from blobstore.archive import detect_archive

    if hf_cache is not None:
        if file is not None:
            raise click.UsageError("give either FILE or --hf-cache, not both")
        if ref or template or system or params or license_file or mode in ("move",):
            raise click.UsageError("--hf-cache takes only --copy or --hardlink (names come "
                                   "from the cache)")
        _adopt(hf_cache or None, mode)
        return
    if file is None:
        raise click.UsageError("missing FILE (or --hf-cache)")
    if not os.path.lexists(file):  # whatever its name says it is (spec/cli.md: exit 3)
        from blobstore.errors import NotFound

        raise NotFound(f"{file}: no such file", hint="check the path")
    fmt = detect_archive(file)
    if fmt is not None:
        if template or system or params or license_file or mode:
            raise click.UsageError("--template/--system/--param/--license and the copy "
                                   "modes apply to GGUF files, not to archives")
        _import_archive(file, ref)
        return
    if file.is_dir():
        from blobstore.errors import InvalidInput

        raise InvalidInput(f"{file} is a folder but not an OCI image layout (no oci-layout)",
                           hint="for a Hugging Face cache use: blobctl import --hf-cache DIR")
    if ref is None:
        _not_gguf(file)
        raise click.UsageError("a GGUF file needs --name REF")
    from cli.store_cmds import import_gguf_file

    import_gguf_file(file, ref, mode or "copy", template, system, params, license_file)


def _not_gguf(file: Path) -> None:
    """Raise InvalidInput (exit 4) saying what ``file``, which is no archive, is not,
    unless it is a GGUF. Opens nothing but a regular file (a FIFO could block)."""
    from blobstore.archive.common import file_kind
    from blobstore.errors import InvalidInput
    from blobstore.gguf import MAGIC

    hint = ("blobctl imports a GGUF file (with --name REF), an OCI image layout as a "
            ".tar, a .tar.zst or a folder, or a Hugging Face cache (--hf-cache)")
    what = "an OCI image layout (.tar, .tar.zst or a folder with oci-layout)"
    try:
        mode = file.stat().st_mode
        if not stat.S_ISREG(mode):
            raise InvalidInput(f"{file} is {file_kind(mode)}, not a GGUF file or {what}",
                               hint=hint)
        with file.open("rb") as f:
            head = f.read(512)
    except OSError:
        return  # the GGUF import says what is wrong
    if head[:4] == MAGIC:
        return
    if head[:2] == b"\x1f\x8b":
        raise InvalidInput(f"{file} is gzip-compressed: not a GGUF file or {what}",
                           hint="blobctl reads a .tar or a .tar.zst: decompress it "
                                "(gunzip), or export it again as FILE.tar.zst")
    if head[257:262] == b"ustar":  # (a whole block would have been read as a tar)
        raise InvalidInput(f"{file} is a tar archive cut short ({len(head)} bytes, less "
                           "than one 512-byte block): not a GGUF file or " + what,
                           hint="copy it again")
    raise InvalidInput(f"{file} is not a GGUF file or {what}", hint=hint)


def _import_archive(file: Path, ref: str | None) -> None:
    from blobstore.archive import ArchiveDamaged, ArchiveImportResult, import_archive
    from blobstore.errors import BlobctlError, InvalidInput
    from blobstore.name import ModelName
    from blobstore.units import human_bytes

    ctx = get_ctx()
    name = ModelName.parse(ref) if ref is not None else None
    store = ctx.store()
    progress = _lines(ctx.json)
    error: BlobctlError | None = None
    try:
        r: ArchiveImportResult = import_archive(store, file, name=name, progress=progress)
    except ArchiveDamaged as exc:
        if exc.result is None:
            raise
        error, r = exc, exc.result
    finally:
        progress.finish()
    if error is None and not r.models:
        # (found from outside: an archive whose only model has no ref name, as skopeo's
        # `oci:DIR` writes it, printed "success", one warning and exit 0, importing nothing)
        kinds = {s.kind for s in r.skipped}
        hint = None
        if name is None and "no-name" in kinds:
            hint = ("an archive without ref names (e.g. skopeo's oci:DIR) needs --name REF "
                    "for its one model")
        elif name is None and "bad-name" in kinds:
            hint = ("its ref names are not model names (host/ns/repo:tag); --name REF "
                    "names the model of a one-model archive")
        error = InvalidInput(
            f"no model imported from {file}" + (f" ({len(r.skipped)} entr"
                                                 f"{'y' if len(r.skipped) == 1 else 'ies'} "
                                                 "skipped)" if r.skipped else
                                                 ": it holds none"),
            hint=hint)
    if ctx.json:
        click.echo(json.dumps({
            "status": "error" if error else "success", "format": r.format,
            "models": [{"name": str(m.name), "digest": str(m.digest), "size": m.size}
                       for m in r.models],
            "skipped": [{"ref": s.ref, "reason": s.reason, "kind": s.kind,
                         "damaged": s.damaged}
                        for s in r.skipped],
            "blobs_added": r.blobs_added, "blobs_present": r.blobs_present,
            "bytes_read": r.bytes_read, "seconds": round(r.seconds, 3)},
            separators=(",", ":")))
    else:
        for m in r.models:
            echo(f"imported '{m.name.display()}' ({m.digest.short}, "
                 f"{human_bytes(m.size)})")
        for s in r.skipped:
            warn(f"skipped {s.ref}: {s.reason}")
    if error is not None:
        raise error


def _adopt(cache: str | None, mode: str | None) -> None:
    from blobstore.caches import CacheDamaged, adopt_hf_cache
    from blobstore.units import human_bytes

    ctx = get_ctx()
    store = ctx.store()
    error: CacheDamaged | None = None
    try:
        r = adopt_hf_cache(store, Path(cache).expanduser() if cache else None,
                           mode="copy" if mode == "copy" else "hardlink")
    except CacheDamaged as exc:
        error, r = exc, exc.result
    if ctx.json:
        print_json({"status": "error" if error else "success", "cache": str(r.cache),
                    "models": [{"name": str(m.name), "digest": str(m.digest), "size": m.size,
                                "files": [str(f) for f in m.files], "linked": m.linked}
                               for m in r.models],
                    "skipped": [{"file": str(s.file), "reason": s.reason}
                                for s in r.skipped]})
    else:
        for m in r.models:
            how = "hardlinked" if m.linked else "copied"
            echo(f"adopted '{m.name.display()}' ({m.digest.short}, "
                 f"{human_bytes(m.size)}, {how})")
        for s in r.skipped:
            warn(f"skipped {s.file}: {s.reason}")
    if error is not None:
        raise error


# ---------------------------------------------------------------------- push
@click.command("push")
@click.argument("ref")
@click.argument("dest")
@click.option("--insecure", is_flag=True, help="Allow plain http and unverified TLS.")
@click.option("--chunk-size", default="64M", show_default=True, metavar="SIZE",
              help="Blobs larger than this are uploaded in PATCH chunks of this size "
                   "(64K to 1G).")
@click.option("--retries", default=7, show_default=True, metavar="N",
              type=click.IntRange(0, 50), help="Retries per request on transient errors.")
@click.option("--index/--no-index", "index", default=None,
              help="Attach a chunk index for delta updates (spec/delta.md) to every layer / "
                   "to none [default: to layers of 8 MiB or more].")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@global_options
def push_cmd(ref: str, dest: str, insecure: bool, chunk_size: str, retries: int,
             index: bool | None, quiet: bool) -> None:
    """Push model REF to DEST (host[:port]/ns/repo[:tag]; the tag defaults to REF's)."""
    from blobstore.name import ModelName
    from blobstore.units import parse_size
    from registry_client.push import PushOptions, push
    from registry_client.retry import RetryPolicy

    ctx = get_ctx()
    name = ModelName.parse(ref)
    chunk = parse_size(chunk_size)
    if not 64 << 10 <= chunk <= 1 << 30:
        raise click.BadParameter("must be between 64K and 1G", param_hint="--chunk-size")
    store = ctx.store(create=False)
    progress = _lines(ctx.json, quiet)
    try:
        r = push(name, dest, store=store, progress=progress,
                 options=PushOptions(insecure=insecure, chunk_size=chunk, index=index,
                                     retry=RetryPolicy(attempts=retries + 1)))
    finally:
        progress.finish()
    if ctx.json:
        click.echo(json.dumps({
            "status": "success", "name": str(r.name), "destination": str(r.destination),
            "digest": str(r.manifest.digest), "size": r.manifest.size,
            "blobs_total": r.blobs_total, "blobs_present": r.blobs_present,
            "blobs_mounted": r.blobs_mounted, "blobs_uploaded": r.blobs_uploaded,
            "bytes_uploaded": r.bytes_uploaded, "bytes_resumed": r.bytes_resumed,
            "index_digest": str(r.index_digest) if r.index_digest else None,
            "index_blobs": r.index_blobs, "index_bytes": r.index_bytes,
            "seconds": round(r.seconds, 3)}, separators=(",", ":")))
    elif not quiet:
        echo(f"pushed '{name.display()}' to {r.destination} "
             f"({r.manifest.digest.short}; {r.blobs_uploaded} uploaded, "
             f"{r.blobs_present} present, {r.blobs_mounted} mounted)", err=True)


# ---------------------------------------------------------------------- link
@click.command("link")
@click.argument("refs", nargs=-1)
@click.option("--to", "to", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder of the link farm.")
@click.option("--layout", "layout", type=click.Choice(["lmstudio", "flat"]),
              default="lmstudio", show_default=True,
              help="lmstudio: <publisher>/<repo>/<file>.gguf; flat: <name>-<tag>.gguf.")
@click.option("--hardlink", is_flag=True, help="Hardlinks instead of symlinks.")
@click.option("--prune", is_flag=True, help="Remove links whose blob is gone.")
@click.option("--replace", is_flag=True,
              help="Repoint a link blobctl made for another model at this one.")
@global_options
def link_cmd(refs: tuple[str, ...], to: Path, layout: str, hardlink: bool,
             prune: bool, replace: bool) -> None:
    """Make a folder of links to models' GGUF files (for LM Studio and other tools)."""
    from blobstore.linkfarm import link_models, prune_links
    from blobstore.name import ModelName

    ctx = get_ctx()
    if prune:
        if refs:
            raise click.UsageError("--prune takes no models")
        pruned = prune_links(to, ctx.store(create=False))
        if ctx.json:
            print_json({"removed": [str(p) for p in pruned.removed],
                        "relinked": [str(p) for p in pruned.relinked],
                        "skipped": [{"path": str(s.path), "reason": s.reason}
                                    for s in pruned.skipped]})
        else:
            for p in pruned.removed:
                echo(f"removed {p}")
            for p in pruned.relinked:
                echo(f"relinked {p}")
            for s in pruned.skipped:
                warn(f"skipped {s.path}: {s.reason}")
        return
    if not refs:
        raise click.UsageError("missing REF (or --prune)")
    names = [ModelName.parse(r) for r in refs]
    store = ctx.store(create=False)
    links = link_models(store, names, to, layout=layout, hardlink=hardlink,
                        replace_others=replace)
    if ctx.json:
        print_json({"links": [{"name": str(x.name), "path": str(x.path),
                               "target": str(x.target), "kind": x.kind} for x in links]})
    else:
        for x in links:
            echo(f"{x.path} -> {x.target}")

