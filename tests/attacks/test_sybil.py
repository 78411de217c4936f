"""The key-rotating Sybil attacker (``attacks.sybil.KeyRotatingTarget``) through the real middleware: a
key the guard refuses (here: past its rate limit) is dropped and its rows resent through a fresh key, the
answers come back complete and in order, cover rows are mixed in and discarded, and the attack stops only
when every key is lost."""
from __future__ import annotations

import numpy as np
import pytest

from attacks.sybil import KeyRotatingTarget, KeysExhausted
from attacks.targets import HTTPTarget
from benchmarks import models
from guard import GuardMiddleware, Policy
from guard.identity import key_entry
from guard.serving import prediction_app

KEYS = [f"sybil-{i}" for i in range(8)]


@pytest.fixture(scope="module")
def api(digits_softmax):
    """Digits softmax behind the guard: issued keys, 30 rows a minute per key."""
    app = prediction_app(lambda X: models.predict_proba(digits_softmax, X), 64)
    policy = Policy.from_dict({"secret": "sybil-tests-secret-0123456789",
                               "identity": {"header": "X-API-Key", "keys": [key_entry(k) for k in KEYS]},
                               "routes": {"/predict": {"probabilities": "/probabilities", "features": "/features",
                                                       "rate_limits": ["30/minute"]}}})
    return GuardMiddleware(app, policy)


def rotating(api, keys, **options) -> KeyRotatingTarget:
    return KeyRotatingTarget(lambda key: HTTPTarget("/predict", 10, client=api, api_keys=[key], max_wait=0.05,
                                                    n_features=64), keys, 10, rows_per_request=10, **options)


def test_refused_keys_are_dropped_and_their_rows_resent(api, digits, digits_softmax):
    X = digits.X[:100].astype(np.float64)
    with rotating(api, KEYS, active=2) as target:
        answers = target.predict_proba(X)
    np.testing.assert_allclose(answers, models.predict_proba(digits_softmax, X), atol=1e-6)
    cost = target.cost
    # 30 rows a key: at least 4 keys answered, and every key that was refused was replaced
    assert cost.keys_burned >= 1 and 4 <= cost.keys_used <= len(KEYS)
    assert target.events["throttled_at"] is not None and target.queries == 100
    # spent: the rows, the refused requests' rows (resent), and the one-row probe that found probabilities
    assert cost.queries_spent == 100 + cost.queries_lost + 1 and cost.queries_lost == 10 * cost.keys_burned
    assert cost.hours(per_key_per_hour=1000, parallel=2) == cost.queries_spent / 2000


def test_cover_rows_are_mixed_in_and_their_answers_discarded(digits, digits_softmax):
    app = prediction_app(lambda X: models.predict_proba(digits_softmax, X), 64)
    X, cover = digits.X[:40].astype(np.float64), digits.X[100:200].astype(np.float64)
    target = KeyRotatingTarget(lambda key: HTTPTarget("/predict", 10, client=app, api_keys=[key]), ["a"], 10,
                               natural=cover, natural_share=0.5, rows_per_request=10)
    with target:
        labels = target.predict(X)
    np.testing.assert_array_equal(labels, models.predict_proba(digits_softmax, X).argmax(axis=1))
    assert target.cost.natural_queries == 40 and target.cost.queries_spent == 80


def test_the_attack_stops_when_every_key_is_lost(api, digits):
    with rotating(api, ["sybil-7"]) as target, pytest.raises(KeysExhausted):
        target.predict(digits.X[200:300].astype(np.float64))
    assert target.cost.keys_burned == 1 and target.queries == 30
