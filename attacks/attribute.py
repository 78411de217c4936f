"""Learned attribute inference, beside MAP (``attacks.inversion.MAPAttribute``), in the same threat model:
the attacker knows a record's other attributes and its label, not the discrete attribute in column
``attribute``, and may query the model on the record completed with each candidate value.

- ``LearnedAttribute``: the black-box attack model of Fredrikson et al. (USENIX Security 2014, sec. 4,
  where MAP is the attack) made learnt, as in ART's ``AttributeInferenceBlackBox``: the attacker queries
  the target on its own records completed with every candidate value, and trains a classifier from
  (other attributes, label, the target's answers for each value) to the true value; it is then applied
  to the victims' answers. The classifier is chosen by cross-validated accuracy on the attacker's
  records among the same candidates as the no-model reference (``best_classifier``), which sees the
  same inputs without the answers.
- ``MembershipAttribute``: attribute inference through membership inference (Yeom, Giacomelli,
  Fredrikson, Jha, CSF 2018, sec. 5, the reduction of attribute to membership inference; ART's
  ``AttributeInferenceMembership``): each candidate completion is scored by a membership attack, and the
  value whose completion looks most like a member is the guess. Meaningful for the target's members.

Both measure accuracy (and precision on the positive value) overall and for members and non-members,
beside the no-model reference (``attribute_reference``) and the prior's mode, as MAP does.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from attacks.base import AttackResult
from attacks.inversion import MAPAttribute, attribute_reference, best_classifier
from attacks.targets import Target


class LearnedAttribute(MAPAttribute):
    """The learnt black-box attack model (see the module docstring). Reads what the target answers:
    probabilities, or (label-only APIs) the predicted labels, one-hot."""

    name = "learned-attribute"

    def __init__(self, attribute: int, values: np.ndarray, positive: float | None = None, seed: int = 0):
        super().__init__(attribute, values, positive, seed=seed)

    def run(self, target: Target, records: np.ndarray, labels: np.ndarray, aux_X: np.ndarray,
            aux_y: np.ndarray, truth: np.ndarray | None = None,
            members: np.ndarray | None = None) -> AttackResult:
        """Infer column ``attribute`` of ``records`` from their ``labels``; ``truth`` and ``members`` only
        measure (as ``MAPAttribute.run``)."""
        records, labels = np.asarray(records, dtype=np.float64), np.asarray(labels)
        aux_X, aux_y = np.asarray(aux_X, dtype=np.float64), np.asarray(aux_y)
        queries_before = target.queries
        model = best_classifier(self._inputs(target, aux_X, aux_y), self._codes(aux_X), self.seed)
        guesses = self.values[model.predict(self._inputs(target, records, labels))]
        return self._result(target, queries_before, guesses, records, labels, aux_X, aux_y, truth, members)

    def _inputs(self, target: Target, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Other attributes, one-hot label, the target's answers for the record with each value, and
        the log of each answer's confidence in the label (MAP's likelihood, floored at 1e-6; against
        labels only, whether the answer is the label)."""
        candidates = np.repeat(X, len(self.values), axis=0)
        candidates[:, self.attribute] = np.tile(self.values, len(X))
        answers = target.answer(candidates)
        if answers.ndim == 1:
            answers = np.eye(target.n_classes)[answers]
        answers = answers.reshape(len(X), len(self.values), -1)
        likelihood = np.log(np.maximum(answers[np.arange(len(X)), :, y], 1e-6))
        return np.column_stack([np.delete(X, self.attribute, axis=1), np.eye(target.n_classes)[y],
                                answers.reshape(len(X), -1), likelihood])

    def _result(self, target: Target, queries_before: int, guesses: np.ndarray, records: np.ndarray,
                labels: np.ndarray, aux_X: np.ndarray, aux_y: np.ndarray, truth: np.ndarray | None,
                members: np.ndarray | None, **artefacts: Any) -> AttackResult:
        metrics = {}
        if truth is not None:
            reference = attribute_reference(aux_X, aux_y, self.attribute, self.values, target.n_classes, self.seed)
            prior = self._count(self._codes(aux_X), len(self.values))
            metrics = self._measures(guesses, reference(records, labels), np.asarray(truth, dtype=np.float64),
                                     prior, members)
        return AttackResult(self.name, metrics, target.queries - queries_before, {"guesses": guesses, **artefacts})


class MembershipAttribute(LearnedAttribute):
    """Attribute inference by membership inference (Yeom et al. 2018, sec. 5): ``membership`` is a
    membership attack (``attacks.membership``) run on every candidate completion with
    ``membership_options`` (e.g. a shadow attack's ``population``); the guess is the value of the
    highest-scoring completion."""

    name = "membership-attribute"

    def __init__(self, attribute: int, values: np.ndarray, membership: Any, positive: float | None = None,
                 seed: int = 0, **membership_options: Any):
        super().__init__(attribute, values, positive, seed=seed)
        self.membership = membership
        self.membership_options = membership_options

    def run(self, target: Target, records: np.ndarray, labels: np.ndarray, aux_X: np.ndarray,
            aux_y: np.ndarray, truth: np.ndarray | None = None,
            members: np.ndarray | None = None) -> AttackResult:
        records, labels = np.asarray(records, dtype=np.float64), np.asarray(labels)
        queries_before = target.queries
        candidates = np.repeat(records, len(self.values), axis=0)
        candidates[:, self.attribute] = np.tile(self.values, len(records))
        scored = self.membership.run(target, candidates, np.repeat(labels, len(self.values)),
                                     **self.membership_options)
        scores = np.asarray(scored.artefacts["scores"]).reshape(len(records), len(self.values))
        guesses = self.values[scores.argmax(axis=1)]
        return self._result(target, queries_before, guesses, records, labels, np.asarray(aux_X, dtype=np.float64),
                            np.asarray(aux_y), truth, members, scores=scores)
