"""Middleware overhead: the same FastAPI prediction app served bare and behind ``GuardMiddleware``.

Run: ``python -m benchmarks.perf.overhead [--quick]``.

Every configuration (a name and a ``Policy``, or ``None`` for the bare app) gets its own uvicorn
server process on 127.0.0.1; a separate client process drives each in turn with the same closed-loop
load (``--concurrency`` keep-alive HTTP/1.1 connections, each sending the next request as soon as
the last answer arrived, cycling through the digits test images so that the detectors see varied
benign traffic, as they would in service, rather than one repeated query), A/B interleaved over
``--rounds`` rounds with the order alternating. It prints per configuration the medians over
rounds of requests/s, p50 and p99 latency, and their ratio to the first configuration. Targets for ``round:2``: throughput >= 0.95 of bare, p50 added <= 0.2 ms.
On a shared machine the figures are noisy: compare only configurations measured in the same run.
The table also gives each server process's own CPU time per request during its load (from
``/proc``, 10 ms ticks), which other load on the machine disturbs much less than throughput.
Two more tables give the guard's added CPU time per request on the same queries, measured in
process (which machine load hardly disturbs): around an app that answers at once, and around the
FastAPI prediction app itself. The same guard code costs more in the second, interleaved with the
app's own work (its caches are cold each time); that is the cost a server actually pays.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import os
import socket
import statistics
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks import datasets, models, serving
from benchmarks.perf.attacks import Rows, print_table
from guard import GuardMiddleware, Policy

HOST = "127.0.0.1"


def configurations() -> list[tuple[str, Policy | None]]:
    """What is compared, baseline first: add a configuration by adding a (name, policy) pair."""
    round2 = {"probabilities": "/probabilities", "features": "/features", "output": ["round:2"]}
    # Monitoring on: generous limits that count every query but never refuse one; both detectors
    # observe every query, with thresholds that no query can cross (so the cost of observing is
    # measured, not the cheaper refusals after an alarm); metrics on.
    monitored = {**round2, "rate_limits": ["1000000/minute"], "overall_rate_limits": ["10000000/minute"]}
    detectors = {"prada": {"delta": 0.0}, "similarity": {"threshold": 1e9}}
    return [("bare", None),
            ("guard round:2", Policy(secret="overhead benchmark secret", routes={"/predict": round2})),
            ("guard round:2 + limits, prada, similarity, metrics",
             Policy(secret="overhead benchmark secret", routes={"/predict": monitored}, detectors=detectors,
                    metrics_path="/metrics"))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def serve(state: dict, n_features: int, n_classes: int, policy: Policy | None, port: int) -> None:
    """A server process: the digits MLP behind ``benchmarks.serving``, guarded by ``policy`` if given."""
    import uvicorn

    torch.set_num_threads(1)
    model = models.make_model("mlp", n_features, n_classes)
    model.load_state_dict(state)
    model.eval()
    app = serving.prediction_app(lambda X: models.predict_proba(model, X), n_features)
    if policy is not None:
        app.add_middleware(GuardMiddleware, policy=policy)
    uvicorn.run(app, host=HOST, port=port, log_level="warning", access_log=False)


async def _connection(port: int, requests: list[bytes], until: float, latencies: list[float]) -> None:
    """One keep-alive connection sending ``requests`` in turn, back to back, until ``until``."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        for request in itertools.cycle(requests):
            if (start := time.perf_counter()) >= until:
                break
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"server answered {head.splitlines()[0]!r}")
            length = next(int(line.split(b":")[1]) for line in head.lower().splitlines()
                          if line.startswith(b"content-length:"))
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - start)
    finally:
        writer.close()


def load(port: int, bodies: list[bytes], seconds: float, concurrency: int) -> tuple[float, list[float]]:
    """Client process: closed-loop load for ``seconds``, connection ``i`` sending ``bodies`` in turn
    from the ``i``-th; the elapsed time and every latency (s)."""
    requests = [(f"POST /predict HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n").encode() + body for body in bodies]
    latencies: list[float] = []

    async def run() -> None:
        until = time.perf_counter() + seconds
        await asyncio.gather(*(_connection(port, requests[i:] + requests[:i], until, latencies)
                               for i in range(concurrency)))

    start = time.perf_counter()
    asyncio.run(run())
    return time.perf_counter() - start, latencies


def wait_until_listening(port: int, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no server on port {port} after {timeout} s") from None
            time.sleep(0.2)


def digits_model() -> tuple[nn.Module, np.ndarray]:
    """A small MLP trained on digits, and the test images to query it with."""
    data = datasets.load("digits")
    parts = datasets.split(data, seed=0)
    model = models.train_target("mlp", data.X[parts.train], data.y[parts.train], data.n_classes, seed=0,
                                epochs=10)
    return model, data.X[parts.test]


def measure(configs: list[tuple[str, Policy | None]], model: nn.Module, bodies: list[bytes], rounds: int,
            seconds: float, concurrency: int) -> Rows:
    """Serve every configuration, load them in interleaved rounds, and summarise (medians over rounds)."""
    n_features, n_classes = model[0].in_features, model[-1].out_features
    context = multiprocessing.get_context("spawn")
    ports = [free_port() for _ in configs]
    servers = [context.Process(target=serve, args=(model.state_dict(), n_features, n_classes, policy, port),
                               daemon=True)
               for (_, policy), port in zip(configs, ports)]
    try:
        for server in servers:
            server.start()
        return drive([(name, port, server.pid) for (name, _), port, server in zip(configs, ports, servers)],
                     bodies, rounds, seconds, concurrency)
    finally:
        for server in servers:
            server.terminate()
            server.join(10)


def drive(servers: list[tuple[str, int, int]], bodies: list[bytes], rounds: int, seconds: float,
          concurrency: int) -> Rows:
    """Load the running ``servers`` (name, port, the pid whose CPU time is counted) in interleaved
    rounds, the order alternating, from one client process; medians over rounds, ratios to the first."""
    context = multiprocessing.get_context("spawn")
    results: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name, _, _ in servers}
    for _, port, _ in servers:
        wait_until_listening(port)
    with ProcessPoolExecutor(1, mp_context=context) as client:
        for _, port, _ in servers:  # warm-up
            client.submit(load, port, bodies, min(seconds, 1.0), concurrency).result()
        for r in range(rounds):
            for name, port, pid in servers if r % 2 == 0 else servers[::-1]:
                used = cpu_seconds(pid)
                elapsed, latencies = client.submit(load, port, bodies, seconds, concurrency).result()
                cpu = (cpu_seconds(pid) - used) / len(latencies) * 1e6
                p50, p99 = np.percentile(latencies, [50, 99]) * 1e3
                results[name].append((len(latencies) / elapsed, p50, p99, cpu))
    return summarise(results)


