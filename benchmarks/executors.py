"""Where cells run: in this process, a local pool of spawned processes, or Ray tasks on a cluster.

Each executor calls ``function(task)`` for every task and ``done(task, result)`` in this process as
each finishes. On any exception in the caller's process (Ctrl-C, SIGTERM turned into
``KeyboardInterrupt`` by the driver) or in a task, it ends every worker it started before the
exception propagates.
"""
from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")
POLL_S = 0.2


class Executor(Protocol):
    def run(self, function: Callable[[T], R], tasks: Sequence[T], done: Callable[[T, R], None]) -> None:
        """``done(task, function(task))`` for every task, in the order they finish."""


def prepare_worker(threads: int) -> None:
    """A worker's settings: ``threads`` torch threads, sanction logs off (the report records them)."""
    import torch

    torch.set_num_threads(threads)
    logging.getLogger("guard.sanctions").setLevel(logging.ERROR)


def _prepare_pool_worker(threads: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the driver decides
    prepare_worker(threads)


class LocalPool:
    """``workers`` spawned processes (one: this process), each with ``threads`` torch threads."""

    def __init__(self, workers: int, threads: int = 1) -> None:
        self.workers, self.threads = workers, threads

    def run(self, function: Callable[[T], R], tasks: Sequence[T], done: Callable[[T, R], None]) -> None:
        if self.workers == 1 or len(tasks) <= 1:
            prepare_worker(self.threads)
            for task in tasks:
                done(task, function(task))
            return
        import multiprocessing
        import time

        pool = multiprocessing.get_context("spawn").Pool(min(self.workers, len(tasks)), _prepare_pool_worker,
                                                          (self.threads,))
        try:
            pending = [(task, pool.apply_async(function, (task,))) for task in tasks]
            while pending:
                finished = [(task, result) for task, result in pending if result.ready()]
                for task, result in finished:
                    done(task, result.get())
                # drop those found ready, not those ready now: one that finished after the scan waits for the next
                collected = {id(result) for _, result in finished}
                pending = [(task, result) for task, result in pending if id(result) not in collected]
                if not finished:
                    time.sleep(POLL_S)
            pool.close()
        finally:
            pool.terminate()  # SIGTERM to every worker, then joined
            pool.join()


class RayCluster:
    """Ray tasks on the cluster at ``address`` (``auto``: Ray's own choice, ``RAY_ADDRESS`` or the
    cluster running on this machine, else a new local one), each declaring ``cpus`` CPUs and
    ``gpus`` GPUs. Every node needs this package installed."""

    def __init__(self, address: str, cpus: int = 1, gpus: float = 0) -> None:
        self.address, self.cpus, self.gpus = address, cpus, gpus

    def run(self, function: Callable[[T], R], tasks: Sequence[T], done: Callable[[T, R], None]) -> None:
        import ray

        ray.init(address=None if self.address == "auto" else self.address, log_to_driver=False,
                 logging_level=logging.WARNING)
        pending: dict[Any, T] = {}
        try:
            remote = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=0)(_in_ray_worker)
            pending = {remote.remote(function, task, self.cpus): task for task in tasks}
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
                for ref in ready:
                    done(pending.pop(ref), ray.get(ref))
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            ray.shutdown()


def _in_ray_worker(function: Callable[[Any], Any], task: Any, threads: int) -> Any:
    prepare_worker(threads)
    return function(task)
