"""Instructions per request on the guard's request path, counted by Valgrind's callgrind: the
noise-free companion of ``benchmarks.perf.overhead`` for a shared machine, where CPU times move by
2x between identical runs and instruction counts do not move at all.

Run: ``python -m benchmarks.perf.instructions [--calls N]`` (needs ``valgrind`` on PATH; about a
minute per configuration, the interpreter running some 50x slower under it).

Each configuration of ``benchmarks.perf.configs`` (bare, ``round:2``, everything on in process, and
for scale the minimal rewriting middleware ``MinimalRewrite``) wraps the app that answers at once
and is called in process on the digits test queries, as in ``overhead``'s in-process table: a
child process under callgrind builds the app, warms it up, and only then is counting switched on
(``callgrind_control -i on``), for ``--calls`` requests, the monitor drained every 32 as there
(with the monitor's ``max_delay`` lifted: under callgrind the requests run some 50 times slower
than its bound, which would make them wait for it). Threads are counted apart: the calling
thread's instructions are the request path's, the others' (the in-process monitor's worker) the
monitor's, in batches that fall as the threads' timing makes them; so a second table counts the
monitor judging one client's observations in batches of 1, 4 and 32 on the calling thread, as
``overhead``'s by-batch table times it, once the client's history fills PRADA's window of
distances. Instructions
are not time (caches, branch prediction, the interpreter lock are not in them), but a change that
removes work shows here on a machine too noisy to show it in seconds.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.perf.attacks import Rows, print_table

DRAIN_EVERY = 32
WARM_UP = 64
# Observations a monitor cell judges before counting (in batches of 64): more than PRADA's default
# 5000-distance window, so that its state is that of a client with a long history, as in service.
STEADY = 5_200


def child(name: str, data: Path, calls: int, ready: Path, go: Path) -> None:
    """Under callgrind: build what ``name`` names, warm it up, say so (``ready``), wait until
    counting is on (``go``), then do ``calls`` units of work: a configuration of
    ``benchmarks.perf.configs`` around the app that answers at once serves requests (the monitor
    drained every 32); ``monitor:B`` (everything on's monitor) judges one client's observations in
    batches of ``B``, on this thread, once ``STEADY`` of them are judged."""
    from benchmarks.perf.configs import ALL_ON, call_in_turn, canned_app, configurations, guarded_requests, wrappers
    from guard import GuardMiddleware
    from guard.detectors.base import Observation

    exchanges = [(body.encode(), answer.encode()) for body, answer in json.loads(data.read_text())]
    policies = dict(configurations())
    if name.startswith("monitor:"):
        size = int(name.split(":")[1])
        monitor = GuardMiddleware(canned_app([]), policies[ALL_ON]).monitoring.monitor.monitor
        queries = [(np.array([json.loads(body)["features"]]), json.loads(answer)["probabilities"])
                   for body, answer in exchanges]
        stream = [Observation("client", features, [answer.index(max(answer))], "/predict")
                  for features, answer in queries]

        async def judge(start: int, stop: int, batch: int) -> None:
            for first in range(start, stop, batch):
                await monitor.process([stream[i % len(stream)] for i in range(first, min(first + batch, stop))])

        async def warm_up() -> int:
            await judge(0, STEADY, 64)
            return STEADY

        async def work(start: int, stop: int) -> None:
            await judge(start, stop, size)
    else:
        # Under callgrind the interpreter runs some 50 times slower while the monitor's bound on the
        # sanction delay stays in seconds: at the default 20 ms, requests would wait for the monitor
        # (as 10 in 4,000 do at full speed), and the waiting would be counted. The bound is lifted.
        unhurried = [(config, policy if policy is None else policy.model_copy(update={
            "monitor": policy.monitor.model_copy(update={"max_delay": 60.0})}))
            for config, policy in configurations()]
        app = dict(wrappers(unhurried))[name](canned_app(exchanges))
        requests = guarded_requests([body for body, _ in exchanges])
        drained = app.monitoring.monitor if isinstance(app, GuardMiddleware) else None

        async def work(start: int, stop: int) -> None:
            for first in range(start, stop, DRAIN_EVERY):
                await call_in_turn(app, requests, first, min(first + DRAIN_EVERY, stop))
                if drained is not None:
                    await drained.drain()

        async def warm_up() -> int:
            await work(0, WARM_UP)
            return WARM_UP

    async def run() -> None:
        first = await warm_up()
        ready.touch()
        while not go.exists():
            await asyncio.sleep(0.05)
        await work(first, first + calls)

    asyncio.run(run())
    os._exit(0)  # counting is still on: the interpreter's own shutdown would be counted too


def thread_totals(directory: Path) -> list[int]:
    """Each thread's instruction count in callgrind's output files (``--separate-threads``), the
    main thread first."""
    totals = []
    for path in sorted(directory.glob("cg-*")):
        line = next(line for line in path.read_text().splitlines() if line.startswith(("totals:", "summary:")))
        totals.append(int(line.split()[1]))
    return totals


def count(name: str, data: Path, calls: int) -> tuple[float, float]:
    """Instructions per unit of ``child``'s work on its calling thread, and on every other thread."""
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        ready, go = directory / "ready", directory / "go"
        command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
                   f"--callgrind-out-file={directory / 'cg'}", sys.executable, "-m", "benchmarks.perf.instructions",
                   "--child", name, str(data), str(calls), str(ready), str(go)]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "PYTHONHASHSEED": "0"})
        while not ready.exists():
            if process.poll() is not None:
                raise RuntimeError(f"{name}: the child ended before counting ({process.stderr.read()[-2000:]})")
            time.sleep(0.1)
        subprocess.run(["callgrind_control", "-i", "on", str(process.pid)], check=True, capture_output=True)
        go.touch()
        _, errors = process.communicate()
        if process.returncode:
            raise RuntimeError(f"{name}: the child failed ({errors[-2000:]})")
        main, *others = thread_totals(directory)
    return main / calls, sum(others) / calls


