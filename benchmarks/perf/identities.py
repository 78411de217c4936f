"""Per-request cost of the guard against the number of client identities it holds state for.

Run: ``python -m benchmarks.perf.identities [--quick]``.

A flood of fresh identities (one request each) must not make every request slower nor grow memory
without bound. For each size N the guard (rate limits, sanctions and metrics on, in-process state)
first holds state for N distinct clients, as N requests from N addresses would leave it; then
``--requests`` requests from further fresh addresses go through the whole middleware (an app that
answers at once), timed one by one. Baseline: the same guard with its standing read and the ``limits`` library's own
``async+memory://`` storage counting the limits (what the guard used before the one-call admission),
whose background sweep walks every key on the event loop. Ours: the guard's admission (standing and
counters in one call, bounded under the policy's ``memory_limit``). Printed: the median and p99 microseconds of a request itself; the event loop's
time per request, background tasks included (the loop yields between requests, as a server's does,
so a sweep over every key lands here); and the process's peak resident memory after each size
(sizes run in increasing order, so it is cumulative).
"""
from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import time

import orjson

from benchmarks.perf.attacks import print_table
from guard import GuardMiddleware, Policy
from guard.ratelimit import LimitDecision, RouteLimits
from guard.sanctions import Sanctions, Standing

BODY = orjson.dumps({"features": [0.1, 0.2, 0.3]})
ANSWER = orjson.dumps({"probabilities": [0.61234, 0.28766, 0.1]})


async def instant_app(scope, receive, send) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": ANSWER})


class LimitsAdmission:
    """The baseline: the standing read, then each limit counted by the ``limits`` library's
    sliding-window-counter strategy in its own ``async+memory://`` storage (what the guard used before)."""

    def __init__(self, sanctions: Sanctions) -> None:
        from limits.aio.strategies import SlidingWindowCounterRateLimiter
        from limits.storage import storage_from_string

        self._sanctions = sanctions
        self._strategy = SlidingWindowCounterRateLimiter(storage_from_string("async+memory://"))

    async def admit(self, route: str, client: str, limits: RouteLimits, cost: int = 1,
                    network: str | None = None, address: str = "") -> tuple[Standing, LimitDecision | None]:
        standing = await self._sanctions.standing(client)
        checks = [(item, ("client", route, client)) for item in limits.per_client]
        checks += [(item, ("network", route, network)) for item in limits.per_network]
        decision = None
        for item, identifiers in checks:
            allowed = await self._strategy.hit(item, *identifiers, cost=cost)
            stats = await self._strategy.get_window_stats(item, *identifiers)
            decision = LimitDecision(allowed, item.amount, stats.remaining, stats.reset_time - time.time())
        return standing, decision


def guard(storage: str, memory_limit: int) -> GuardMiddleware:
    policy = Policy(secret="identities benchmark secret", memory_limit=memory_limit, routes={"/predict": {
        "probabilities": "/probabilities", "features": "/features", "output": ["round:2"],
        "rate_limits": ["100/minute"], "network_rate_limits": ["1000/minute"]}})
    middleware = GuardMiddleware(instant_app, policy)
    if storage == "limits memory://":
        middleware.monitoring.admission = LimitsAdmission(middleware.monitoring.sanctions)
    return middleware


def address(i: int) -> str:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


async def request(middleware: GuardMiddleware, client: str) -> None:
    scope = {"type": "http", "method": "POST", "path": "/predict", "root_path": "", "client": (client, 1),
             "headers": [(b"content-type", b"application/json")]}

    async def receive():
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message):
        return None

    await middleware(scope, receive, send)


async def fill(middleware: GuardMiddleware, start: int, stop: int) -> None:
    """The state ``stop - start`` clients' requests leave: counters, a standing read, a metrics entry."""
    monitoring = middleware.monitoring
    route = middleware.routes.exact["/predict"]
    for i in range(start, stop):
        identity = monitoring.identifier.identify({"client": (address(i), 1), "headers": []})
        await monitoring.admission.admit(route.path, identity.client, route.limits, 1, identity.network)
        await monitoring.metrics.seen(identity.client)


async def measure(storage: str, sizes: list[int], requests: int, memory_limit: int) -> list[dict[str, object]]:
    middleware = guard(storage, memory_limit)
    rows, held = [], 0
    for size in sizes:
        await fill(middleware, held, size)
        held = size
        await asyncio.sleep(0.05)  # let a background sweep, if any, start as in service
        times = []
        loop_started = time.perf_counter()
        for i in range(requests):
            started = time.perf_counter()
            await request(middleware, address(size + 1 + i))
            times.append((time.perf_counter() - started) * 1e6)
            await asyncio.sleep(0)  # between requests a server's loop runs its other tasks
        loop_us = (time.perf_counter() - loop_started) / requests * 1e6
        held += requests
        times.sort()
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rows.append({"counters": storage, "identities": f"{size:,}",
                     "p50 us/request": round(statistics.median(times)),
                     "p99 us/request": round(times[int(0.99 * (len(times) - 1))]),
                     "loop us/request": round(loop_us), "peak RSS MB": round(peak_mb)})
        print(rows[-1], flush=True)  # as it comes: the large sizes take minutes
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1k to 100k identities (baseline to 10k)")
    parser.add_argument("--requests", type=int, default=300, help="timed requests per size")
    parser.add_argument("--memory-limit", type=int, default=256 << 20, help="the policy's memory_limit")
    args = parser.parse_args(argv)
    ours = [1_000, 10_000, 100_000] if args.quick else [1_000, 10_000, 100_000, 1_000_000]
    baseline = ours[:2] if args.quick else ours[:3]
    rows = asyncio.run(measure("limits memory://", baseline, args.requests, args.memory_limit))
    rows += asyncio.run(measure("one-call admission (ours)", ours, args.requests, args.memory_limit))
    print_table("Guard cost per request against identities held", rows)


if __name__ == "__main__":
    main()
