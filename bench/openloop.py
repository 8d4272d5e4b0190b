"""A constant-arrival-rate (open-loop) HTTP load generator on asyncio + httpx.

Request ``i`` of a stream is *scheduled* at ``start + i / rate`` and its latency is measured from
that scheduled instant, not from when it was actually sent, so a slow server cannot hide its
queueing (no coordinated omission, as in wrk2/k6's constant-arrival-rate). Several streams (say
polling and submitting) run concurrently with their own rates.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx


@dataclass
class Stream:
    name: str
    rate: float  # requests per second
    request: Callable[[httpx.AsyncClient], object]  # returns the awaitable response
    on_response: Callable[[httpx.Response], None] | None = None
    latencies_ms: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    last_done: float = 0.0  # perf_counter of the last completion: the real end of the stream

    def summary(self, start: float) -> dict:
        lat = sorted(self.latencies_ms)
        elapsed = max(self.last_done - start, 1e-9)

        def pct(q: float) -> float:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))], 1) if lat else float("nan")

        return {
            "name": self.name,
            "target_rps": self.rate,
            "achieved_rps": round(len(lat) / elapsed, 1),  # completions per second until the last one
            "requests": len(lat),
            "statuses": dict(sorted(self.statuses.items())),
            "errors": self.errors,
            "p50_ms": pct(0.50),
            "p95_ms": pct(0.95),
            "p99_ms": pct(0.99),
            "max_ms": round(lat[-1], 1) if lat else float("nan"),
        }


async def _run_stream(client: httpx.AsyncClient, stream: Stream, start: float, duration: float) -> None:
    tasks = []
    n = int(stream.rate * duration)

    async def one(scheduled: float) -> None:
        try:
            response = await stream.request(client)
        except httpx.HTTPError:
            stream.errors += 1
            return
        stream.last_done = time.perf_counter()
        stream.latencies_ms.append(1000 * (stream.last_done - scheduled))
        stream.statuses[response.status_code] = stream.statuses.get(response.status_code, 0) + 1
        if stream.on_response is not None:
            stream.on_response(response)

    for i in range(n):
        scheduled = start + i / stream.rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(scheduled)))
    await asyncio.gather(*tasks)


async def run(base_url: str, headers: dict[str, str], streams: list[Stream], duration: float) -> list[dict]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=30) as client:
        start = time.perf_counter() + 0.2
        await asyncio.gather(*(_run_stream(client, s, start, duration) for s in streams))
    return [s.summary(start) for s in streams]
