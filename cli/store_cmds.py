"""Store commands: list, show, path, rm, import, verify, pin, unpin, du (spec/cli.md)."""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from cli.main import global_options
from cli.output import (
    EXIT_VERIFY_FAILED,
    byte_progress,
    clean,
    echo,
    get_ctx,
    iso,
    print_json,
    print_table,
    warn,
)

if TYPE_CHECKING:
    from blobstore.manifest import Descriptor, Manifest
    from blobstore.name import ModelName
    from blobstore.store import ModelEntry, Store


def _name(ref: str) -> ModelName:
    from blobstore.name import ModelName

    return ModelName.parse(ref)


def _effective_last_used(entry: ModelEntry) -> float | None:
    return entry.state.last_used


def _desc_json(d: Descriptor) -> dict[str, Any]:
    return {"mediaType": d.mediaType, "digest": str(d.digest), "size": d.size}


def _config_details(store: Store, manifest: Manifest) -> dict[str, Any]:
    """Format/family/params/quantisation from the config blob, as ``ollama show``."""
    from blobstore.decoding import decode_any

    try:
        with store.open_blob(manifest.config.digest) as f:
            raw = f.read(1 << 20)
        cfg = decode_any(raw)
    except Exception:  # noqa: BLE001  (a missing or odd config only loses details)
        return {}
    if not isinstance(cfg, dict):
        return {}
    return {
        "format": cfg.get("model_format", ""),
        "family": cfg.get("model_family", ""),
        "families": cfg.get("model_families") or [],
        "parameter_size": cfg.get("model_type", ""),
        "quantization_level": cfg.get("file_type", ""),
    }


# ---------------------------------------------------------------------- list
@click.command("list")
@global_options
def list_cmd() -> None:
    """List models: NAME, ID, SIZE, LAST USED, PINNED (like 'ollama list')."""
    from blobstore.units import human_bytes, human_time_ago

    ctx = get_ctx()
    store = ctx.store(create=False)
    entries = store.list_models()
    if ctx.json:
        print_json([
            {
                "name": str(e.name),
                "display_name": e.name.display(),
                "digest": str(e.summary.digest) if e.summary else None,
                "id": e.summary.digest.short if e.summary else None,
                "size": e.summary.size if e.summary else None,
                "modified_at": iso(e.mtime),
                "last_used": iso(e.last_used),
                "use_count": e.state.use_count,
                "pinned": e.pinned,
                **({"error": e.error} if e.error else {}),
            }
            for e in entries
        ])
        return
    now = time.time()
    rows = []
    for e in entries:
        if e.summary is None:
            warn(f"skipping {e.name.display()}: invalid manifest ({e.error})")
            continue
        last = e.last_used
        rows.append([
            e.name.display(),
            e.summary.digest.short,
            human_bytes(e.summary.size),
            human_time_ago(now - last) if last is not None else "never",
            "yes" if e.pinned else "",
        ])
    print_table(["NAME", "ID", "SIZE", "LAST USED", "PINNED"], rows)


