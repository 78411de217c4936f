"""The privacy report of a DP-SGD run: plain, JSON-serialisable data saved next to the model."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class PrivacyReport:
    """What a DP-SGD run guarantees, in the terms a reader needs to judge it.

    ``epsilon`` is the accountant's bound on the privacy loss of the whole run at ``delta``, read
    after training; ``history`` is the accountant's raw composition, ``[noise_multiplier,
    sample_rate, steps]`` segments, from which anyone can recompute it. ``audit`` is an empirical
    lower bound on epsilon (``guard.dp.audit``), read with :meth:`audit_summary`.
    """

    epsilon: float
    delta: float
    target_epsilon: float
    accountant: str
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    expected_batch_size: float
    steps: int
    epochs: int
    dataset_size: int
    history: list[list[float]]
    grad_sample_mode: str
    world_size: int = 1
    unit_of_privacy: str = "one example (one row of the training data)"
    adjacency: str = "add/remove one example"
    sampling: str = "Poisson (each example joins each logical batch independently)"
    scope: str = ("covers the final model and every checkpoint or intermediate model of the run; "
                  "post-processing cannot weaken it")
    noise_rng: str = "torch PRNG (not cryptographically secure)"
    model_changes: list[str] = field(default_factory=list)
    public_rows: int = 0  # rows of public data the model was pretrained on without privacy (guard.dp.public)
    test_accuracy: float | None = None
    non_private_test_accuracy: float | None = None
    public_only_test_accuracy: float | None = None  # the model pretrained on the public rows, before DP-SGD
    classes: list | None = None  # the original label of each class index, when labels were mapped
    audit: dict | None = None  # guard.dp.audit.EpsilonAudit.as_dict() of an audit of this run's settings
    notices: list[str] = field(default_factory=list)  # the accountant's warnings about epsilon, one line each

    def audit_summary(self) -> str:
        """The audited lower bound beside the accountant's epsilon, and what it means."""
        if self.audit is None:
            return "not audited"
        a = self.audit
        verdict = ("ABOVE the accountant's epsilon: this training does not deliver the privacy it "
                   "reports (a bug in clipping, noise, sampling or accounting)"
                   if a["epsilon_lower_bound"] > a["epsilon"] else
                   "at or below the accountant's epsilon, as it must be; a bound far below it is "
                   "expected (one attack, one run), a bound above it would mean a bug")
        return (f"audited epsilon >= {a['epsilon_lower_bound']:.2f} at delta {a['delta']:.2g} with "
                f"{a['confidence']:.0%} confidence ({a['method']}; {a['correct']} of {a['guesses']} "
                f"guesses right on {a['canaries']} canaries), beside the accountant's epsilon "
                f"{a['epsilon']:.2f} at that delta: {verdict}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def save(self, path: str | Path) -> None:
        write_atomic(Path(path), self.to_json().encode())

    @classmethod
    def load(cls, path: str | Path) -> PrivacyReport:
        return cls(**json.loads(Path(path).read_text()))


def write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)

