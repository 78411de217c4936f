"""The monitor: runs the detectors over batches of observations, off the request path, and raises
the sanctions of the clients they alarm on.

The request path only offers each answered request's observation (client, features, the model's
labels, route) to a bounded queue, before the answer is sent. ``Monitor.process`` takes a batch,
lets every detector judge its observations at once (``Detector.observe_batch``: as if they had
come one at a time) and applies the alarms in the order the queries came, as the synchronous
monitor did. Two deployments run the same ``Monitor``:

- ``InProcessMonitor`` (``monitor.deployment = "in-process"``): a worker thread of the web process
  with its own event loop, started on the ASGI lifespan or on the first guarded request; numpy
  work runs there, not on the loop that serves clients. Sanctions are written on the web loop.
- ``guard.monitoring.stream`` (``"streams"``): observations go to Redis Streams and ``guard
  monitor`` processes judge them, each owning a share of the client partitions.

The sanction delay is bounded by ``monitor.max_pending`` and ``monitor.max_delay``: an answer is
sent in full only once its observation is queued behind fewer than ``max_pending`` unjudged ones,
the oldest of them younger than ``max_delay`` seconds. Otherwise the request waits for the monitor
up to ``max_delay``; if the queue is still full or the monitor stalled, that is a fault: the
answer is sent in the fail mode (label-only or ``503``) and counted in
``guard_observations_dropped_total``. A request during which the in-process monitor wrote a
sanction reads its client's standing again before answering. So after a query that raises an
alarm, its client receives at most ``max_pending - 1`` further full answers, all within
``max_delay`` seconds, before the sanction applies; with ``max_pending = 1`` a client that waits
for each answer before sending the next is sanctioned from the query after the alarm, as if the
detectors ran on the request path. (With streams, a request may also be answered in full if the
sanction is written by a monitor process between its sanction check and its queueing: at most the
client's requests in flight.) A flood of queries cannot hide queries from the detectors: it can only make its own
answers, and those of others, fail closed.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from guard.metrics import GuardMetrics
from guard.detectors import DETECTORS, build_detector
from guard.detectors.base import Detector, Observation, Verdict, with_array
from guard.policy import MonitorPolicy, Policy
from guard.sanctions import Level, SanctionRules, Sanctions, Standing
from guard.store import StoreUnavailable, memory_options, store_from_uri
from guard.store.base import StateStore
from guard.store.memory import MemoryStore

logger = logging.getLogger("guard")

# The longest a monitor waits for a batch to fill (seconds), and in how many sleeps.
MAX_LINGER = 0.005
LINGER_SLICES = 4


def linger(settings: MonitorPolicy) -> float:
    """How long a monitor lets a batch fill: long enough for a few more observations to join it
    under load, short beside ``max_delay``."""
    return min(settings.max_delay / 4, MAX_LINGER)


Escalate = Callable[[str, SanctionRules, str], Awaitable[tuple[Level, Standing]]]
"""``Sanctions.escalate`` (client, the route's rules, detector) -> (level before, new standing)."""


def detector_settings(name: str, config: dict, secret: bytes) -> dict:
    """A detector's settings, with a ``salt`` derived from the server secret when it takes one and
    none is configured, so every worker and monitor fingerprints queries alike."""
    if "salt" in config or "salt" not in inspect.signature(DETECTORS[name]).parameters:
        return config
    return {**config, "salt": hmac.new(secret, f"detector salt {name}".encode(), hashlib.sha256).digest()}


@dataclass(frozen=True)
class Watch:
    """What watches one route: the names of its detectors and its answer to their alarms."""

    detectors: frozenset[str]
    rules: SanctionRules


def watches(policy: Policy) -> dict[str, Watch]:
    """Per guarded route, its detectors (default: all of the policy's) and sanction rules."""
    return {path: Watch(frozenset(policy.detectors if route.detectors is None else route.detectors),
                        route.sanctions.rules())
            for path, route in policy.routes.items()}


class Monitor:
    """Judges batches of observations with ``detectors`` and escalates sanctions through ``escalate``."""

    def __init__(self, detectors: Mapping[str, Detector], routes: Mapping[str, Watch], escalate: Escalate,
                 metrics: GuardMetrics, overlap: bool = True) -> None:
        self.detectors, self.routes, self.escalate, self.metrics = detectors, routes, escalate, metrics
        self.overlap = overlap

    @classmethod
    def from_policy(cls, policy: Policy, store: StateStore, escalate: Escalate, metrics: GuardMetrics) -> Monitor:
        """The policy's detectors, keeping their state in ``store`` (their round trips overlap when
        it is not in memory)."""
        secret = policy.secret_bytes
        detectors = {name: build_detector(name, detector_settings(name, config, secret), store)
                     for name, config in policy.detectors.items()}
        return cls(detectors, watches(policy), escalate, metrics, overlap=not isinstance(store, MemoryStore))

    async def process(self, batch: Sequence[Observation]) -> None:
        """Every detector judges the observations of the routes it watches; then the alarms raise
        sanctions in the order of the queries (and, per query, of the detectors). The CPU time of
        this thread is counted in the metrics."""
        started = time.thread_time()
        try:
            await self._process(batch)
        finally:
            self.metrics.judged.inc(len(batch))
            self.metrics.monitor_cpu.inc(time.thread_time() - started)

    async def _process(self, batch: Sequence[Observation]) -> None:
        judging = [self._observe(name, detector, batch) for name, detector in self.detectors.items()]
        # Concurrently when the store has round trips to overlap; in memory nothing ever waits, and
        # tasks would only add their cost, several times a detector's on a batch of one or two.
        judged = await asyncio.gather(*judging) if self.overlap else [await judge for judge in judging]
        alarms: dict[int, list[tuple[str, Verdict]]] = {}
        for name, verdicts in zip(self.detectors, judged):
            for i, verdict in verdicts:
                if verdict.alarm:
                    alarms.setdefault(i, []).append((name, verdict))
        for i in sorted(alarms):
            for name, verdict in alarms[i]:
                await self.sanction(batch[i], name, verdict)

    async def _observe(self, name: str, detector: Detector,
                       batch: Sequence[Observation]) -> list[tuple[int, Verdict]]:
        """One detector's verdicts on the observations of the routes it watches (by index in the
        batch; none when it failed)."""
        watched = [i for i, o in enumerate(batch)
                   if o.route in self.routes and name in self.routes[o.route].detectors]
        if not watched:
            return []
        try:
            return list(zip(watched, await detector.observe_batch([batch[i] for i in watched])))
        except StoreUnavailable as error:
            logger.error("guard: state store unreachable; %s did not see %d observations (%s)",
                         name, len(watched), error)
        except Exception:
            logger.exception("guard: detector %s failed on a batch of %d observations", name, len(watched))
        return []

    async def sanction(self, observation: Observation, detector: str, verdict: Verdict) -> None:
        """Count the alarm and climb the ladder of its client (and, when the route's rules say so,
        of the other clients it matched)."""
        rules = self.routes[observation.route].rules
        self.metrics.detections.labels(detector=detector).inc()
        for client in (observation.client, *verdict.accomplices) if rules.accomplices else (observation.client,):
            try:
                before, standing = await self.escalate(client, rules, detector)
            except StoreUnavailable as error:
                logger.error("guard: state store unreachable; an alarm from %s raised no sanction (%s)",
                             detector, error)
                return
            if standing.level != before:
                self.metrics.sanctions.labels(level=standing.level.name.lower()).inc()


class Queued(Enum):
    """What became of an offered observation."""

    ACCEPTED = "accepted"
    REFUSED = "refused"


class Backlog:
    """The unjudged observations as the request path counts them: their enqueue times, oldest
    first. ``full`` when ``max_pending`` are waiting or the oldest has waited ``max_delay``."""

    def __init__(self, max_pending: int, max_delay: float) -> None:
        self.max_pending, self.max_delay = max_pending, max_delay
        self.times: deque[float] = deque()

    def full(self, now: float) -> bool:
        return len(self.times) >= self.max_pending or bool(self.times and now - self.times[0] > self.max_delay)


class InProcessMonitor:
    """The policy's monitor in a worker thread of this process, fed by a bounded queue.

    Detector state lives in a store of the monitor's own (for ``memory://`` a private one: only the
    monitor touches it; for Redis the shared one); sanctions go through ``sanctions``, on the event
    loop of the requests that read them. The thread ends after ``idle`` seconds without work and
    starts again with the next observation (the monitor, its state and its event loop stay)."""

    def __init__(self, policy: Policy, sanctions: Sanctions, metrics: GuardMetrics, idle: float = 5.0) -> None:
        settings = policy.monitor
        self.sanctions, self.batch_size, self.idle = sanctions, settings.batch_size, idle
        self.backlog = Backlog(settings.max_pending, settings.max_delay)
        self.linger = linger(settings)
        self.monitor = Monitor.from_policy(
            policy, store_from_uri(policy.store, **memory_options(policy.store, max_bytes=policy.memory_limit // 2)),
            self._escalate, metrics)
        self._inbox: queue.SimpleQueue[Observation | None] = queue.SimpleQueue()
        self._progress = asyncio.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the requests' loop
        self.escalations = 0  # sanctions written so far: a request that saw another count reads its standing again
        self._own_loop: asyncio.AbstractEventLoop | None = None  # the worker thread's

    def start(self) -> None:
        """Start the worker thread if it is not running (on the ASGI lifespan, or on demand)."""
        with self._lock:
            self._start()

    def _start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="guard-monitor", daemon=True)
            self._thread.start()

    async def stop(self) -> None:
        """Judge what is queued, then end the worker thread."""
        with self._lock:
            thread = self._thread
            if thread is not None:
                self._inbox.put(None)
        if thread is not None:
            await asyncio.to_thread(thread.join)
        if self._own_loop is not None:
            self._own_loop.close()
            self._own_loop = None

    async def offer(self, observation: Observation) -> Queued:
        """Queue ``observation``, waiting up to ``max_delay`` for room (refused: still full or stalled)."""
        backlog = self.backlog
        deadline = time.monotonic() + backlog.max_delay
        while backlog.full(now := time.monotonic()):
            if now >= deadline:
                return Queued.REFUSED
            self._progress.clear()
            try:
                await asyncio.wait_for(self._progress.wait(), deadline - now)
            except TimeoutError:
                return Queued.REFUSED
        with self._lock:
            self._start()
            backlog.times.append(time.monotonic())
            self._inbox.put(observation)
        return Queued.ACCEPTED

    async def drain(self) -> None:
        """Wait until every queued observation has been judged."""
        while self.backlog.times:
            self._progress.clear()
            await self._progress.wait()

    def _work(self) -> None:
        """The worker thread: ``_judge_queued`` on the thread's event loop, in one run of the loop
        for as long as the thread lives (a run per batch would cost as much as judging a batch of
        one or two)."""
        if self._own_loop is None:
            self._own_loop = asyncio.new_event_loop()
        self._own_loop.run_until_complete(self._judge_queued())

    async def _judge_queued(self) -> None:
        """Judge batches of what is queued; end when idle or told to stop. Between batches it waits
        blocking its loop, on which nothing else runs (sanctions are written on the requests' loop)."""
        while True:
            try:
                batch = [self._inbox.get(timeout=self.idle)]
            except queue.Empty:
                with self._lock:
                    if self._inbox.empty():
                        self._thread = None
                        return
                continue
            self._fill(batch)
            observations = [with_array(observation) for observation in batch if observation is not None]
            if observations:
                try:
                    await self.monitor.process(observations)
                except (Exception, asyncio.CancelledError):  # cancelled: the requests' loop closed under it
                    logger.exception("guard: the monitor failed on a batch of %d observations", len(observations))
                try:
                    self._loop.call_soon_threadsafe(self._judged, len(observations))
                except RuntimeError:  # the requests' event loop is closed: nobody waits any more
                    pass
            if len(observations) < len(batch):
                with self._lock:
                    self._thread = None
                return

    def _fill(self, batch: list[Observation | None]) -> None:
        """Add to ``batch`` what is queued, waiting up to ``linger`` seconds for more: a monitor that
        judges one observation at a time spends most of its time on each batch's fixed costs. It
        waits asleep, in a few slices, and takes what came after each: blocked on the queue
        instead, this thread would be woken by every observation and take the interpreter lock
        from the requests' thread each time. It never waits when no further observation can come
        (``max_pending`` of them are in hand) or on the stop signal."""
        deadline = time.monotonic() + self.linger
        room = min(self.batch_size, self.backlog.max_pending)
        while len(batch) < room and batch[-1] is not None:
            try:
                while len(batch) < room and batch[-1] is not None:
                    batch.append(self._inbox.get_nowait())
            except queue.Empty:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                time.sleep(min(left, self.linger / LINGER_SLICES))

    def _judged(self, count: int) -> None:
        for _ in range(count):
            self.backlog.times.popleft()
        self._progress.set()

    async def _escalate(self, client: str, rules: SanctionRules, detector: str) -> tuple[Level, Standing]:
        """``Sanctions.escalate`` run on the requests' event loop, awaited from the worker thread;
        ``StoreUnavailable`` once that loop has closed (a server stopped without a lifespan)."""
        escalation = self._escalate_here(client, rules, detector)
        try:
            work = asyncio.run_coroutine_threadsafe(escalation, self._loop)
        except RuntimeError:  # the requests' event loop is closed
            escalation.close()
            raise StoreUnavailable("the server's event loop has closed; no sanction was written",
                                   "closed") from None
        return await asyncio.wrap_future(work)

    async def _escalate_here(self, client: str, rules: SanctionRules, detector: str) -> tuple[Level, Standing]:
        result = await self.sanctions.escalate(client, rules, detector)
        self.escalations += 1
        return result
