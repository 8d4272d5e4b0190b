"""Per-tenant request rates on the ``limits`` library: in-process by default, Redis when configured.

A counter store that is down must not take the API down with it: the limiter
then lets requests through and logs (at most once a minute), so reads keep
working while Redis restarts.
"""

from __future__ import annotations

import logging
import math
import time

from limits import RateLimitItemPerSecond
from limits.storage import storage_from_string
from limits.strategies import SlidingWindowCounterRateLimiter

log = logging.getLogger(__name__)
_REDIS_TIMEOUTS = {"socket_timeout": 0.25, "socket_connect_timeout": 0.25}


class RequestRateLimiter:
    def __init__(self, storage_url: str | None) -> None:
        url = storage_url or "memory://"
        options = _REDIS_TIMEOUTS if url.startswith(("redis://", "rediss://")) else {}
        self._limiter = SlidingWindowCounterRateLimiter(storage_from_string(url, **options))
        self._last_warning = 0.0

    def retry_after(self, tenant_id: str, kind: str, per_second: int) -> int | None:
        """Count one request; None if allowed, else whole seconds until the window has room."""
        item = RateLimitItemPerSecond(per_second)
        try:
            if self._limiter.hit(item, "tenant", tenant_id, kind):
                return None
            reset = self._limiter.get_window_stats(item, "tenant", tenant_id, kind).reset_time
        except Exception:  # noqa: BLE001 - counter store unreachable: fail open, say so
            now = time.monotonic()
            if now - self._last_warning > 60:
                self._last_warning = now
                log.warning("rate-limit storage unavailable; not limiting", exc_info=True)
            return None
        return max(1, math.ceil(reset - time.time()))
