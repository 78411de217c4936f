"""Middleware overhead: the same FastAPI prediction app served bare and behind ``GuardMiddleware``.

Run: ``python -m benchmarks.perf.overhead [--quick] [--redis URL]``.

Configurations: bare; ``round:2``; everything on (rate limits, PRADA, the similarity detector,
metrics) with the monitor in process; and, when a Redis is at hand (``--redis``, or a throwaway
``redis-server`` if installed), everything on in the scale-out deployment: Redis store,
observations on Redis Streams, one ``guard monitor`` process judging them.
Every configuration gets its own uvicorn server process on 127.0.0.1; a separate client process
drives each in turn with the same closed-loop load (``--concurrency`` keep-alive HTTP/1.1
connections, each sending the next request as soon as the last answer arrived, cycling through the
digits test images so that the detectors see varied benign traffic, as they would in service,
rather than one repeated query), A/B interleaved over ``--rounds`` rounds with the order
alternating. It prints per configuration the medians over rounds of requests/s, p50 and p99
latency and their ratio to bare, each server process's CPU time per request (from ``/proc``, 10 ms
ticks; with the monitor in process, its thread included), the monitor's CPU per observation (its
thread's, from ``/metrics``; or the monitor process's) and the share of answers whose observation
the monitor could not take (sent in the fail mode). On a shared machine the figures are noisy:
compare only configurations measured in the same run.
Two more tables give the guard's added CPU time per request on the request path (the calling
thread's) and the monitor's per observation, measured in process (which machine load hardly
disturbs): around an app that answers at once, and around the FastAPI prediction app itself. One
more gives the in-process monitor's CPU per observation by the size of the batches it judges (one
client, and eight in turn). A last table puts the targets beside this run's figures.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks import datasets, models
from benchmarks.perf.attacks import Rows, print_table
from benchmarks.perf.configs import (ALL_ON, FLOOR, HOST, ROUND2, STREAMS, call_in_turn, canned_app,
                                     configurations, guarded_requests, wrappers)
from guard import GuardMiddleware, Policy, serving
from guard.detectors.base import Observation



def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def run_monitor(policy: Policy) -> None:
    """A ``guard monitor`` process (the scale-out deployment's detectors) for ``policy``."""
    from guard.monitoring.stream import StreamMonitor

    asyncio.run(StreamMonitor(policy).run(asyncio.Event()))


def serve(state: dict, n_features: int, n_classes: int, policy: Policy | None, port: int) -> None:
    """A server process: the digits MLP behind ``guard.serving``, guarded by ``policy`` if given."""
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


def scrape(port: int) -> dict[str, float]:
    """The monitor's counters from a guarded server's ``/metrics`` (empty without metrics)."""
    import urllib.request

    try:
        text = urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10).read().decode()
    except OSError:
        return {}
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line.startswith(("guard_observations_", "guard_monitor_cpu_seconds_total"))}


def measure(configs: list[tuple[str, Policy | None]], model: nn.Module, bodies: list[bytes], rounds: int,
            seconds: float, concurrency: int) -> Rows:
    """Serve every configuration (and a monitor process for the streams one), load them in
    interleaved rounds, and summarise (medians over rounds)."""
    n_features, n_classes = model[0].in_features, model[-1].out_features
    context = multiprocessing.get_context("spawn")
    ports = [free_port() for _ in configs]
    servers = [context.Process(target=serve, args=(model.state_dict(), n_features, n_classes, policy, port),
                               daemon=True)
               for (_, policy), port in zip(configs, ports)]
    monitors = {name: context.Process(target=run_monitor, args=(policy,), daemon=True)
                for name, policy in configs if policy is not None and policy.monitor.deployment == "streams"}
    try:
        for process in [*servers, *monitors.values()]:
            process.start()
        return drive([(name, port, server.pid, monitors[name].pid if name in monitors else None)
                      for (name, _), port, server in zip(configs, ports, servers)],
                     bodies, rounds, seconds, concurrency)
    finally:
        for process in [*servers, *monitors.values()]:
            process.terminate()
            process.join(10)