# ---------------------------------------------------------------------- show
@click.command("show")
@click.argument("ref")
@global_options
def show_cmd(ref: str) -> None:
    """Show a model's digest, layers, details and GGUF path. Records a use."""
    from blobstore.units import human_bytes

    ctx = get_ctx()
    store = ctx.store(create=False)
    name = store.canonical_name(_name(ref))
    manifest = store.get_manifest(name)
    # the model's ID is its manifest file's (as `list` and `ollama list` show it), also
    # for an Ollama manifest list, whose runner's manifest is shown (found from outside)
    file_id = store.manifest_file_digest(name) or manifest.digest
    layer = manifest.model_layer()
    model_path = store.layout.existing_blob(layer.digest) if layer else None
    details = _config_details(store, manifest)
    store.record_use(name)
    st = store.state.get(name) if store.state is not None else None
    missing = [str(d) for d in store.missing_blobs(manifest)]
    if ctx.json:
        print_json({
            "name": str(name),
            "display_name": name.display(),
            "digest": str(file_id),
            "id": file_id.short,
            "media_type": manifest.media_type,
            "size": manifest.size,
            "config": _desc_json(manifest.config),
            "layers": [_desc_json(d) for d in manifest.layers],
            "model_path": str(model_path) if model_path else None,
            "details": details,
            "pinned": bool(st and st.pinned),
            "last_used": iso(st.last_used if st else None),
            "use_count": st.use_count if st else 0,
            "missing_blobs": missing,
        })
        return
    rows = [
        ("name", name.display()),
        ("full name", str(name)),
        ("id", file_id.short),
        ("digest", str(file_id)),
        ("size", human_bytes(manifest.size)),
    ]
    for key, label in (("format", "format"), ("family", "family"),
                       ("parameter_size", "parameters"),
                       ("quantization_level", "quantization")):
        if details.get(key):
            rows.append((label, str(details[key])))
    rows.append(("pinned", "yes" if st and st.pinned else "no"))
    rows.append(("model path", str(model_path) if model_path else "-"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        echo(f"  {k:<{width}}  {clean(v)}")  # a GGUF's strings, as data
    echo("  layers:")
    for d in manifest.layers:
        kind = d.mediaType.rsplit(".", 1)[-1]
        echo(f"    {kind:<10} {d.digest}  {human_bytes(d.size)}")
    if missing:
        warn(f"{len(missing)} blob(s) of this model are missing; run 'blobctl verify'")


# ---------------------------------------------------------------------- path
@click.command("path")
@click.argument("ref")
@global_options
def path_cmd(ref: str) -> None:
    """Print the path of a model's GGUF file (for llama.cpp etc.). Records a use.

    A split GGUF (N model layers): its first part's path, and a warning that llama.cpp
    finds the others only by their split names (`--json` lists every part)."""
    from blobstore.errors import InvalidInput

    ctx = get_ctx()
    store = ctx.store(create=False)
    name = _name(ref)
    resolved = store.resolve(name)
    if resolved.model_path is None:
        raise InvalidInput(f"model {name.display()!r} has no GGUF model layer")
    parts = resolved.model_paths
    if ctx.json:
        out: dict[str, object] = {
            "name": str(store.canonical_name(name)),
            "model_path": str(resolved.model_path),
            "projector_paths": [str(p) for p in resolved.projector_paths],
            "adapter_paths": [str(p) for p in resolved.adapter_paths],
        }
        if len(parts) > 1:  # (a one-file model's object is as it always was)
            out["model_paths"] = [str(p) for p in parts]
        print_json(out)
        return
    click.echo(str(resolved.model_path))
    if len(parts) > 1:
        warn(f"{name.display()} is a split GGUF of {len(parts)} parts; this is the first: "
             f"llama.cpp loads it only with the others beside it, named NAME-0000i-of-"
             f"{len(parts):05d}.gguf ('blobctl link' makes them; 'blobctl run' and "
             f"'bench' load it as it is; --json lists every part)")


# ---------------------------------------------------------------------- rm
@click.command("rm")
@click.argument("refs", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="Also remove pinned models.")
@global_options
def rm_cmd(refs: tuple[str, ...], force: bool) -> None:
    """Remove models: the manifest first, then blobs no other model uses."""
    from blobstore.errors import ModelNotFound, ModelPinned

    ctx = get_ctx()
    store = ctx.store(create=False)
    names = [_name(r) for r in refs]  # parse all first: a bad name removes nothing
    # names of the same manifest file (a:1, A:1, its full name; also on a file system
    # that ignores case) count once
    unique: dict[tuple[object, ...], ModelName] = {}
    for name in names:  # and check all first: an unknown or pinned one removes nothing
        path = store.find_manifest_path(name)
        try:  # (lstat: a manifests-v2/ link whose manifest blob is gone is removable)
            st = os.lstat(path) if path is not None else None
        except FileNotFoundError:
            st = None
        if st is None:
            raise ModelNotFound(name.display())
        if not force and store.is_pinned(name):
            raise ModelPinned(store.canonical_name(name).display())
        # (a manifests-v2/ name may be a hardlink or copy of the manifest's blob, whose
        # inode other names share: there, the entry is its folder and its name, compared
        # as names are, case-insensitively; found by review)
        assert path is not None
        key: tuple[object, ...] = (st.st_dev, st.st_ino)
        if store.layout.is_v2(path) and not stat.S_ISLNK(st.st_mode):
            folder = os.stat(path.parent)
            key = (folder.st_dev, folder.st_ino, path.name.lower())
        unique.setdefault(key, name)
    # the library enforces pins too (a model pinned meanwhile is refused)
    results = store.remove_models(list(unique.values()), force=force)
    if ctx.json:
        print_json({"removed": [
            {"name": str(r.name), "removed_blobs": [str(d) for d in r.removed_blobs],
             "freed_bytes": r.freed_bytes, "kept_shared": [str(d) for d in r.kept_shared],
             "kept_leased": [str(d) for d in r.kept_leased],
             "kept_in_use": [str(d) for d in r.kept_in_use]}
            for r in results
        ]})
        return
    from blobstore.units import human_bytes

    for r in results:
        kept = [f"{len(ds)} {why}" for ds, why in (
            (r.kept_shared, "shared"),
            (r.kept_leased, f"held by a running {' / '.join(r.leased_by) or 'command'}"),
            (r.kept_in_use, "in use by a running process")) if ds]
        extra = f", kept {', '.join(kept)}" if kept else ""
        echo(f"deleted '{r.name.display()}' (freed {human_bytes(r.freed_bytes)}{extra})")


# ---------------------------------------------------------------------- import
def _read_utf8(path: Path, option: str) -> str:
    """The text of ``path``, or InvalidInput (exit 4) when it is not UTF-8."""
    from blobstore.errors import InvalidInput

    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{option} {path}: not valid UTF-8 text (byte {exc.start})",
                           hint="save the file as UTF-8") from exc


def import_gguf_file(file: Path, ref: str, mode: str, template: Path | None,
                     system: str | None, params: tuple[str, ...],
                     license_file: Path | None) -> None:
    """``blobctl import FILE --name REF`` for a GGUF (the options are parsed by
    cli.transfer_cmds.import_cmd): import it as model REF, as 'ollama create' would."""
    from blobstore.importer import import_gguf, parse_params
    from blobstore.units import human_bytes

    ctx = get_ctx()
    name = _name(ref)
    parsed = parse_params(list(params))
    template_text = _read_utf8(template, "--template") if template else None
    license_text = _read_utf8(license_file, "--license") if license_file else None
    store = ctx.store()
    progress = byte_progress("copying", sys.stderr.isatty() and not ctx.json)
    result = import_gguf(
        store, file, name, mode=mode, template=template_text, system=system,
        params=parsed or None, license_text=license_text, progress=progress,
    )
    if mode == "move" and result.mode != "move":
        warn(f"{file} is the store's own file: imported without moving it ({result.mode})")
    if ctx.json:
        print_json({
            "name": str(result.name),
            "digest": str(result.manifest.digest),
            "id": result.manifest.digest.short,
            "size": result.manifest.size,
            "model_digest": str(result.model_digest),
            "mode": result.mode,
            "architecture": result.gguf.architecture,
            "parameter_count": result.gguf.parameter_count,
        })
    else:
        echo(f"imported '{result.name.display()}' ({result.manifest.digest.short}, "
             f"{human_bytes(result.manifest.size)}, {result.mode})")


# ---------------------------------------------------------------------- verify
@click.command("verify")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=1),
              help="Parallel hashing threads.")
