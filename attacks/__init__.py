"""predguard's attack suite: what an adversary runs against a model or a prediction endpoint.

``ATTACKS`` maps each attack's stable name to its class. This package never imports ``guard``.
"""
from attacks.base import Attack, AttackResult
from attacks.equivalent import FunctionallyEquivalent
from attacks.extraction import EXTRACTION_ATTACKS
from attacks.inversion import INVERSION_ATTACKS
from attacks.membership import MEMBERSHIP_ATTACKS

ATTACKS: dict[str, type[Attack]] = {**EXTRACTION_ATTACKS, FunctionallyEquivalent.name: FunctionallyEquivalent,
                                    **MEMBERSHIP_ATTACKS, **INVERSION_ATTACKS}

__all__ = ["ATTACKS", "Attack", "AttackResult"]
