"""A constant-arrival-rate (open-loop) HTTP/1.1 load generator on asyncio (uvloop when installed).

Request ``i`` of a stream is *scheduled* at ``start + i / rate`` and its latency is measured from
that scheduled instant, not from when it was actually sent, so a slow server cannot hide its
queueing (no coordinated omission, as in wrk2/k6's constant-arrival-rate). Several streams (say
polling and submitting) run concurrently with their own rates.

The client is a few lines of raw HTTP/1.1 over keep-alive connections (a new connection only when
every open one is busy), because the generator shares the machine with the server it measures:
httpx spent ~1.5 ms of CPU per request here, a raw request ~0.1 ms. It speaks only what the
benchmarks send (fixed requests, ``Content-Length`` bodies).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class Request:
    method: str
    path: str
    json_body: object | None = None

    def encode(self, host: str, headers: dict[str, str]) -> bytes:
        body = b"" if self.json_body is None else json.dumps(self.json_body).encode()
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
        if self.json_body is not None:
            lines.append("Content-Type: application/json")
        lines += [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class Stream:
    name: str
    rate: float  # requests per second
    request: Request
    on_response: Callable[[int, bytes], None] | None = None  # (status, body)
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


IDLE_REUSE_SECONDS = 2.0  # well under the server's keep-alive timeout (uvicorn: 5 s)


class _Connections:
    """Idle keep-alive connections to one server; opens another when all are busy.

    A connection idle for a while is closed rather than reused, so a request never races the
    server closing it (which would fail the request for the client's sake, not the server's).
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []

    async def _acquire(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while self._idle:
            reader, writer, idle_since = self._idle.pop()
            if time.monotonic() - idle_since < IDLE_REUSE_SECONDS:
                return reader, writer
            writer.close()
        return await asyncio.open_connection(self.host, self.port)

    async def send(self, raw: bytes) -> tuple[int, bytes]:
        reader, writer = await self._acquire()
        try:
            writer.write(raw)
            status = int((await reader.readline()).split(b" ", 2)[1])
            length, close = 0, False
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            body = await reader.readexactly(length) if length else b""
        except BaseException:
            writer.close()
            raise
        if close:
            writer.close()
        else:
            self._idle.append((reader, writer, time.monotonic()))
        return status, body

    def close(self) -> None:
        for _, writer, _ in self._idle:
            writer.close()


async def _run_stream(conns: _Connections, raw: bytes, stream: Stream, start: float, duration: float) -> None:
    tasks = []
    n = int(stream.rate * duration)

    async def one(scheduled: float) -> None:
        try:
            status, body = await conns.send(raw)
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
            stream.errors += 1
            return
        stream.last_done = time.perf_counter()
        stream.latencies_ms.append(1000 * (stream.last_done - scheduled))
        stream.statuses[status] = stream.statuses.get(status, 0) + 1
        if stream.on_response is not None:
            stream.on_response(status, body)

    for i in range(n):
        scheduled = start + i / stream.rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(scheduled)))
    await asyncio.gather(*tasks)


async def _run(base_url: str, headers: dict[str, str], streams: list[Stream], duration: float) -> list[dict]:
    url = urlsplit(base_url)
    conns = _Connections(url.hostname or "127.0.0.1", url.port or 80)
    try:
        start = time.perf_counter() + 0.2
        await asyncio.gather(
            *(_run_stream(conns, s.request.encode(url.netloc, headers), s, start, duration) for s in streams)
        )
    finally:
        conns.close()
    return [s.summary(start) for s in streams]


def run(base_url: str, headers: dict[str, str], streams: list[Stream], duration: float) -> list[dict]:
    """Drive ``streams`` against ``base_url`` for ``duration`` seconds; a summary per stream."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_run(base_url, headers, streams, duration))
    return uvloop.run(_run(base_url, headers, streams, duration))
