"""registry_server: ``blobctl serve`` — the store as an OCI distribution registry.

Rooms (STYLE.md): ``context`` (the seams: server context, activity feed, access and
mirror protocols), ``app`` (assembles the ASGI application), ``oci`` (distribution API),
``auth`` (tokens, tiers), ``mirror`` (pull-through), ``web`` (the page), ``metrics``.
Imports flow down only: registry_server uses registry_client and blobstore, never cli.
"""
