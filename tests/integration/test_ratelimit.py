"""Request-rate limits across API processes: leases from one shared Redis counter per window.

Two ``RequestRateLimiter`` objects on the machine's Redis stand for two API processes.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from app.api.ratelimit import LEASE_FRACTION, RETRY_REDIS_AFTER_SECONDS, RequestRateLimiter

pytestmark = pytest.mark.integration


def _start_of_window() -> None:
    """Wait for a fresh one-second window, with time to spare, so a burst stays inside one."""
    time.sleep(1 - time.time() % 1 + 0.01)


async def _burst(limiters: list[RequestRateLimiter], tenant: str, per_second: int, n: int) -> list[bool]:
    allowed = []
    for i in range(n):
        wait = await limiters[i % len(limiters)].retry_after(tenant, "read", per_second)
        allowed.append(wait is None)
    return allowed


def test_two_processes_share_one_limit_per_window(redis_url):
    limiters = [RequestRateLimiter(redis_url), RequestRateLimiter(redis_url)]
    tenant, per_second = uuid.uuid4().hex, 100
    _start_of_window()
    allowed = asyncio.run(_burst(limiters, tenant, per_second, 3 * per_second))
    admitted = sum(allowed)
    # Never more than the limit; at most one unspent lease per process is lost to the other.
    assert per_second - 2 * (per_second // LEASE_FRACTION) <= admitted <= per_second
    assert not allowed[-1]


def test_refused_request_gets_seconds_to_next_window(redis_url):
    limiter = RequestRateLimiter(redis_url)
    tenant = uuid.uuid4().hex
    _start_of_window()

    async def go():
        results = [await limiter.retry_after(tenant, "write", 3) for _ in range(5)]
        return results

    results = asyncio.run(go())
    assert results[:3] == [None, None, None]
    assert results[3] == 1 and results[4] == 1  # whole seconds, at least 1
    time.sleep(1.05)  # the next window admits again
    assert asyncio.run(limiter.retry_after(tenant, "write", 3)) is None


def test_tenants_and_kinds_are_counted_apart(redis_url):
    limiter = RequestRateLimiter(redis_url)
    a, b = uuid.uuid4().hex, uuid.uuid4().hex
    _start_of_window()

    async def go():
        first = [await limiter.retry_after(a, "read", 2) for _ in range(3)]
        return first, await limiter.retry_after(a, "write", 2), await limiter.retry_after(b, "read", 2)

    first, other_kind, other_tenant = asyncio.run(go())
    assert first[:2] == [None, None] and first[2] is not None
    assert other_kind is None and other_tenant is None


def test_unreachable_redis_fails_over_to_per_process_counting():
    """A counter store that is down must not take the API down: counting goes local, still limited."""
    limiter = RequestRateLimiter("redis://127.0.0.1:1/0")  # nothing listens on port 1
    tenant = uuid.uuid4().hex
    _start_of_window()
    allowed = asyncio.run(_burst([limiter], tenant, 5, 10))
    assert allowed[:5] == [True] * 5 and not any(allowed[5:])
    # one failed connect, then no more attempts for a while (a connect per lease would block requests)
    assert limiter._shared_down_until - time.monotonic() > RETRY_REDIS_AFTER_SECONDS - 2
