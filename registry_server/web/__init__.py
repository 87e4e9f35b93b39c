"""The web page of ``blobctl serve`` (spec/serve.md, "Web page").

``routes(ctx)`` gives the routes the server mounts beside the OCI API:

* ``GET /`` — the page, server-rendered HTML, complete without JavaScript;
* ``GET /ui/api/models``, ``/ui/api/usage``, ``/ui/api/activity``, ``/ui/api/bench`` —
  its JSON twins;
* ``GET /ui/events`` — live transfers as server-sent events (:mod:`.events`);
* ``POST /ui/actions/{pin,unpin,remove,pull}`` — the admin actions (:mod:`.actions`);
* ``GET /ui/login`` — asks the browser for credentials (401 + the policy's challenge);
* ``/ui/static/`` — ``page.css`` and ``page.js``, shipped in the package.

``close(ctx)`` ends the page's event streams (call it when the server shuts down);
``open_streams(ctx)`` counts them.
Modules: ``data`` (views), ``render`` (HTML), ``actions``, ``events``, ``page`` (routes).
"""

from __future__ import annotations

from registry_server.web.page import close, open_streams, routes

__all__ = ["close", "open_streams", "routes"]