def canned_app(exchanges: list[tuple[bytes, bytes]]) -> Callable:
    """An ASGI app that answers each request body of ``exchanges`` (request body, answer) with its
    answer at once: what is left of a prediction server without its own work."""
    answers = dict(exchanges)

    async def app(scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        answer = answers[(await receive())["body"]]
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]})
        await send({"type": "http.response.body", "body": answer})
    return app


def guard_cpu_cost(configs: list[tuple[str, Policy | None]], make_app: Callable[[], Callable],
                   bodies: list[bytes], rounds: int, calls: int) -> Rows:
    """The guard's own CPU time per request, in process and free of network costs: each
    configuration wraps a fresh ``make_app()`` and is called on ``bodies`` in turn. Process CPU
    time (all threads), so other load on the machine hardly moves it; medians over ``rounds``."""
    def replaying(body: bytes) -> Callable[[], Awaitable[dict]]:
        async def receive() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}
        return receive

    async def discard(message: dict) -> None:
        pass

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/predict", "raw_path": b"/predict", "query_string": b"",
             "root_path": "", "server": (HOST, 80), "client": (HOST, 50000)}
    requests = [({**scope, "headers": [(b"host", HOST.encode()), (b"content-type", b"application/json"),
                                       (b"content-length", str(len(body)).encode())]}, replaying(body))
                for body in bodies]
    apps = []
    for name, policy in configs:
        app = make_app()
        apps.append((name, app if policy is None else GuardMiddleware(app, policy)))

    async def per_call(app: object) -> float:
        start = time.process_time()
        for i in range(calls):
            scope, receive = requests[i % len(requests)]
            await app(dict(scope), receive, discard)
        return (time.process_time() - start) / calls * 1e6

    async def run() -> dict[str, list[float]]:
        times: dict[str, list[float]] = {name: [] for name, _ in apps}
        for r in range(rounds + 1):  # the first round warms up
            for name, app in apps if r % 2 == 0 else apps[::-1]:
                cost = await per_call(app)
                if r:
                    times[name].append(cost)
        return times

    medians = {name: statistics.median(times) for name, times in asyncio.run(run()).items()}
    base = next(iter(medians.values()))
    return [{"configuration": name, "CPU us/request": cost, "added us": cost - base}
            for name, cost in medians.items()]


def cpu_seconds(pid: int) -> float:
    """The CPU time (user + system, all threads) process ``pid`` has used so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summarise(results: dict[str, list[tuple[float, float, float, float]]]) -> Rows:
    medians = {name: [statistics.median(column) for column in zip(*runs)] for name, runs in results.items()}
    base_rps, base_p50, base_p99, base_cpu = next(iter(medians.values()))
    return [{"configuration": name, "req/s": rps, "p50 ms": p50, "p99 ms": p99,
             "req/s ratio": rps / base_rps, "p50 added ms": p50 - base_p50, "p99 ratio": p99 / base_p99,
             "server CPU us/req": cpu, "CPU ratio": cpu / base_cpu}
            for name, (rps, p50, p99, cpu) in medians.items()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 short rounds, for a smoke test")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3 quick, 9 full)")
    parser.add_argument("--seconds", type=float, help="load per configuration per round (default 2 / 5)")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent keep-alive connections")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as in the server processes
    rounds = args.rounds or (3 if args.quick else 9)
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    configs = configurations()
    model, X = digits_model()
    bodies = [json.dumps({"features": x}).encode() for x in X.tolist()]
    answers = [json.dumps({"probabilities": p}, separators=(",", ":")).encode()
               for p in models.predict_proba(model, X).tolist()]
    print_table(f"HTTP on loopback ({rounds} rounds x {seconds:g} s, {args.concurrency} connections; "
                "medians over rounds)", measure(configs, model, bodies, rounds, seconds, args.concurrency))
    exchanges = list(zip(bodies, answers))
    for inner, make_app, calls in (
            ("an app that answers at once", lambda: canned_app(exchanges), 2000),
            ("the FastAPI prediction app", lambda: serving.prediction_app(
                lambda X: models.predict_proba(model, X), X.shape[1]), 500)):
        print_table(f"the guard's own CPU time per request, in process, around {inner} ({rounds} rounds x "
                    f"{calls} calls; medians)", guard_cpu_cost(configs, make_app, bodies, rounds, calls))

if __name__ == "__main__":
    main()
