"""One retry policy for the whole client (spec/pull.md, "Retries").

Transient failures are retried with capped exponential backoff and full jitter; a
``Retry-After`` header (seconds or an HTTP date) is honoured, capped at ``max_delay``.
Transient means: connection errors, timeouts, stalls, truncated bodies, and the
statuses 408, 429, 500, 502, 503 and 504. Every retry is logged at WARNING with its
reason.
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from dataclasses import dataclass

from blobstore.units import check_count, check_seconds

__all__ = ["TRANSIENT_STATUSES", "RetryPolicy", "parse_retry_after"]

log = logging.getLogger("blobctl.retry")

TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header, or None if absent/unparseable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 8            # tries per request, the first included
    base_delay: float = 0.25
    max_delay: float = 20.0
    # tries for a registry never reached yet that cannot be connected to (a name that
    # does not resolve, a refused connection): a typo should fail in seconds, not after
    # the whole backoff; a registry that answered once gets ``attempts``
    unreachable_attempts: int = 2

    def __post_init__(self) -> None:
        """Raises InvalidOption for a value out of range (no try at all, a negative
        delay): found from outside, ``attempts=0`` failed a pull with an AssertionError."""
        check_count("RetryPolicy", "attempts", self.attempts, 1)
        check_count("RetryPolicy", "unreachable_attempts", self.unreachable_attempts, 1)
        check_seconds("RetryPolicy", "base_delay", self.base_delay, finite=True)
        check_seconds("RetryPolicy", "max_delay", self.max_delay, finite=True)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Delay before retry number ``attempt`` (1-based)."""
        if retry_after is not None:
            return min(self.max_delay, retry_after)
        return random.uniform(0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))

    def wait(self, attempt: int, reason: str, *, what: str,
             retry_after: float | None = None, attempts: int | None = None) -> None:
        """Sleep before retry ``attempt`` (of ``attempts - 1``, default the policy's)."""
        d = self.delay(attempt, retry_after)
        log.warning("retry %d/%d of %s in %.1fs: %s", attempt,
                    (attempts or self.attempts) - 1, what, d, reason)
        time.sleep(d)
