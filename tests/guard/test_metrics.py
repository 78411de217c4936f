"""Metrics: the names in docs/architecture.md, one registry per guard, no client identities in the exposition."""
from __future__ import annotations

import os
import subprocess
import sys

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from guard.metrics import GuardMetrics


def samples(metrics: GuardMetrics) -> dict[tuple[str, tuple], float]:
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


async def test_names_labels_and_values():
    metrics = GuardMetrics()
    metrics.request("/predict", "allowed", 0.0004)
    metrics.request("/predict", "rate_limited", 0.0002)
    metrics.request("/predict", "allowed", 0.002)
    metrics.detections.labels(detector="prada").inc()
    metrics.sanctions.labels(level="degrade").inc()
    for client in ["key:aaaa", "ip:10.0.0.1", "key:aaaa"]:
        await metrics.seen(client)
    values = samples(metrics)
    assert values[("guard_requests_total", (("decision", "allowed"), ("route", "/predict")))] == 2
    assert values[("guard_requests_total", (("decision", "rate_limited"), ("route", "/predict")))] == 1
    assert values[("guard_detections_total", (("detector", "prada"),))] == 1
    assert values[("guard_sanctions_total", (("level", "degrade"),))] == 1
    assert values[("guard_middleware_seconds_count", ())] == 3
    assert values[("guard_middleware_seconds_bucket", (("le", "0.0005"),))] == 2
    assert values[("guard_clients_tracked", ())] == 2
    body = metrics.exposition()[0]
    assert b"aaaa" not in body and b"10.0.0.1" not in body


async def test_tracked_clients_are_bounded_and_forgotten():
    from guard.store.memory import entry_bytes

    metrics = GuardMetrics(client_window=60, max_bytes=10 * entry_bytes("ip:10.0.0.10", b""))
    for i in range(10, 60):
        await metrics.seen(f"ip:10.0.0.{i}")
    assert samples(metrics)[("guard_clients_tracked", ())] == 10


def test_recent_clients_leave_after_the_window_and_a_return_renews_them():
    from guard.metrics import RecentClients

    recent = RecentClients(window=60, max_bytes=1 << 20)
    assert [recent.see(client, t) for client, t in [("a", 0), ("b", 10), ("a", 30)]] == [1, 2, 2]
    assert recent.see("c", 65) == 3  # b seen at 10 is 55 s old; a was renewed at 30
    assert recent.see("c", 71) == 2  # b has left
    assert recent.see("c", 200) == 1  # only c, just seen


def test_each_guard_has_its_own_registry_unless_given_one():
    first, second = GuardMetrics(), GuardMetrics()
    first.request("/p", "allowed", 0.001)
    assert ("guard_requests_total", (("decision", "allowed"), ("route", "/p"))) not in samples(second)
    shared = CollectorRegistry()
    GuardMetrics(registry=shared).request("/p", "blocked", 0.001)
    assert shared.get_sample_value("guard_requests_total", {"route": "/p", "decision": "blocked"}) == 1


WORKER = """
from guard.metrics import GuardMetrics
GuardMetrics().request("/p", "allowed", 0.001)
print(GuardMetrics().exposition()[0].decode())
"""


def test_multiprocess_exposition_aggregates_workers(tmp_path):
    """prometheus-client picks multiprocess mode at import, so the workers are real processes."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    outputs = [subprocess.run([sys.executable, "-c", WORKER], env=env, capture_output=True, text=True,
                              check=True).stdout for _ in range(2)]
    assert 'guard_requests_total{decision="allowed",route="/p"} 1.0' in outputs[0]
    assert 'guard_requests_total{decision="allowed",route="/p"} 2.0' in outputs[1]
