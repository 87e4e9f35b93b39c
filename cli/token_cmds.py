"""``token add|list|rm``: API tokens of ``blobctl serve --auth FILE`` (spec/serve.md,
"Access control"; spec/cli.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from cli.main import global_options
from cli.output import echo, get_ctx, iso, print_json, print_table

_AUTH_HELP = "The access file of 'blobctl serve --auth' (TOML, mode 0600; $BLOBCTL_AUTH)."


F = TypeVar("F", bound=Callable[..., Any])


def _auth_option(f: F) -> F:
    return click.option("--auth", "auth", required=True, envvar="BLOBCTL_AUTH",
                        metavar="FILE", type=click.Path(dir_okay=False, path_type=Path),
                        callback=lambda ctx, param, v: v.expanduser(),
                        help=_AUTH_HELP)(f)


@click.group("token")
@global_options
def token_cmd() -> None:
    """Manage the API tokens of 'blobctl serve --auth FILE'.

    A running server picks up changes to the file within a second.
    """


@token_cmd.command("add")
@click.argument("name")
@_auth_option
@click.option("--read", "read", multiple=True, metavar="PATTERN",
              help="Repositories the token may pull: 'library/*', 'team/**', "
                   "'hf.co/org/*', '**' (repeatable).")
@click.option("--push", "push", multiple=True, metavar="PATTERN",
              help="Repositories the token may push to and manage from the web page "
                   "(implies read; repeatable).")
@click.option("--tier", default="lite", show_default=True,
              type=click.Choice(["lite", "standard", "professional"], case_sensitive=False),
              help="The highest model tier the token may reach.")
@global_options
def token_add(name: str, auth: Path, read: tuple[str, ...], push: tuple[str, ...],
              tier: str) -> None:
    """Create a token and print it (shown only this once; the file keeps its sha256).

    Creates FILE (mode 0600) if needed. Use the token as 'Authorization: Bearer TOKEN'
    or as the password of Basic auth with any user name (skopeo --creds x:TOKEN).
    """
    from registry_server.auth import add_token

    token = add_token(auth, name, read=list(read), push=list(push), tier=tier)
    if get_ctx().json:
        print_json({"name": name, "token": token})
        return
    click.echo(token)
    if not read and not push:
        echo(f"warning: token {name!r} has no --read or --push pattern: it can only "
             "authenticate", err=True)
    echo(f"token {name!r} added to {auth}; it is not shown again", err=True)


@token_cmd.command("list")
@_auth_option
@global_options
def token_list(auth: Path) -> None:
    """List tokens: name, tier, patterns, creation time (never the tokens or hashes)."""
    from registry_server.auth import list_tokens

    entries = list_tokens(auth)
    if get_ctx().json:
        print_json([{"name": e.name, "tier": e.rights.tier,
                     "read": [p.text for p in e.rights.read],
                     "push": [p.text for p in e.rights.push],
                     "created": iso(e.created.timestamp()) if e.created else None}
                    for e in entries])
        return
    print_table(["NAME", "TIER", "READ", "PUSH", "CREATED"],
                [[e.name, e.rights.tier, ",".join(p.text for p in e.rights.read) or "-",
                  ",".join(p.text for p in e.rights.push) or "-",
                  (iso(e.created.timestamp()) if e.created else None) or "-"] for e in entries])


@token_cmd.command("rm")
@click.argument("name")
@_auth_option
@global_options
def token_rm(name: str, auth: Path) -> None:
    """Remove a token; a running server refuses it (and bearer tokens issued for it)
    within a second."""
    from registry_server.auth import remove_token

    remove_token(auth, name)
    if get_ctx().json:
        print_json({"name": name, "removed": True})
    else:
        echo(f"removed token {name!r}")