@global_options
def verify_cmd(workers: int) -> None:
    """Rehash every blob; name corrupt and missing ones. Exit 5 if any is found."""
    from blobstore.units import human_bytes

    ctx = get_ctx()
    store = ctx.store(create=False)
    if not store.root.is_dir():  # a mistyped --store must not read as "ok"
        from blobstore.errors import NotFound

        raise NotFound(f"no store at {store.root}",
                       hint="pick the store with --store or BLOBCTL_STORE")
    progress = byte_progress("verifying", sys.stderr.isatty() and not ctx.json)
    report = store.verify(progress=progress, workers=workers)
    problems = [
        {"problem": p.problem, "digest": str(p.digest) if p.digest else None,
         "path": str(p.path) if p.path else None, "detail": p.detail, "models": p.models}
        for p in report.problems
    ]
    if ctx.json:
        print_json({"ok": report.ok, "blobs_checked": report.blobs_checked,
                    "bytes_checked": report.bytes_checked,
                    "manifests_checked": report.manifests_checked,
                    "seconds": round(report.seconds, 3), "problems": problems})
    else:
        for p in report.problems:
            what = p.digest or p.path
            used = f" (used by {', '.join(p.models)})" if p.models else ""
            echo(f"{p.problem}: {what}: {p.detail}{used}")
        echo(f"checked {report.blobs_checked} blobs ({human_bytes(report.bytes_checked)}), "
             f"{report.manifests_checked} manifests in {report.seconds:.1f}s: "
             f"{'ok' if report.ok else f'{len(report.problems)} problem(s)'}")
    if not report.ok:
        if not ctx.json:
            echo(f"error: verify found {len(report.problems)} problem(s)", err=True)
            kinds = {p.problem for p in report.problems}
            if kinds <= {"missing", "size"}:
                hint = ("pull or import the affected models again: a missing blob, or one "
                        "of the wrong size, is fetched again")
            elif "corrupt" in kinds:
                hint = ("'blobctl rm' every model that uses a corrupt blob, then pull or "
                        "import them again (a pull keeps a blob of the right size)")
            else:
                hint = ("fix or remove the files named above, then pull or import the "
                        "affected models again")
            echo(f"hint: {hint}", err=True)
        sys.exit(EXIT_VERIFY_FAILED)


