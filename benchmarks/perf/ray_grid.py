"""Grid wall time on the local process pool beside Ray tasks on one node and on two nodes.

Run: ``python -m benchmarks.perf.ray_grid [--grid quick] [--repeats 3] [--cpus 2] [--address ADDR]``.

Every run starts from an empty cache, so each target, reference model and cell is computed. Without
``--address`` the script starts its own clusters on this machine with ``ray start``: one node with
``--cpus`` CPUs, then two nodes of ``--cpus`` CPUs each. On one machine the two nodes share its
cores, so the second figure is a speed-up only where the machine has twice ``--cpus`` cores free;
``--address`` times an existing (multi-machine) cluster instead.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from benchmarks import grid, run
from benchmarks.executors import Executor, LocalPool, RayCluster
from benchmarks.perf.attacks import Rows, print_table

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _cluster_processes(temp: Path, port: int) -> set:
    """Live processes of the cluster whose files are in ``temp`` and head on ``port`` (the client
    server names only the head's address), with all their descendants."""
    import psutil

    def ours(arguments: list[str]) -> bool:
        return any(str(temp) in a or a.endswith(f":{port}") for a in arguments)
    found = {p for p in psutil.process_iter(["cmdline"]) if ours(p.info["cmdline"] or [])}
    for process in list(found):
        with contextlib.suppress(psutil.NoSuchProcess):
            found.update(process.children(recursive=True))
    return found


@contextlib.contextmanager
def local_cluster(nodes: int, cpus: int, temp: Path) -> Iterator[str]:
    """A Ray cluster of ``nodes`` nodes with ``cpus`` CPUs each on this machine, its files in
    ``temp``; yields the head's address. Afterwards every process it started is ended (``ray stop``
    would end every other cluster on the machine as well)."""
    import psutil

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "RAY_USAGE_STATS_ENABLED": "0"}
    start = [sys.executable, "-m", "ray.scripts.scripts", "start", f"--num-cpus={cpus}", "--disable-usage-stats"]
    try:
        subprocess.run([*start, "--head", f"--port={port}", f"--temp-dir={temp}", "--include-dashboard=false",
                        f"--ray-client-server-port={_free_port()}"], env=env, check=True, capture_output=True,
                       timeout=300)
        for _ in range(nodes - 1):
            subprocess.run([*start, f"--address=127.0.0.1:{port}"], env=env, check=True, capture_output=True,
                           timeout=300)
        yield f"127.0.0.1:{port}"
    finally:
        started = _cluster_processes(temp, port)
        for process in started:
            process.terminate()
        _, alive = psutil.wait_procs(started, timeout=10)
        for process in alive:
            process.kill()


def _seconds(config: grid.BenchConfig, executor: Executor, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            run.run(config, Path(folder) / "report", executor, Path(folder) / "cache", progress=False)
            times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", default="quick", choices=sorted(grid.GRIDS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the pool and of each Ray node")
    parser.add_argument("--address", help="an existing Ray cluster to time instead of local ones")
    options = parser.parse_args()
    config = grid.configure(options.grid, command=f"benchmarks.perf.ray_grid --grid {options.grid}")
    rows: Rows = []

    def measure(name: str, nodes: int | str, executor: Executor) -> None:
        times = _seconds(config, executor, options.repeats)
        rows.append({"executor": name, "nodes": nodes, "cpus per node": options.cpus,
                     "median_s": statistics.median(times), "runs_s": " ".join(f"{t:.1f}" for t in times)})

    measure("local pool", 1, LocalPool(options.cpus))
    if options.address:
        measure("ray", options.address, RayCluster(options.address))
    else:
        for nodes in (1, 2):
            with tempfile.TemporaryDirectory() as temp, local_cluster(nodes, options.cpus, Path(temp)) as address:
                measure("ray", nodes, RayCluster(address))
    print(f"grid {options.grid}: {len(grid.cells(config))} cells; {os.cpu_count()} cores; load average "
          f"{os.getloadavg()[0]:.1f} at the end")
    print_table("grid wall time", rows)


if __name__ == "__main__":
    main()
