"""The default grid's attacks derived from a full run: per defence, the attacks that were the
strongest of their family on some target, and whether the default grid (``grid.STRONGEST``) holds
them; then the full run's verdicts recomputed from those rows alone, which must equal its own.

Run: ``guard bench --full --seed 0 --out full && python -m benchmarks.perf.strongest full/results.json``.
"""
from __future__ import annotations

import argparse
import json

from benchmarks import grid, verdicts


def strongest(rows: list[verdicts.Row]) -> dict[str, set[str]]:
    """Per defence, the attacks strongest in their (dataset, model, family) against it."""
    chosen: dict[str, set[str]] = {}
    for (_, _, _, defence), group in verdicts.group(rows, ("dataset", "model", "family", "defence")).items():
        if (best := verdicts.strongest(group)) is not None:
            chosen.setdefault(defence, set()).add(best["attack"].split(" (")[0])
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="results.json of a full run")
    rows = json.loads(open(parser.parse_args().results).read())["rows"]
    chosen = strongest(rows)
    for defence, attacks in chosen.items():
        missing = sorted(attacks - set(grid.STRONGEST.get(defence, ())))
        print(f"{defence}: {sorted(attacks)}" + (f"; not in the default grid: {missing}" if missing else ""))
    kept_attacks = grid.with_undefended({defence: tuple(attacks) for defence, attacks in chosen.items()})
    kept = [r for r in rows if r["attack"].split(" (")[0] in kept_attacks.get(r["defence"], ())]
    print("verdicts from these attacks alone equal the full run's:", verdicts.verdicts(kept) == verdicts.verdicts(rows))


if __name__ == "__main__":
    main()
