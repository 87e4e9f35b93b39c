"""``GET /token``: the docker token endpoint (spec/serve.md, "Access control").

Docker-style clients answer a ``Bearer realm=…/token,service=blobctl,scope=…`` challenge
by calling ``GET /token?service=blobctl&scope=repository:<repo>:pull[,push]`` with Basic
credentials (the API token as the password; skopeo ``--creds x:TOKEN``), or none. The
answer is a short-lived signed token granting, of the scopes asked for, only those the
caller has; the registry routes then accept it as ``Authorization: Bearer``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from registry_server.auth.patterns import canonical_repository
from registry_server.auth.policy import AuthPolicy
from registry_server.context import ServerContext

__all__ = ["BASIC_CHALLENGE", "parse_scopes", "routes", "token_endpoint"]

# /token's own challenge, and the one to send browsers (the web page): they prompt for
# Basic credentials (any user, the token as password) but cannot answer Bearer.
BASIC_CHALLENGE = 'Basic realm="blobctl"'
_MAX_SCOPES = 32


def parse_scopes(values: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """``repository:NAME:ACTIONS`` items (space-separated, several ``scope`` parameters)
    as (canonical repository, actions). NAME may hold a ``host:port``; other resource
    types (``registry:catalog:*``) and unknown actions are ignored."""
    out: list[tuple[str, tuple[str, ...]]] = []
    for value in values:
        for item in value.split():
            kind, _, rest = item.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind != "repository" or not name or len(name) > 512:
                continue
            acts = {a.strip() for a in actions.split(",")}
            if "*" in acts:
                acts |= {"pull", "push"}
            wanted = tuple(a for a in ("pull", "push") if a in acts)
            if wanted:
                out.append((canonical_repository(name), wanted))
            if len(out) >= _MAX_SCOPES:
                return out
    return out


def _unauthorized(message: str) -> Response:
    return JSONResponse({"errors": [{"code": "UNAUTHORIZED", "message": message}]},
                        status_code=401,
                        headers={"WWW-Authenticate": BASIC_CHALLENGE,
                                 "Cache-Control": "no-store"})


def token_endpoint(policy: AuthPolicy) -> Callable[[Request], Awaitable[Response]]:
    async def token(request: Request) -> Response:
        caller = policy.identify(request.headers)
        if caller is None:
            return _unauthorized("invalid credentials")
        if caller.entry is None and caller.bearer is None and not policy.anonymous_allowed():
            return _unauthorized("credentials required")
        scopes = parse_scopes(request.query_params.getlist("scope"))
        text, tok = policy.issue(caller, scopes)
        issued = dt.datetime.fromtimestamp(tok.issued_at, dt.timezone.utc)
        return JSONResponse({"token": text, "access_token": text,
                             "expires_in": tok.expires_at - tok.issued_at,
                             "issued_at": issued.strftime("%Y-%m-%dT%H:%M:%SZ")},
                            headers={"Cache-Control": "no-store"})

    return token


def routes(ctx: ServerContext) -> list[BaseRoute]:
    """The auth routes to mount in the app: ``/token`` when the server runs with an
    :class:`AuthPolicy`, nothing otherwise."""
    if not isinstance(ctx.policy, AuthPolicy):
        return []
    return [Route("/token", token_endpoint(ctx.policy), methods=["GET"], name="token")]
