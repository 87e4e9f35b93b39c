"""Running the app under uvicorn (spec/serve.md, "Operations").

:func:`serve` binds the listening socket itself (so port 0 gives the real port before the
startup line is printed), runs uvicorn until SIGTERM/SIGINT, and shuts down cleanly: no
new connections, in-flight responses get ``grace`` seconds to finish and are then cut,
upload sessions are dropped (their temp files deleted), stream leases released. The
second signal forces the exit. Returns normally (exit status 0) after a signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable, Generator
from typing import Any, TextIO

import uvicorn

from registry_server.app import begin_shutdown, close_app, create_app
from registry_server.context import ServerContext
from registry_server.descriptors import AcceptFailures, ListenSocket, raise_fd_limit
from registry_server.headdeadline import DEFAULT_HEAD_TIMEOUT, with_head_deadline

__all__ = ["bind", "serve"]

log = logging.getLogger("blobctl.serve")

SHUTDOWN_GRACE = 10


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket bound to ``host:port`` (port 0: any free port)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, proto, _, addr = infos[0]
    # proto must be IPPROTO_TCP (getaddrinfo's), not 0: asyncio sets TCP_NODELAY only on
    # sockets whose proto says TCP, and accepted sockets inherit it. Without it, Nagle
    # held every keep-alive response's body until the client's delayed ACK (~40 ms).
    sock = ListenSocket(family, socket.SOCK_STREAM, proto)  # (descriptors.py: EMFILE)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None],
                 on_stopping: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_started = on_started
        self._on_stopping = on_stopping

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # a shortage of descriptors: one warning line every few seconds, not thousands
        asyncio.get_running_loop().set_exception_handler(AcceptFailures())
        await super().startup(sockets)
        if self.started:
            self._on_started()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._on_stopping()
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn re-raises the signal after a graceful shutdown (the process then dies of
        # it); blobctl exits 0 instead: the shutdown was asked for and went cleanly.
        old = {sig: signal.signal(sig, self.handle_exit)
               for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True


def stack_options(head_timeout: float = DEFAULT_HEAD_TIMEOUT) -> dict[str, Any]:
    """uvicorn's protocol and loop (spec/serve.md, "Server stack"): httptools with the
    zero-copy extension on asyncio's loop when httptools is installed, else uvicorn's
    defaults. ``BLOBCTL_SERVE_STACK`` = ``zerocopy`` | ``httptools`` | ``h11`` |
    ``httptools+uvloop`` overrides it (for the bench). The httptools stacks give each
    request head ``head_timeout`` seconds (:mod:`registry_server.headdeadline`)."""
    import importlib.util

    choice = os.environ.get("BLOBCTL_SERVE_STACK", "")
    has_httptools = importlib.util.find_spec("httptools") is not None
    if not choice:
        choice = "zerocopy" if has_httptools else "h11"
    if choice == "zerocopy":
        from registry_server.zerocopy import ZeroCopyHttpToolsProtocol

        return {"http": with_head_deadline(ZeroCopyHttpToolsProtocol, head_timeout),
                "loop": "asyncio"}
    if choice in ("httptools", "httptools+uvloop"):
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return {"http": with_head_deadline(HttpToolsProtocol, head_timeout),
                "loop": "uvloop" if choice.endswith("uvloop") else "asyncio"}
    return {"http": choice, "loop": "asyncio"}


def serve(ctx: ServerContext, sock: socket.socket, *, on_started: Callable[[], None],
          grace: int = SHUTDOWN_GRACE, access_log: bool = True,
          log_stream: TextIO | None = None, head_timeout: float = DEFAULT_HEAD_TIMEOUT,
          **uvicorn_options: Any) -> None:
    """Serve ``ctx`` on ``sock`` until a signal; ``uvicorn_options`` go to uvicorn.Config
    (e.g. ``http="httptools"``). A request head not whole within ``head_timeout`` seconds
    ends its connection (408)."""
    before, after = raise_fd_limit()  # spec/serve.md, "Operations": descriptors
    log.debug("open-files limit %d%s", after,
              f" (soft limit raised from {before} to the hard limit)" if after != before
              else "")
    app = create_app(ctx, access_log=access_log, log_stream=log_stream)
    config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False,
                            timeout_graceful_shutdown=grace, server_header=False,
                            **{**stack_options(head_timeout), **uvicorn_options})
    server = _Server(config, on_started, lambda: begin_shutdown(app))
    try:
        server.run(sockets=[sock])
    finally:
        close_app(app)
        sock.close()
