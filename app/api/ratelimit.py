"""Per-tenant request rates in one-second windows, counted in Redis (shared) or in-process.

A Redis round trip per request cost a quarter of a status poll's CPU and blocked the
event loop, so each API process *leases* a slice of a tenant's window (1/20 of its
per-second limit) with one ``INCRBY`` and spends it locally. The shared counter still
caps every window at the limit across all processes; a slice a process leases and does
not spend is lost to the others for the rest of that second (at most 1/20 of the limit
per process). Limits under 20 per second lease one request at a time, so they are exact.

A counter store that is down must not take the API down with it: the limiter then
counts in-process for a while and logs (at most once a minute), so reads keep working
while Redis restarts. Leases are taken off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from dataclasses import dataclass

import anyio
import redis

log = logging.getLogger(__name__)
LEASE_FRACTION = 20  # a lease is 1/20 of the per-second limit
RETRY_REDIS_AFTER_SECONDS = 5.0
_REDIS_TIMEOUTS = {"socket_timeout": 0.25, "socket_connect_timeout": 0.25}


class MemoryCounters:
    """Window counters of this process only (the embedded profile, or while Redis is away)."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()

    def add(self, key: str, window: int, amount: int) -> int:
        with self._lock:
            if len(self._counts) > 10_000:  # keep only the live windows
                self._counts = {k: v for k, v in self._counts.items() if k[1] >= window - 1}
            total = self._counts.get((key, window), 0) + amount
            self._counts[(key, window)] = total
            return total


class RedisCounters:
    """Window counters shared by every API process: ``INCRBY`` + ``EXPIRE`` in one round trip."""

    def __init__(self, url: str) -> None:
        self._client = redis.Redis.from_url(url, **_REDIS_TIMEOUTS)

    def add(self, key: str, window: int, amount: int) -> int:
        name = f"ia:rate:{key}:{window}"
        pipe = self._client.pipeline(transaction=False)
        pipe.incrby(name, amount)
        pipe.expire(name, 3)
        total, _ = pipe.execute()
        return int(total)


@dataclass
class _Lease:
    window: int
    left: int  # requests this process may still admit in ``window``; -1: the window is spent


class RequestRateLimiter:
    def __init__(self, storage_url: str | None) -> None:
        self._local = MemoryCounters()
        self._shared = RedisCounters(storage_url) if storage_url else None
        self._shared_down_until = 0.0
        self._last_warning = 0.0
        self._leases: dict[str, _Lease] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def retry_after(self, tenant_id: str, kind: str, per_second: int) -> int | None:
        """Count one request; None if allowed, else whole seconds until the next window."""
        key = f"{tenant_id}:{kind}"
        if self._admit(key):
            return None
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:  # one lease in flight per key; the others wait and spend it
            if self._admit(key):
                return None
            window = int(time.time())
            lease = self._leases.get(key)
            if lease is None or lease.window != window or lease.left == 0:  # else: window refused
                size = max(1, per_second // LEASE_FRACTION)
                total = await self._add(key, window, size)
                granted = min(size, per_second - (total - size))
                self._leases[key] = _Lease(window, granted - 1 if granted > 0 else -1)
                if granted > 0:
                    return None
        return max(1, math.ceil(window + 1 - time.time()))

    def _admit(self, key: str) -> bool:
        lease = self._leases.get(key)
        if lease is None or lease.left <= 0 or lease.window != int(time.time()):
            return False
        lease.left -= 1
        return True

    async def _add(self, key: str, window: int, amount: int) -> int:
        if self._shared is None or time.monotonic() < self._shared_down_until:
            return self._local.add(key, window, amount)
        try:
            return await anyio.to_thread.run_sync(self._shared.add, key, window, amount)
        except redis.RedisError:  # counter store unreachable: count here for a while, say so
            self._shared_down_until = time.monotonic() + RETRY_REDIS_AFTER_SECONDS
            if time.monotonic() - self._last_warning > 60:
                self._last_warning = time.monotonic()
                log.warning("rate-limit storage unavailable; counting per process", exc_info=True)
            return self._local.add(key, window, amount)
