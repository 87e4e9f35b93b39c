"""``blobctl index``: make (and push) the chunk index of a model (spec/delta.md)."""

from __future__ import annotations

from typing import Any

import click

from cli.main import global_options
from cli.output import echo, get_ctx, print_json, print_table


@click.command("index")
@click.argument("ref")
@click.option("--push", "dest", metavar="DEST",
              help="Attach the index to the model at DEST (host[:port]/ns/repo[:tag]; the "
                   "model must be there already, e.g. pushed by another tool).")
@click.option("--all-layers", is_flag=True,
              help="Index every layer, not only those of 8 MiB or more.")
@click.option("--insecure", is_flag=True, help="Allow plain http and unverified TLS.")
@click.option("--retries", default=7, show_default=True, metavar="N",
              type=click.IntRange(0, 50), help="Retries per request on transient errors.")
@global_options
def index_cmd(ref: str, dest: str | None, all_layers: bool, insecure: bool,
              retries: int) -> None:
    """Make the chunk index of local model REF's large layers (cached in the store), and
    with --push attach it to the model in a registry, for delta updates."""
    import time

    from blobstore.errors import ModelNotFound
    from blobstore.name import ModelName
    from blobstore.units import human_bytes
    from registry_client.client import RegistryClient
    from registry_client.delta.artifact import push_indexes, require_subject
    from registry_client.delta.local import local_index
    from registry_client.delta.plan import MIN_BLOB
    from registry_client.errors import RemoteNotFound
    from registry_client.push import parse_destination
    from registry_client.retry import RetryPolicy

    ctx = get_ctx()
    name = ModelName.parse(ref)
    store = ctx.store(create=False)
    try:  # the local model only: never a pull (a real model is gigabytes)
        manifest = store.get_manifest(name)
    except ModelNotFound as exc:
        exc.hint = (f"index works on a model in this store: pull it first "
                    f"(blobctl pull {ref}), or see 'blobctl list'")
        raise
    rows: list[dict[str, Any]] = []
    indexes = []
    seen = set()
    for layer in manifest.layers:
        if layer.digest in seen or not (all_layers or layer.size >= MIN_BLOB):
            continue
        seen.add(layer.digest)
        t0 = time.monotonic()
        idx = local_index(store, layer.digest, layer.size)
        assert idx is not None
        indexes.append(idx)
        n = len(idx.encode())
        rows.append({"digest": str(layer.digest), "size": layer.size, "chunks": len(idx),
                     "index_bytes": n, "seconds": round(time.monotonic() - t0, 3)})
    pushed = None
    if dest is not None and indexes:
        target = parse_destination(dest, name)
        with RegistryClient(insecure=insecure,
                            retry=RetryPolicy(attempts=retries + 1)) as client:
            try:  # DEST's tag must name this very manifest (spec/cli.md, index)
                require_subject(client, target, manifest)
            except RemoteNotFound as exc:
                exc.hint = (f"push {ref} there first (blobctl push {ref} {target}), or name "
                            "the tag that holds it")
                raise
            pushed = push_indexes(client, target, manifest, indexes)
    if ctx.json:
        print_json({"name": str(name), "manifest": str(manifest.digest), "layers": rows,
                    "pushed": str(pushed) if pushed else None})
        return
    if not rows:
        echo(f"{name.display()} has no layer of {human_bytes(MIN_BLOB)} or more "
             "(--all-layers indexes every layer)", err=True)
        return
    print_table(["LAYER", "SIZE", "CHUNKS", "INDEX", "SHARE"],
                [[r["digest"][7:19], human_bytes(int(r["size"])), str(r["chunks"]),
                  human_bytes(int(r["index_bytes"])),
                  f"{100 * int(r['index_bytes']) / max(1, int(r['size'])):.3f}%"]
                 for r in rows])
    if pushed is not None:
        echo(f"pushed chunk index {pushed.short} for {manifest.digest.short} to "
             f"{parse_destination(dest or '', name)}", err=True)