def drive(servers: list[tuple[str, int, int, int | None]], bodies: list[bytes], rounds: int, seconds: float,
          concurrency: int) -> Rows:
    """Load the running ``servers`` (name, port, the pid whose CPU time is counted, the pid of its
    monitor process or None) in interleaved rounds, the order alternating, from one client process;
    medians over rounds, ratios to the first."""
    context = multiprocessing.get_context("spawn")
    results: dict[str, list[tuple[float, ...]]] = {name: [] for name, *_ in servers}
    for _, port, _, _ in servers:
        wait_until_listening(port)
    with ProcessPoolExecutor(1, mp_context=context) as client:
        for _, port, _, _ in servers:  # warm-up
            client.submit(load, port, bodies, min(seconds, 1.0), concurrency).result()
        for r in range(rounds):
            for name, port, pid, monitor in servers if r % 2 == 0 else servers[::-1]:
                used, before = cpu_seconds(pid), scrape(port)
                monitor_used = cpu_seconds(monitor) if monitor else 0.0
                elapsed, latencies = client.submit(load, port, bodies, seconds, concurrency).result()
                cpu = (cpu_seconds(pid) - used) / len(latencies) * 1e6
                if before:
                    time.sleep(0.5)  # let the monitor finish the round's backlog
                after = scrape(port)
                change = {key: after[key] - before.get(key, 0.0) for key in after}
                dropped = change.get("guard_observations_dropped_total", 0.0)
                judged = change.get("guard_observations_judged_total", 0.0)
                if monitor:  # judged in the monitor process: every observation not dropped
                    judged = len(latencies) - dropped
                    monitor_cpu = (cpu_seconds(monitor) - monitor_used) / max(judged, 1) * 1e6
                else:
                    monitor_cpu = change.get("guard_monitor_cpu_seconds_total", 0.0) / max(judged, 1) * 1e6
                p50, p99 = np.percentile(latencies, [50, 99]) * 1e3
                results[name].append((len(latencies) / elapsed, p50, p99, cpu, monitor_cpu,
                                      dropped / len(latencies)))
    return summarise(results)


def guard_cpu_cost(configs: list[tuple[str, Callable[[Callable], Callable]]], make_app: Callable[[], Callable],
                   bodies: list[bytes], rounds: int, calls: int, drain_every: int = 32) -> Rows:
    """The guard's own CPU time per request, in process and free of network costs: each
    configuration (a name, what wraps an app in it: ``configs.wrappers``) wraps a fresh
    ``make_app()`` and is called on ``bodies`` in turn. The request
    path's CPU time is that of the calling thread (other load on the machine hardly moves it); the
    in-process monitor's, per observation, is read from its metrics, the monitor being left to
    catch up every ``drain_every`` requests (so it judges batches of up to that many and never
    falls behind its bound). Medians over ``rounds``."""
    requests = guarded_requests(bodies)
    apps = []
    for name, wrap in configs:
        apps.append((name, wrap(make_app())))

    async def per_call(app: object) -> tuple[float, float]:
        """Request-path CPU per call, and the monitor's CPU per observation (0 without one)."""
        monitor = app.monitoring.monitor if isinstance(app, GuardMiddleware) else None
        registry = app.monitoring.metrics.registry if monitor is not None else None
        spent = 0.0
        cpu_before = registry.get_sample_value("guard_monitor_cpu_seconds_total") if registry else 0.0
        judged_before = registry.get_sample_value("guard_observations_judged_total") if registry else 0.0
        for start in range(0, calls, drain_every):
            began = time.thread_time()
            await call_in_turn(app, requests, start, min(start + drain_every, calls))
            spent += time.thread_time() - began
            if monitor is not None:
                await monitor.drain()
        if registry is None:
            return spent / calls * 1e6, 0.0
        judged = registry.get_sample_value("guard_observations_judged_total") - judged_before
        cpu = registry.get_sample_value("guard_monitor_cpu_seconds_total") - cpu_before
        return spent / calls * 1e6, cpu / max(judged, 1) * 1e6

    async def run() -> dict[str, list[tuple[float, float]]]:
        times: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in apps}
        for r in range(rounds + 1):  # the first round warms up
            for name, app in apps if r % 2 == 0 else apps[::-1]:
                cost = await per_call(app)
                if r:
                    times[name].append(cost)
        return times

    medians = {name: [statistics.median(column) for column in zip(*runs)]
               for name, runs in asyncio.run(run()).items()}
    base = next(iter(medians.values()))[0]
    return [{"configuration": name, "request-path CPU us": cost, "added us": cost - base,
             "monitor CPU us/obs": monitor}
            for name, (cost, monitor) in medians.items()]


