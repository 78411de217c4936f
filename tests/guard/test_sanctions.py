"""Graduated sanctions: the ladder, expiry, memory of past offences, detector floors, renewal,
and one standing shared by workers through Redis."""
from __future__ import annotations

import asyncio
import uuid

import pytest

from guard.sanctions import Level, SanctionRules, Sanctions, Standing
from guard.store import MemoryStore
from guard.store.redis import RedisStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_repeated_alarms_climb_the_ladder_and_stop_at_its_top():
    sanctions = Sanctions(MemoryStore(), clock=Clock())
    rules = SanctionRules.parse()
    assert (await sanctions.standing("c")).level == Level.NONE
    levels = [(await sanctions.escalate("c", rules, "prada"))[1].level for _ in range(5)]
    assert levels == [Level.LOG, Level.DEGRADE, Level.THROTTLE, Level.BLOCK, Level.BLOCK]
    assert (await sanctions.standing("c")).level == Level.BLOCK
    assert (await sanctions.standing("someone-else")).level == Level.NONE


async def test_sanction_expires_but_is_remembered():
    clock = Clock()
    sanctions = Sanctions(MemoryStore(), clock=clock)
    rules = SanctionRules.parse(ladder={"degrade": 60, "throttle": 600, "block": 3600})
    before, standing = await sanctions.escalate("c", rules, "prada")
    assert before == Level.NONE and standing.level == Level.DEGRADE and standing.until == clock.now + 60
    clock.now += 61
    assert (await sanctions.standing("c")).level == Level.NONE
    before, standing = await sanctions.escalate("c", rules, "prada")
    assert before == Level.NONE and standing.level == Level.THROTTLE


async def test_memory_lapses():
    sanctions = Sanctions(MemoryStore())
    rules = SanctionRules.parse(ladder={"log": 0.05, "block": 0.05}, memory=0.05)
    assert (await sanctions.escalate("c", rules, "prada"))[1].level == Level.LOG
    await asyncio.sleep(0.15)
    assert (await sanctions.escalate("c", rules, "prada"))[1].level == Level.LOG


async def test_detector_floor_and_renewal_within_min_interval():
    clock = Clock()
    sanctions = Sanctions(MemoryStore(), clock=clock)
    rules = SanctionRules.parse(floors={"similarity": "degrade"}, min_interval=10)
    assert (await sanctions.escalate("c", rules, "similarity"))[1].level == Level.DEGRADE
    clock.now += 5
    renewed = (await sanctions.escalate("c", rules, "prada"))[1]
    assert renewed.level == Level.DEGRADE and renewed.until == clock.now + 900
    clock.now += 11
    assert (await sanctions.escalate("c", rules, "prada"))[1].level == Level.THROTTLE


async def test_an_alarm_never_lowers_a_standing():
    sanctions = Sanctions(MemoryStore(), clock=Clock())
    strict = SanctionRules.parse(ladder={"block": 3600})
    lenient = SanctionRules.parse(ladder={"log": 60})
    await sanctions.escalate("c", strict, "prada")
    before, standing = await sanctions.escalate("c", lenient, "prada")
    assert before == standing.level == Level.BLOCK


def test_rules_parsing():
    rules = SanctionRules.parse(ladder={"block": 10, "log": 1}, floors={"x": "THROTTLE"})
    assert list(rules.ladder) == [Level.LOG, Level.BLOCK]
    assert rules.next_level(Level.NONE, "x", renew=False) == Level.BLOCK
    assert rules.next_level(Level.NONE, "y", renew=False) == Level.LOG
    for bad in [{}, {"none": 1}]:
        with pytest.raises(ValueError):
            SanctionRules.parse(ladder=bad)
    with pytest.raises(KeyError):
        SanctionRules.parse(ladder={"jail": 1})
    assert Standing.decode(Standing(Level.THROTTLE, 5.0, Level.BLOCK, 1.0).encode(), now=4.0) == \
        Standing(Level.THROTTLE, 5.0, Level.BLOCK, 1.0)


async def test_workers_share_standings_through_redis(redis_url):
    prefix = f"test-sanctions:{uuid.uuid4().hex}:"
    stores = [RedisStore(redis_url, prefix=prefix) for _ in range(2)]
    workers = [Sanctions(store) for store in stores]
    rules = SanctionRules.parse()
    await asyncio.gather(*(workers[i % 2].escalate("c", rules, "prada") for i in range(3)))
    assert [(await worker.standing("c")).level for worker in workers] == [Level.THROTTLE] * 2
    for store in stores:
        await store.close()