def measure(calls: int, sizes: tuple[int, ...] = (1, 4, 32)) -> tuple[Rows, Rows]:
    """Instructions per request on the request path (and in the in-process monitor's thread,
    whose batches fall as the threads' timing makes them), per configuration, with the request
    path's added to bare's; and everything on's monitor judging one client's observations in
    batches of each of ``sizes`` (deterministic), per observation."""
    import torch

    from benchmarks import models
    from benchmarks.perf.configs import configurations, wrappers
    from benchmarks.perf.overhead import digits_model

    torch.set_num_threads(1)
    model, X = digits_model()
    bodies = [json.dumps({"features": x}) for x in X.tolist()]
    answers = [json.dumps({"probabilities": p}, separators=(",", ":")) for p in models.predict_proba(model, X).tolist()]
    requests: Rows = []
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch) / "exchanges.json"
        data.write_text(json.dumps(list(zip(bodies, answers))))
        for name, _ in wrappers(configurations()):
            request_path, monitor = count(name, data, calls)
            requests.append({"configuration": name, "request path instructions": request_path,
                             "monitor thread instructions/obs": monitor})
        batches = [{"batch size": size, "monitor instructions/obs": count(f"monitor:{size}", data, calls)[0]}
                   for size in sizes]
    bare = requests[0]["request path instructions"]
    for row in requests:
        row["added"] = row["request path instructions"] - bare
        row["ratio to bare"] = row["request path instructions"] / bare
    return requests, batches


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="requests counted per configuration")
    parser.add_argument("--child", nargs=5, metavar=("NAME", "DATA", "CALLS", "READY", "GO"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        name, data, calls, ready, go = args.child
        child(name, Path(data), int(calls), Path(ready), Path(go))
        return
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("benchmarks.perf.instructions needs valgrind (callgrind) on PATH")
    requests, batches = measure(args.calls)
    print_table(f"instructions per request, in process, around an app that answers at once ({args.calls} "
                "requests; callgrind)", requests)
    print_table(f"everything on's monitor: instructions per observation judged in batches ({args.calls} "
                "observations, one client; callgrind)", batches)


if __name__ == "__main__":
    main()