def monitor_cost_by_batch(policy: Policy, X: np.ndarray, labels: np.ndarray, rounds: int,
                          sizes: tuple[int, ...] = (1, 4, 32), observations: int = 512) -> Rows:
    """The in-process monitor's CPU time per observation (its ``Monitor.process``, both detectors)
    judging batches of each of ``sizes``, from one client (as in the HTTP runs) and from eight in
    turn, one row per query, after a warm-up; medians over ``rounds``. Under light load a batch
    holds the few observations that arrive within the monitor's linger."""
    monitor = GuardMiddleware(canned_app([]), policy).monitoring.monitor.monitor
    cells = [(size, clients) for clients in (1, 8) for size in sizes]

    def stream(clients: int) -> list[Observation]:
        return [Observation(f"client {i % clients}", X[i % len(X)][None, :], [int(labels[i % len(X)])], "/predict")
                for i in range(observations * (len(sizes) * rounds + 1))]

    streams = {clients: stream(clients) for clients in (1, 8)}
    taken = dict.fromkeys(streams, 0)

    async def per_observation(size: int, clients: int) -> float:
        start, taken[clients] = taken[clients], taken[clients] + observations
        began = time.thread_time()
        for at in range(start, start + observations, size):
            await monitor.process(streams[clients][at:at + size])
        return (time.thread_time() - began) / observations * 1e6

    async def run() -> dict[tuple[int, int], list[float]]:
        for clients in streams:  # warm-up: every client's state exists
            await per_observation(sizes[-1], clients)
        costs: dict[tuple[int, int], list[float]] = {cell: [] for cell in cells}
        for r in range(rounds):
            for cell in cells if r % 2 == 0 else cells[::-1]:
                costs[cell].append(await per_observation(*cell))
        return costs

    return [{"batch size": size, "clients": clients, "monitor CPU us/obs": statistics.median(costs)}
            for (size, clients), costs in asyncio.run(run()).items()]


