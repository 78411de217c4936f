"""The cells of a bench run: its configuration, the named grids (``quick``, ``default``, ``full``),
and the (dataset, model, seed, defence) cells a run is made of.

A cell is the unit of work an executor runs: every attack on one defence of one target. Cells of one
(dataset, model, seed) share the target, the evaluator and the attacker's reference models through
``benchmarks.cache``; their keys are derived from the whole configuration (``recipe``), never from a
hand-written list of fields.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from attacks.ensemble import TrainingConfig
from benchmarks.scenarios import ATTACK_SPECS, DEFENCES, watermark_defences

TARGETS = {"digits": ("softmax", "mlp"), "breast_cancer": ("mlp",), "faces": ("softmax", "mlp"),
           "faces64": ("softmax", "mlp")}
DEFAULT_MAX_BODY_BYTES = 1 << 20  # the guard's default request-body limit


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run; ``asdict`` of it is recorded in ``results.json``. Its defaults are the whole
    grid (``--full``)."""

    datasets: tuple[str, ...] = ("digits", "breast_cancer")  # faces on request: its MLP and black-box MI-Face are slow
    defences: tuple[str, ...] = tuple(DEFENCES)
    attacks: tuple[str, ...] = tuple(ATTACK_SPECS)
    seeds: tuple[int, ...] = (0, 1, 2)
    quick: bool = False
    live: bool = False
    epochs: int | None = None  # None: the target recipe's epochs, sized to the data (models.Recipe.sized)
    model: str | None = None  # a user model factory "module:function" (n_features, n_classes) -> nn.Module
    hidden: int | None = None  # the target MLP's hidden units (None: the recipe's)
    activation: str | None = None  # the target MLP's activation (None: the recipe's)
    lr: float | None = None  # the target's learning rate (None: the recipe's)
    min_train_accuracy: float | None = None  # the floor on a target's training-set accuracy (None: models.train_accuracy_floor)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # the guard's request-body limit; batches are sized to it
    sensitive: str | None = None  # the sensitive column of users' data sets (attribute inference)
    command: str = ""
    training: dict[str, Any] = field(default_factory=lambda: asdict(TrainingConfig()))
    against: dict[str, tuple[str, ...]] | None = None  # per defence, the attacks run on it (None: all)


SELECTORS = ("datasets", "defences", "attacks", "seeds", "command", "against")
"""The fields that choose which cells a run holds (or only describe it), not what a cell computes."""

STRONGEST: dict[str, tuple[str, ...]] = {
    "none": ("copycat-k-center", "equation-solving", "lira-online", "map-attribute", "mi-face", "rmia-online"),
    "round:2": ("equation-solving-rounding-aware", "inverse-model", "knockoff-adaptive", "lira-offline",
                "lira-rounding-aware", "map-attribute", "rmia-online"),
    "round:1": ("inverse-model", "knockoff-adaptive", "lira-online", "lira-rounding-aware", "map-attribute-label-only",
                "rmia-online"),
    "top_k:1": ("copycat", "equation-solving", "inverse-model", "knockoff-adaptive", "label-only-calibrated-offline",
                "lira-offline", "map-attribute", "rmia-online"),
    "label_only": ("copycat", "copycat-k-center", "inverse-model", "knockoff-adaptive",
                   "label-only-calibrated-offline", "map-attribute-label-only"),
    "noise": ("equation-solving", "inverse-model", "knockoff-adaptive", "lira-averaged-noise", "lira-online",
              "map-attribute-label-only", "mi-face-blackbox", "rmia-online"),
    "reverse_sigmoid": ("copycat", "copycat-k-center", "equation-solving", "inverse-model-inverted-reverse-sigmoid",
                        "lira-inverted-reverse-sigmoid", "lira-online", "map-attribute-label-only", "rmia-offline"),
    "monitoring": ("equation-solving", "inverse-model", "knockoff-adaptive", "lira-online", "map-attribute"),
    "dp-eps1": ("equation-solving", "knockoff-adaptive", "lira-online", "map-attribute", "mi-face", "rmia-offline"),
    "dp-eps8": ("equation-solving", "lira-offline", "lira-online", "map-attribute", "mi-face", "rmia-offline",
                "rmia-online", "threshold"),
}
STRONGEST["dp-eps8-public"] = tuple(a for a in STRONGEST["dp-eps8"] if a != "mi-face")
EQUIVALENT_ON = ("none", "round:2", "monitoring", "dp-eps1", "dp-eps8", "dp-eps8-public")
STRONGEST = {defence: tuple(sorted((*attacks, "functionally-equivalent"))) if defence in EQUIVALENT_ON else attacks
             for defence, attacks in STRONGEST.items()}
