"""Instructions per request on the guard's request path, counted by Valgrind's callgrind: the
noise-free companion of ``benchmarks.perf.overhead`` for a shared machine, where CPU times move by
2x between identical runs and instruction counts do not move at all.

Run: ``python -m benchmarks.perf.instructions [--calls N]`` (needs ``valgrind`` on PATH; about a
minute per configuration, the interpreter running some 50x slower under it).

Each configuration of ``benchmarks.perf.configs`` (bare, ``round:2``, everything on in process)
wraps the app that answers at once and is called in process on the digits test queries, as in
``overhead``'s in-process table: a child process under callgrind builds the app, warms it up, and
only then is counting switched on (``callgrind_control -i on``), for ``--calls`` requests, the
monitor drained every 32 as there. Threads are counted apart: the calling thread's instructions
are the request path's, the others' (the in-process monitor's worker) the monitor's. Instructions
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

from benchmarks.perf.attacks import Rows, print_table

DRAIN_EVERY = 32
WARM_UP = 64


def child(name: str, data: Path, calls: int, ready: Path, go: Path) -> None:
    """Under callgrind: build configuration ``name`` around the app that answers at once, warm it
    up, say so (``ready``), wait until counting is on (``go``), then serve ``calls`` requests."""
    from benchmarks.perf.configs import call_in_turn, canned_app, configurations, guarded_requests
    from guard import GuardMiddleware

    exchanges = [(body.encode(), answer.encode()) for body, answer in json.loads(data.read_text())]
    policy = dict(configurations())[name]
    app = canned_app(exchanges)
    app = app if policy is None else GuardMiddleware(app, policy)
    monitor = app.monitoring.monitor if policy is not None else None
    requests = guarded_requests([body for body, _ in exchanges])

    async def serve(start: int, stop: int) -> None:
        for first in range(start, stop, DRAIN_EVERY):
            await call_in_turn(app, requests, first, min(first + DRAIN_EVERY, stop))
            if monitor is not None:
                await monitor.drain()

    async def run() -> None:
        await serve(0, WARM_UP)
        ready.touch()
        while not go.exists():
            await asyncio.sleep(0.05)
        await serve(WARM_UP, WARM_UP + calls)

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
    """Instructions per request on the calling thread, and on every other thread, for ``name``."""
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


def measure(calls: int) -> Rows:
    """One row per configuration: instructions per request on the request path and in the monitor's
    thread, and the request path's added to bare's."""
    import torch

    from benchmarks import models
    from benchmarks.perf.configs import configurations
    from benchmarks.perf.overhead import digits_model

    torch.set_num_threads(1)
    model, X = digits_model()
    bodies = [json.dumps({"features": x}) for x in X.tolist()]
    answers = [json.dumps({"probabilities": p}, separators=(",", ":")) for p in models.predict_proba(model, X).tolist()]
    rows: Rows = []
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch) / "exchanges.json"
        data.write_text(json.dumps(list(zip(bodies, answers))))
        for name, _ in configurations():
            request_path, monitor = count(name, data, calls)
            rows.append({"configuration": name, "request path instructions": request_path,
                         "monitor instructions/obs": monitor})
    bare = rows[0]["request path instructions"]
    for row in rows:
        row["added"] = row["request path instructions"] - bare
        row["ratio to bare"] = row["request path instructions"] / bare
    return rows


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
    print_table(f"instructions per request, in process, around an app that answers at once ({args.calls} "
                "requests; callgrind)", measure(args.calls))


if __name__ == "__main__":
    main()
