"""The library ``pull()`` in a process of its own, for kill -9 tests that need an option
the CLI does not expose (``PullOptions.window_bytes``: a window smaller than the blob is
what makes a resumed pull find its first window already on disk).

``python -m tests.registry_client.pulldriver STORE REF CONNECTIONS CHUNK WINDOW`` exits 0
after a successful pull, or prints ``error: <message>`` and exits 6 on a ``BlobctlError``
(anything else is a traceback and exit 1, as an unexpected error).
"""

from __future__ import annotations

import sys

from blobstore.errors import BlobctlError
from registry_client.pull import PullOptions, pull
from registry_client.retry import RetryPolicy


def main(argv: list[str]) -> int:
    store, ref, connections, chunk, window = argv
    options = PullOptions(insecure=True, connections=int(connections), chunk_size=int(chunk),
                          window_bytes=int(window), stall_timeout=5.0, auto_gc=False,
                          retry=RetryPolicy(attempts=4, base_delay=0.01))
    try:
        pull(ref, store=store, options=options)
    except BlobctlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 6
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