# ---------------------------------------------------------------------- pin/unpin
def _pin(refs: tuple[str, ...], pinned: bool) -> None:
    ctx = get_ctx()
    store = ctx.store(create=False)
    names = [_name(r) for r in refs]
    # all checked first, as rm does: an unknown name changes nothing
    done = store.set_pinned_all(names, pinned)
    if ctx.json:
        print_json([{"name": str(n), "pinned": pinned} for n in done])
    else:
        for n in done:
            echo(f"{'pinned' if pinned else 'unpinned'} '{n.display()}'")


@click.command("pin")
@click.argument("refs", nargs=-1, required=True)
@global_options
def pin_cmd(refs: tuple[str, ...]) -> None:
    """Pin models: 'gc --max-size' never evicts a pinned model."""
    _pin(refs, True)


@click.command("unpin")
@click.argument("refs", nargs=-1, required=True)
@global_options
def unpin_cmd(refs: tuple[str, ...]) -> None:
    """Unpin models."""
    _pin(refs, False)


# ---------------------------------------------------------------------- du
@click.command("du")
@global_options
def du_cmd() -> None:
    """Disk usage: unique bytes on disk; per model, own vs shared bytes."""
    from blobstore.units import human_bytes

    ctx = get_ctx()
    store = ctx.store(create=False)
    r = store.disk_usage()
    if ctx.json:
        print_json({
            "total_bytes": r.total_bytes, "blob_count": r.blob_count,
            "referenced_bytes": r.referenced_bytes,
            "unreferenced_bytes": r.unreferenced_bytes, "ingest_bytes": r.ingest_bytes,
            "models": [{"name": str(m.name), "size": m.size, "own_bytes": m.own_bytes,
                        "shared_bytes": m.shared_bytes} for m in r.models],
        })
        return
    print_table(["NAME", "SIZE", "OWN", "SHARED"], [
        [m.name.display(), human_bytes(m.size), human_bytes(m.own_bytes),
         human_bytes(m.shared_bytes)] for m in r.models
    ])
    echo(f"\ntotal {human_bytes(r.total_bytes)} in {r.blob_count} blobs "
         f"({human_bytes(r.unreferenced_bytes)} unreferenced, "
         f"{human_bytes(r.ingest_bytes)} in unfinished downloads)")
