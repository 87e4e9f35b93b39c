"""``blobctl serve``: the store as an OCI registry (spec/serve.md, spec/cli.md)."""

from __future__ import annotations

import errno
import ipaddress
import socket
import sys
from pathlib import Path

import click

from cli.main import global_options
from cli.output import echo, get_ctx, warn

DEFAULT_LISTEN = "127.0.0.1:5050"


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``) → (host, port); raise click.BadParameter."""
    v6 = "is not HOST:PORT (an IPv6 address is written in brackets: [::1]:5050)"
    if text.count(":") > 1 and not text.startswith("["):  # ("::1": host ":", port 1)
        raise click.BadParameter(f"{text!r} {v6}", param_hint="--listen")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise click.BadParameter(f"{text!r} is not HOST:PORT", param_hint="--listen")
    if host.startswith("[") and host.endswith("]") and len(host) > 2:
        host = host[1:-1]
        bare_v6 = ":" not in host  # ([name]:PORT is not an IPv6 address either)
    else:
        bare_v6 = ":" in host or "[" in host or "]" in host
    if bare_v6:
        raise click.BadParameter(f"{text!r} {v6}", param_hint="--listen")
    if int(port) > 65535:
        raise click.BadParameter(f"port {port} is out of range", param_hint="--listen")
    return host, int(port)


class _ListenRefused(OSError):
    """The OS refused to bind the address: an OS error (exit 11) with a message."""

    def __init__(self, exc: OSError, listen: str) -> None:
        super().__init__(exc.errno, exc.strerror)
        self.message = f"cannot listen on {listen}: {exc.strerror or exc}"
        self.hint = ("another process listens there; pick another port (--listen HOST:0 "
                     "takes a free one)" if exc.errno == errno.EADDRINUSE else None)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command("serve")
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, metavar="HOST:PORT",
              help="Address to listen on (port 0: any free port).")
@click.option("--push", is_flag=True, help="Accept pushes (uploads, manifest PUT/DELETE).")
@click.option("--auth", "auth_file", type=click.Path(path_type=Path), metavar="FILE",
              callback=lambda ctx, param, v: v.expanduser() if v is not None else None,
              help="Access control: tokens, rights and tiers (TOML, see 'blobctl token').")
@click.option("--upstream", "upstreams", multiple=True, metavar="[HOST=]URL",
              help="Mirror misses from this registry (repeatable).")
@click.option("--insecure-upstream", is_flag=True, help="Allow plain-http upstreams.")
@click.option("--head-timeout", default=30.0, show_default=True, metavar="SECONDS",
              type=click.FloatRange(0.5, 3600),
              help="Close a connection whose request head (or web page form) is not "
                   "whole this long after it began waiting for one (408).")
@click.option("--send-timeout", default=60.0, show_default=True, metavar="SECONDS",
              type=click.FloatRange(0.5, 3600),
              help="Cut a response whose client takes less than 1 MiB of it in this "
                   "long (e.g. one that stopped reading).")
@global_options
def serve_cmd(listen: str, push: bool, auth_file: Path | None, upstreams: tuple[str, ...],
              insecure_upstream: bool, head_timeout: float, send_timeout: float) -> None:
    """Serve the store as an OCI registry (Ollama, skopeo, docker, blobctl pull).

    Prints one startup line with the bound address (with --json:
    {"event":"listening","url":...,"push":...}), an access log line per request on
    stderr, and stops cleanly on SIGTERM/SIGINT.
    """
    from registry_server.context import OpenAccess, Policy, ServeOptions, ServerContext
    from registry_server.server import bind, serve, url_of

    ctx = get_ctx()
    host, port = parse_listen(listen)
    if not is_loopback(host):
        if push and auth_file is None:
            raise click.UsageError(f"--push on a non-loopback address ({host}) needs --auth")
        if auth_file is None:
            warn(f"serving {host} without --auth: anyone who can reach it can read the store")
    from registry_server.mirror import mirror_for, parse_upstream

    mirrors = dict(parse_upstream(u, insecure=insecure_upstream) for u in upstreams)
    options = ServeOptions(host=host, port=port, push=push, auth_file=auth_file,
                           upstreams=mirrors, insecure_upstream=insecure_upstream,
                           head_timeout=head_timeout,
                           send_timeout=send_timeout)
    policy: Policy = OpenAccess()
    if auth_file is not None:
        from registry_server.auth import load_policy

        policy = load_policy(auth_file)  # a missing or invalid file stops the start
    if not (push or upstreams) and not ctx.resolved_store_path.is_dir():
        # read-only, no mirror: an empty registry from a mistyped --store, and its
        # folders made, helps nobody (found from outside); --push or a mirror fills one
        from blobstore.errors import NotFound

        raise NotFound(f"no store at {ctx.resolved_store_path}",
                       hint="pick the store with --store or BLOBCTL_STORE; --push serves "
                            "a new one")
    store = ctx.store(create=True)
    server_ctx = ServerContext(store, options, policy=policy)
    server_ctx.mirror = mirror_for(server_ctx)
    try:
        sock = bind(host, port)
    except socket.gaierror as exc:  # spec/serve.md, "Listen rules": exit 4
        from blobstore.errors import InvalidInput

        raise InvalidInput(f"cannot listen on {listen}: {host} does not resolve "
                           f"({exc.strerror or exc})",
                           hint="give an address of this machine, e.g. 127.0.0.1:5050") \
            from exc
    except OSError as exc:  # in use, not this machine's, a privileged port: exit 11
        raise _ListenRefused(exc, listen) from exc
    url = url_of(sock)
    options.port = sock.getsockname()[1]  # the real port when 0 was asked for
    if hasattr(policy, "fallback_origin"):  # AuthPolicy: challenges name this server
        policy.fallback_origin = url

    def started() -> None:
        if ctx.json:
            import msgspec

            line = msgspec.json.encode({"event": "listening", "url": url, "push": push})
            click.echo(line.decode())
        else:
            mode = "push enabled" if push else "read-only"
            echo(f"blobctl serve: listening on {url} ({mode}, store {store.root})")
        sys.stdout.flush()

    serve(server_ctx, sock, on_started=started, head_timeout=head_timeout)