def cpu_seconds(pid: int) -> float:
    """The CPU time (user + system, all threads) process ``pid`` has used so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summarise(results: dict[str, list[tuple[float, ...]]]) -> Rows:
    """Medians over rounds. ``CPU ratio``: the web server's CPU per request (its monitor thread
    included, in process) plus a monitor process's per observation (streams), to bare's."""
    medians = {name: [statistics.median(column) for column in zip(*runs)] for name, runs in results.items()}
    base_rps, base_p50, base_p99, base_cpu, _, _ = next(iter(medians.values()))
    return [{"configuration": name, "req/s": rps, "p50 ms": p50, "p99 ms": p99,
             "req/s ratio": rps / base_rps, "p50 added ms": p50 - base_p50, "p99 ratio": p99 / base_p99,
             "server CPU us/req": cpu, "monitor CPU us/obs": monitor_cpu,
             "CPU ratio": (cpu + (monitor_cpu if name == STREAMS else 0.0)) / base_cpu,
             "dropped %": 100 * dropped}
            for name, (rps, p50, p99, cpu, monitor_cpu, dropped) in medians.items()]


@contextlib.contextmanager
def redis_server(url: str | None) -> Iterator[str | None]:
    """``url``, or a throwaway redis-server on a free port when the binary is installed (else None:
    the streams configuration is left out)."""
    if url is not None or shutil.which("redis-server") is None:
        yield url
        return
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", HOST, "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        wait_until_listening(port)
        yield f"redis://{HOST}:{port}/0"
    finally:
        server.terminate()
        server.wait(10)


def targets(http: Rows, no_op: Rows) -> Rows:
    """The targets beside the figures measured in this run."""
    served, added = {row["configuration"]: row for row in http}, {row["configuration"]: row for row in no_op}
    rows = [{"target": "round:2 req/s ratio >= 0.95", "measured": served[ROUND2]["req/s ratio"]},
            {"target": "round:2 CPU added <= 25 us (no-op app)", "measured": added[ROUND2]["added us"]},
            {"target": f"(for scale: {FLOOR} adds, no-op app)", "measured": added[FLOOR]["added us"]},
            {"target": "all on req/s ratio >= 0.90", "measured": served[ALL_ON]["req/s ratio"]},
            {"target": "all on request-path CPU added <= 60 us (no-op app)", "measured": added[ALL_ON]["added us"]},
            {"target": "all on monitor CPU per observation (reported)", "measured": added[ALL_ON]["monitor CPU us/obs"]},
            {"target": "all on total CPU per query <= 1.3x bare", "measured": served[ALL_ON]["CPU ratio"]}]
    if STREAMS in served:
        rows += [{"target": "streams req/s ratio >= 0.90", "measured": served[STREAMS]["req/s ratio"]},
                 {"target": "streams monitor process CPU per observation (reported)",
                  "measured": served[STREAMS]["monitor CPU us/obs"]},
                 {"target": "streams total CPU per query <= 1.3x bare", "measured": served[STREAMS]["CPU ratio"]}]
    return rows


def load_parser(description: str) -> argparse.ArgumentParser:
    """The options of an interleaved load benchmark (``--quick``, ``--rounds``, ``--seconds``,
    ``--concurrency``); ``load_settings`` reads the rounds and seconds they give."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="3 short rounds, for a smoke test")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3 quick, 9 full)")
    parser.add_argument("--seconds", type=float, help="load per configuration per round (default 2 / 5)")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent keep-alive connections")
    return parser


def load_settings(args: argparse.Namespace) -> tuple[int, float]:
    """Rounds and seconds per configuration per round, with the quick or full defaults."""
    return args.rounds or (3 if args.quick else 9), args.seconds or (2.0 if args.quick else 5.0)


def main(argv: list[str] | None = None) -> None:
    parser = load_parser(__doc__.splitlines()[0])
    parser.add_argument("--redis", help="Redis URL for the streams configuration (default: a throwaway "
                        "redis-server if installed)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as in the server processes
    rounds, seconds = load_settings(args)
    model, X = digits_model()
    bodies = [json.dumps({"features": x}).encode() for x in X.tolist()]
    answers = [json.dumps({"probabilities": p}, separators=(",", ":")).encode()
               for p in models.predict_proba(model, X).tolist()]
    with redis_server(args.redis) as url:
        configs = configurations(url)
        http = measure(configs, model, bodies, rounds, seconds, args.concurrency)
    print_table(f"HTTP on loopback ({rounds} rounds x {seconds:g} s, {args.concurrency} connections; "
                "medians over rounds)", http)
    exchanges = list(zip(bodies, answers))
    in_process = [(name, policy) for name, policy in configs if name != STREAMS]
    tables = []
    for inner, make_app, calls in (
            ("an app that answers at once", lambda: canned_app(exchanges), 2000),
            ("the FastAPI prediction app", lambda: serving.prediction_app(
                lambda X: models.predict_proba(model, X), X.shape[1]), 500)):
        tables.append(guard_cpu_cost(wrappers(in_process), make_app, bodies, rounds, calls))
        print_table(f"the guard's own CPU time per request, in process, around {inner} ({rounds} rounds x "
                    f"{calls} calls; medians)", tables[-1])
    print_table(f"the in-process monitor's CPU time per observation by batch size ({rounds} rounds; medians)",
                monitor_cost_by_batch(dict(configs)[ALL_ON], X, models.predict_proba(model, X).argmax(axis=1), rounds))
    print_table("the targets (this run)", targets(http, tables[0]))


if __name__ == "__main__":
    main()