"""The default grid's attacks on each defence: those that were the strongest of their family against
it on some target (digits softmax and MLP, breast cancer MLP) in the full grid's seed 0, so that the
default's verdicts and summary are the full run's on that seed, at the full run's budgets and
reference counts. ``python -m benchmarks.perf.strongest results.json`` derives it from a full run.
The RMIA entries come from a membership-only run of seed 0 (every membership attack on every defence
but label_only and monitoring): RMIA was the strongest there on at least one target of each. The
publicly pretrained DP target gets dp-eps8's, without inversion (``benchmarks.cells``: not judged there).
Functionally equivalent extraction, newer than the full run these come from, is added by hand
(``EQUIVALENT_ON``) where answers keep the precision it needs (the undefended model, monitoring, the DP
targets) and on 2-decimal rounding, the mildest defence that takes that precision away."""

OWNERSHIP_SUITE = ("copycat", "copycat-k-center", "knockoff-adaptive", "jacobian", "equation-solving",
                   "functionally-equivalent")
"""The default grid's attacks on the watermark defences: every extraction attack, whose copies the
ownership family verifies (``benchmarks.ownership``)."""
OWNERSHIP = {defence.name: OWNERSHIP_SUITE for defence in watermark_defences()}

DEFAULT_AGAINST = {**STRONGEST, **OWNERSHIP}

GRIDS: dict[str, dict[str, Any]] = {
    "full": {},
    "default": {"seeds": (0,), "against": DEFAULT_AGAINST,
                "attacks": tuple(a for a in ATTACK_SPECS if any(a in chosen for chosen in DEFAULT_AGAINST.values()))},
    "quick": {"datasets": ("digits",), "seeds": (0,), "quick": True,
              "defences": ("none", "round:1", "label_only", "monitoring", "dp-eps8"),
              "attacks": ("equation-solving", "equation-solving-rounding-aware", "knockoff-adaptive",
                          "lira-online", "lira-rounding-aware", "label-only-calibrated", "map-attribute",
                          "map-attribute-label-only")},
}
"""What ``guard bench``, ``--quick`` and ``--full`` run. ``quick`` (a smoke test in under a minute; its
attribute attacks run where the data has a sensitive column, ``--sensitive``) also halves the attacks' training and reference counts; ``default`` and ``full`` run every attack at
the same strength."""


def configure(grid: str = "default", **options: Any) -> BenchConfig:
    """The configuration of the named grid with ``options`` (those not None) over it; attacks chosen
    by name run on every defence."""
    chosen = {name: value for name, value in options.items() if value is not None}
    if "attacks" in chosen:
        chosen["against"] = None
    return replace(BenchConfig(), **{**GRIDS[grid], **chosen})


def attacks_on(config: BenchConfig, defence: str) -> tuple[str, ...]:
    """The attacks of ``config`` run on ``defence``."""
    return config.attacks if config.against is None else tuple(
        a for a in config.attacks if a in with_undefended(config.against).get(defence, ()))


def with_undefended(against: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """``against`` with every attack run on some defence also run undefended (the attack it adapts,
    for an adapted one), so that each verdict compares the same attacks on both sides
    (``benchmarks.verdicts``)."""
    undefended = set(against.get("none", ())) | {ATTACK_SPECS[a].adapts or a for chosen in against.values()
                                                  for a in chosen}
    return {**against, "none": tuple(sorted(undefended))}


def from_recorded(recorded: dict[str, Any]) -> BenchConfig:
    """The configuration a ``results.json`` recorded (lists back to tuples)."""
    names = {f.name for f in fields(BenchConfig)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items() if k in names}
    return BenchConfig(**values)


def recipe(config: BenchConfig) -> dict[str, Any]:
    """Every field of ``config`` that can change what a cell computes (all but ``SELECTORS``)."""
    return {name: value for name, value in asdict(config).items() if name not in SELECTORS}


def targets(config: BenchConfig, dataset: str) -> tuple[str, ...]:
    """The model kinds attacked on ``dataset``: the zoo's, or the user's model."""
    return ("user",) if config.model else TARGETS.get(dataset, ("mlp",))


@dataclass(frozen=True)
class Cell:
    """Every attack of the run on one defence of one (dataset, model kind, seed) target."""

    dataset: str
    model: str
    seed: int
    defence: str

    @property
    def group(self) -> tuple[str, str, int]:
        """The (dataset, model, seed) whose models the cell shares with its other defences."""
        return self.dataset, self.model, self.seed


def cells(config: BenchConfig) -> list[Cell]:
    """The run's cells in the report's order: by dataset, model, seed, then defence."""
    return [Cell(name, kind, seed, defence) for name in config.datasets for kind in targets(config, name)
            for seed in config.seeds for defence in config.defences]
