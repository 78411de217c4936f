"""``guard bench``'s driver: the grid's cells (``benchmarks.grid``) not yet in the cache
(``benchmarks.cache``) run on an executor (``benchmarks.executors``), each through the real
middleware (``benchmarks.cells``); their rows, summarised over seeds, go to ``benchmarks.report``.

Ctrl-C or SIGTERM ends the executor's workers and writes the report of the finished cells, marked
partial; the next run with the same configuration and cache starts from them.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from benchmarks import datasets, grid, report
from benchmarks.cache import Cache
from benchmarks.cells import CellTask, Outcomes, cell_key, load_dataset, row, run_cell, spec_of
from benchmarks.executors import Executor
from benchmarks.grid import BenchConfig, Cell
from benchmarks.scenarios import DEFENCES, THREAT_MODELS
from guard.dp import default_delta


@dataclass(frozen=True)
class Finished:
    """A run's report files, whether it was interrupted, and its summary table (Markdown)."""

    paths: dict[str, Path]
    partial: bool
    summary: str


def run(config: BenchConfig, out: Path, executor: Executor, cache: Path, progress: bool = True) -> Finished:
    """Run the cells of ``config`` missing from ``cache`` on ``executor`` and write the report into ``out``."""
    from tqdm import tqdm

    store = Cache(cache)
    cells = grid.cells(config)
    outcomes: dict[Cell, Outcomes] = {}
    for cell in cells:
        if (finished := store.outcome(_key(config, cell))) is not None:
            outcomes[cell] = finished
    # defence by defence: cells running side by side then train different targets
    todo = sorted((c for c in cells if c not in outcomes), key=lambda c: config.defences.index(c.defence))
    partial = False
    with tqdm(total=len(cells), initial=len(outcomes), desc="guard bench", disable=not progress,
              unit="cell") as bar:
        def done(task: CellTask, result: Outcomes) -> None:
            store.store(_key(config, task.cell), result)
            outcomes[task.cell] = result
            bar.update()
        try:
            with _sigterm_interrupts():
                executor.run(run_cell, [CellTask(config, cache, cell) for cell in todo], done)
        except KeyboardInterrupt:
            partial = True
    rows = _rows([outcomes[cell] for cell in cells if cell in outcomes])
    recorded = {**_recorded(config), "partial": partial, "cache": str(cache)}
    return Finished(report.write(out, recorded, rows), partial, report.summary_markdown(recorded, rows))


def _key(config: BenchConfig, cell: Cell) -> str:
    """The key of a finished cell: its attacks, and whether it reports the attacks the data cannot
    support (the run's first defence does), are part of its outcome."""
    return cell_key(config, cell, grid.attacks_on(config, cell.defence), cell.defence == config.defences[0])


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM interrupts the run as Ctrl-C does (in the main thread, where signals are handled)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _rows(finished: list[Outcomes]) -> list[report.Row]:
    """One report row per (dataset, model, defence, attack), over the seeds of the finished cells."""
    by_key: dict[tuple, list[dict[str, Any]]] = {}
    for outcomes in finished:
        for key, outcome in outcomes:
            by_key.setdefault(tuple(key), []).append(outcome)
    return [row(key, spec_of(key[3]), results) for key, results in by_key.items()]


def _recorded(config: BenchConfig) -> dict[str, Any]:
    import opacus
    import sklearn

    versions = {"torch": torch.__version__, "numpy": np.__version__, "opacus": opacus.__version__,
                "scikit-learn": sklearn.__version__}
    loaded = {name: load_dataset(name, config.sensitive)[0] for name in config.datasets}
    return {**asdict(config), "versions": versions, "threat_models": THREAT_MODELS,
            # the delta guard.dp defaults to (for the DP bound)
            "dp_delta": {name: default_delta(len(datasets.split(data, config.seeds[0]).train))
                         for name, data in loaded.items()},
            "defence_specs": {name: asdict(DEFENCES[name]) for name in config.defences},
            "targets": {name: grid.targets(config, name) for name in config.datasets},
            "image_shapes": {data.name: data.image_shape for data in loaded.values()}}
