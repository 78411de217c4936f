"""Prometheus metrics of the guard, on a registry of their own (a fresh ``CollectorRegistry`` per
guard unless one is passed), so several apps or tests in one process never clash. Labels carry the
configured route, the decision, the detector and the sanction level: never a client identity.

Several worker processes: set ``PROMETHEUS_MULTIPROC_DIR`` to an empty directory before they
start (prometheus-client's multiprocess mode); each worker then writes its samples there and
``exposition()`` (the ``/metrics`` route) aggregates all of them, the gauge summed over live workers.
"""
from __future__ import annotations

import hmac
import ipaddress
import os
import time
from collections import OrderedDict
from collections.abc import Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from guard.store.memory import entry_bytes

# The guard adds tens of microseconds to a few milliseconds; the default buckets start at 5 ms.
LATENCY_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0)


class GuardMetrics:
    """``guard_requests_total{route,decision}``, ``guard_detections_total{detector}``,
    ``guard_sanctions_total{level}``, ``guard_middleware_seconds``, ``guard_clients_tracked`` (distinct
    clients seen in the last ``client_window`` seconds, as many as ``max_bytes`` holds), and the
    monitor's ``guard_observations_dropped_total``, ``guard_observations_judged_total`` and
    ``guard_monitor_cpu_seconds_total``; ``guard_refused_targets_total{reason}`` and
    ``guard_store_errors_total{reason}``."""

    def __init__(self, registry: CollectorRegistry | None = None, client_window: float = 3600.0,
                 max_bytes: int = 16 << 20):
        self.registry = CollectorRegistry() if registry is None else registry
        self.requests = Counter("guard_requests_total", "Guarded requests by route and decision.",
                                ["route", "decision"], registry=self.registry)
        self.detections = Counter("guard_detections_total", "Detector alarms.", ["detector"],
                                  registry=self.registry)
        self.sanctions = Counter("guard_sanctions_total", "Sanctions imposed or raised, by level.",
                                 ["level"], registry=self.registry)
        self.dropped = Counter("guard_observations_dropped_total", "Answers whose observation the monitor "
                               "could not take (queue full or monitor stalled): sent in the fail mode.",
                               registry=self.registry)
        self.judged = Counter("guard_observations_judged_total", "Observations the monitor has judged.",
                              registry=self.registry)
        self.monitor_cpu = Counter("guard_monitor_cpu_seconds_total", "CPU time the monitor spent judging.",
                                   registry=self.registry)
        self.refused_targets = Counter("guard_refused_targets_total", "Request targets refused before "
                                       "routing (not origin-form, malformed, too long), by reason.",
                                       ["reason"], registry=self.registry)
        self.store_errors = Counter("guard_store_errors_total", "Admissions the state store failed (the "
                                    "request got the fail mode), by reason.", ["reason"],
                                    registry=self.registry)
        self.latency = Histogram("guard_middleware_seconds", "Time the guard itself adds to a request.",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.clients = Gauge("guard_clients_tracked", "Distinct clients seen recently.",
                             multiprocess_mode="livesum", registry=self.registry)
        self._request_counts: dict[tuple[str, str], Counter] = {}  # routes x decisions: bounded
        self._recent = RecentClients(client_window, max_bytes)
        self._tracked = 0

    def request(self, route: str, decision: str, seconds: float) -> None:
        """Count one guarded request and the time the guard spent on it."""
        count = self._request_counts.get((route, decision))
        if count is None:
            count = self._request_counts[route, decision] = self.requests.labels(route, decision)
        count.inc()
        self.latency.observe(seconds)

    async def seen(self, client: str) -> None:
        """Note that ``client`` made a request (the identity itself is never exported)."""
        tracked = self._recent.see(client, time.monotonic())
        if tracked != self._tracked:
            self._tracked = tracked
            self.clients.set(tracked)

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition (body, content type): all workers' in multiprocess mode."""
        registry = self.registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST


class RecentClients:
    """The distinct clients seen in the last ``window`` seconds, at most ``max_bytes`` of them (by
    ``entry_bytes``, as a store would count them): their last sightings, oldest first, so the
    expired and, over the bound, the least recent leave from the front (a constant cost per call)."""

    def __init__(self, window: float, max_bytes: int) -> None:
        self.window, self.max_bytes, self.size = window, max_bytes, 0
        self._last: OrderedDict[str, float] = OrderedDict()

    def see(self, client: str, now: float) -> int:
        """Note ``client`` at ``now``; how many clients are tracked."""
        last = self._last
        if client in last:
            last.move_to_end(client)
        else:
            self.size += entry_bytes(client, b"")
        last[client] = now
        horizon = now - self.window
        while len(last) > 1 and (self.size > self.max_bytes or next(iter(last.values())) <= horizon):
            self.size -= entry_bytes(last.popitem(last=False)[0], b"")
        return len(last)


class MetricsAccess:
    """Who may read the metrics (detection and sanction counters tell an attacker when it was seen):
    clients from ``networks``, and any client presenting ``Authorization: Bearer <token>``."""

    def __init__(self, networks: Sequence[str] = ("127.0.0.0/8", "::1/128"), token: str | None = None):
        self._networks = [ipaddress.ip_network(network, strict=False) for network in networks]
        self._token = f"Bearer {token}".encode() if token else None

    def allows(self, address: str, headers: Sequence[tuple[bytes, bytes]]) -> bool:
        if self._token is not None:
            presented = next((value for name, value in headers if name == b"authorization"), b"")
            if hmac.compare_digest(presented, self._token):
                return True
        try:
            parsed = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(parsed in network for network in self._networks)
