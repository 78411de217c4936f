"""The bench's RMIA rows: on LiRA's references, with the attacker's auxiliary records (which are among
the candidates) as RMIA's population z."""
from __future__ import annotations

import numpy as np

from attacks.ensemble import TrainingConfig
from attacks.targets import TorchTarget
from benchmarks.scenarios import ATTACK_SPECS, DEFENCES, Context, memo


def test_rmia_rows_compare_with_the_auxiliary_part_on_lira_references(digits, digits_split, digits_mlp):
    labels_of = lambda X: np.zeros(len(X), dtype=int)
    shared = memo()
    context = Context(digits, digits_split, "mlp", 64, TrainingConfig(epochs=3), DEFENCES["none"], 0, True,
                      digits_mlp, labels_of, labels_of, shared=shared)
    X, y, is_member = context.candidates()
    aux = context.population_in_candidates()
    assert len(aux) == len(digits_split.aux) and not is_member[aux].any()
    assert sorted(map(bytes, X[aux])) == sorted(map(bytes, digits.X[digits_split.aux].astype(np.float64)))
    online = ATTACK_SPECS["rmia-online"].run(TorchTarget(digits_mlp, 10), context)
    offline = ATTACK_SPECS["rmia-offline"].run(TorchTarget(digits_mlp, 10), context)
    assert online.artefacts["references"] is offline.artefacts["references"]  # shared with LiRA's rows
    assert online.queries == offline.queries == len(y)  # the z are candidates: no extra query
    assert len(online.artefacts["z_ratios"]) == len(aux)
    assert "epsilon_lower_bound" in online.metrics and 0 <= offline.metrics["a"] <= 1
