"""registry_client: pull models from OCI / Ollama / Hugging Face registries into a store,
and push them to OCI registries.

See spec/pull.md and spec/api.md.
"""

from __future__ import annotations

from registry_client.client import RegistryClient
from registry_client.errors import (
    AuthError,
    ProtocolError,
    RateLimited,
    RegistryError,
    RemoteNotFound,
    TransferError,
    UnsupportedManifest,
)
from registry_client.pull import PullEstimate, PullOptions, PullResult, estimate, pull
from registry_client.push import PushOptions, PushResult, push
from registry_client.retry import RetryPolicy

__all__ = [
    "AuthError",
    "ProtocolError",
    "PullEstimate",
    "PullOptions",
    "PullResult",
    "PushOptions",
    "PushResult",
    "RateLimited",
    "RegistryClient",
    "RegistryError",
    "RemoteNotFound",
    "RetryPolicy",
    "TransferError",
    "UnsupportedManifest",
    "estimate",
    "pull",
    "push",
]
