"""``GuardMiddleware``: a pure ASGI middleware (in the shape of Starlette's ``GZipMiddleware``) that
puts a ``Policy`` in front of a prediction app.

The request target is made canonical once (``guard.target``: origin-form only, percent-decoded, dot
segments removed; anything else refused with ``400``/``414``) and the app gets that path. Routes are
matched on it as the app routes on it (``guard.routing``: root path and mounts accounted for,
Starlette path templates, and spellings a lenient server would fold onto a route); a policy the app
could serve around refuses to start; a policy feature that the app's OpenAPI schema says is missing
or not a number is logged as a warning (``guard.schema_check``). A WebSocket on a guarded route is closed with 1008 unless the
route allows it. A request on a guarded route, whatever its method (``HEAD``, ``OPTIONS`` and unknown
ones included; only the route's ``free_methods`` pass unguarded), goes through ``GuardedExchange``,
one small method per step of the request flow in docs/architecture.md: read the body (at most
``max_body_bytes``: ``413``), read the features where the route's ``FeatureSource`` says (bad JSON:
``400``; missing or malformed features: ``422``; the app is never called), replay the body unchanged to the app, buffer its whole response, rewrite the
probabilities with the route's output defences, re-serialise and fix ``Content-Length``.

Fail closed: when a guarded response cannot be parsed or rewritten (not JSON, pointer missing, wrong
shape, NaN/inf, negative values, rows not summing to one, an unknown ``Content-Encoding``, a
streamed file, any exception inside the guard) the client gets a JSON ``502`` (``500`` for the
guard's own errors and for an app that raised) ``{"error": ..., "detail": ...}`` with nothing of the
original body, and the event is logged on the ``guard`` logger.

A body-less answer (a ``HEAD``'s, a ``204`` or ``304``) carries nothing to defend and passes, without
the length and tags of the body it stands for; an empty ``2xx`` to any other method fails closed.
Non-2xx responses pass through untouched when they carry no probabilities (JSON without a value at
the probabilities pointer, e.g. the app's own ``422``, or a body without a digit); when they do, they
are defended like a ``2xx``; when they cannot be read (NaN, truncated, nested deeper than the
parser's limit) they fail closed like a ``2xx``.

Compression: a ``gzip`` or ``deflate`` response from the app is decoded, defended and sent
uncompressed. To compress what clients receive, add ``GZipMiddleware`` *after* ``GuardMiddleware``
(``app.add_middleware`` wraps, so the later one is outer and compresses the defended body).
Headers that describe the original bytes (``ETag``, digests) are dropped: they would reveal the
undefended answer.
"""
from __future__ import annotations

import gzip
import logging
import re
import time
import zlib
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guard.identity import ClientIdentifier, Identity, KeyCheck
from guard.metrics import GuardMetrics, MetricsAccess
from guard.detectors.base import Observation
from guard.monitoring.monitor import InProcessMonitor, Queued
from guard.monitoring.stream import ObservationStream
from guard.outputs import Marks, Pipeline, Watermark
from guard.payload import (
    NO_FEATURES,
    EachRow,
    FeatureRows,
    FeatureSource,
    InvalidJSON,
    PayloadError,
    Pointer,
    Probabilities,
    dumps,
    loads,
    read_probabilities,
)
from guard.policy import Policy, RoutePolicy
from guard.ratelimit import Admission, RouteLimits
from guard.routing import RouteTable, find_bypasses, get_route_path
from guard.sanctions import Level, Sanctions
from guard.schema_check import feature_mismatches
from guard.store import StoreUnavailable, is_shared, memory_options, store_from_uri
from guard.target import TargetRefused, canonical_scope
from guard.watermarks import records_from_uri, records_of

logger = logging.getLogger("guard")

T = TypeVar("T")

# Statuses whose answers have no body (RFC 9110 sections 15.3.5 and 15.4.5).
_BODYLESS_STATUSES = frozenset({204, 304})

# A body without a single digit cannot carry a probability value.
_DIGIT = re.compile(rb"[0-9]")

# Response headers that describe the app's original bytes and must not survive the rewrite.
_STALE_HEADERS = frozenset({b"content-length", b"content-encoding", b"transfer-encoding", b"etag",
                            b"content-md5", b"digest", b"content-digest", b"repr-digest"})


class GuardError(Exception):
    """A request the guard refuses or a response it cannot defend: sent as a JSON error."""

    def __init__(self, status: int, error: str, detail: str):
        super().__init__(f"{status} {error}: {detail}")
        self.status, self.error, self.detail = status, error, detail


MISCONFIGURED = GuardError(500, "guard_misconfigured",
                           "the guard's policy can be walked around in this app; see the server log")


class ClientDisconnected(Exception):
    """The client went away before its request body arrived."""


@dataclass(frozen=True)
class RouteGuard:
    """A ``RoutePolicy`` compiled for the hot path, with the server secret bound."""

    probabilities: Pointer | EachRow
    features: FeatureSource | None
    output: Pipeline
    degraded_output: Pipeline
    labels: tuple[str, ...] | None
    tolerance: float
    path: str
    limits: RouteLimits
    monitored: bool
    websocket: bool
    free_methods: frozenset[str] = frozenset()
    flat: bool = False
    one_hot: bool = False
    admitted: bool = True  # False: no limits, no sanctions: nothing to read or charge in the store

    @classmethod
    def compile(cls, path: str, route: RoutePolicy, secret: bytes, detectors: list[str],
                sanctioned: bool) -> RouteGuard:
        """``sanctioned``: sanctions may be in force (the policy has detectors, or the store is
        shared with other processes, which may write them)."""
        watching = detectors if route.detectors is None else route.detectors
        limits = RouteLimits.parse(route.rate_limits, route.overall_rate_limits, route.throttle_rate_limits,
                                   route.network_rate_limits)
        admitted = sanctioned or bool(limits.per_client or limits.overall or limits.per_network)
        return cls(route.probabilities_at(), route.feature_source(),
                   Pipeline.from_specs(route.output, secret), Pipeline.from_specs(route.degraded_output, secret),
                   tuple(route.labels) if route.labels else None, route.tolerance, path, limits,
                   bool(watching) and route.has_features,  # detectors watch features
                   route.allow_websocket, frozenset(route.free_methods), route.probabilities_flat,
                   route.label_only_as == "one_hot", admitted)


class Monitoring:
    """The policy's query monitoring, built once per middleware: who the client is, the state stores,
    rate limits, sanctions, metrics and where observations go (``monitor``: the in-process monitor,
    or the Redis Streams that ``guard monitor`` processes consume; None without detectors). In
    process, ``policy.memory_limit`` is shared out: half to the monitor's detector state, a quarter
    to rate-limit counters, an eighth each to sanctions (kept apart, never evicted before they
    expire) and to the metrics' recent clients."""

    def __init__(self, policy: Policy, metrics: GuardMetrics | None = None,
                 verify_key: KeyCheck | None = None) -> None:
        secret = policy.secret_bytes
        identity = policy.identity
        self.identifier = ClientIdentifier(secret, identity.header, identity.trusted_proxies,
                                           identity.verifier(verify_key), identity.unknown_keys,
                                           (identity.network_prefix_v4, identity.network_prefix_v6))
        share = policy.memory_limit // 8
        # Memory: sanctions in a map of their own that never evicts, rate-limit counters beside them.
        self.store = store_from_uri(policy.store, **memory_options(policy.store, max_bytes=share, evict=False,
                                                                   counter_bytes=2 * share))
        self.sanctions = Sanctions(self.store)
        self.admission = Admission(self.store, self.sanctions, policy.rate_limit_strategy,
                                   network_sanctions=any(route.sanctions.scope == "network"
                                                         for route in policy.routes.values()))
        self.metrics = metrics or GuardMetrics(max_bytes=share)
        token = policy.metrics_token.get_secret_value() if policy.metrics_token else None
        self.metrics_access = MetricsAccess(policy.metrics_networks, token)
        self.fail_output = Pipeline.from_specs(["label_only"], secret)
        self.watermarks = records_from_uri(policy.store, policy.watermark_records) if policy.watermarked else None
        self.monitor: InProcessMonitor | ObservationStream | None = None
        if policy.detectors and policy.monitor.deployment == "streams":
            self.monitor = ObservationStream(policy.store, policy.monitor)
        elif policy.detectors:
            self.monitor = InProcessMonitor(policy, self.sanctions, self.metrics)

    def lifespan(self, receive: Receive) -> Receive:
        """The app's ``receive`` on the ASGI lifespan: the monitor starts with the app and stops with it."""
        async def wrapped() -> Message:
            message = await receive()
            if self.monitor is not None and message["type"] == "lifespan.startup":
                self.monitor.start()
            elif self.monitor is not None and message["type"] == "lifespan.shutdown":
                await self.monitor.stop()
            return message
        return wrapped


class GuardMiddleware:
    """Pure ASGI middleware enforcing ``policy`` on its routes; everything else passes untouched.
    ``verify_key(key) -> bool`` accepts API keys beside those the policy lists (the app's key store)."""

    def __init__(self, app: ASGIApp, policy: Policy, metrics: GuardMetrics | None = None,
                 verify_key: KeyCheck | None = None) -> None:
        self.app = app
        self.policy = policy
        self.monitoring = Monitoring(policy, metrics, verify_key)
        sanctioned = bool(policy.detectors) or is_shared(policy.store)
        self.routes = RouteTable({path: RouteGuard.compile(path, route, policy.secret_bytes, list(policy.detectors),
                                                           sanctioned)
                                  for path, route in policy.routes.items()})
        self.problems = find_bypasses(app, list(policy.routes))
        for problem in self.problems:
            logger.error("guard: %s; refusing to serve", problem)
        for mismatch in feature_mismatches(app, policy.routes):
            logger.warning("guard: %s", mismatch)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan" and self.problems:
            await self.refuse_startup(receive, send)
            return
        if kind == "lifespan":
            await self.app(scope, self.monitoring.lifespan(receive), send)
            return
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if self.problems:
            await refuse(scope, receive, send, MISCONFIGURED)
            return
        try:
            scope = canonical_scope(scope)
        except TargetRefused as refused:
            self.monitoring.metrics.refused_targets.labels(refused.reason).inc()
            logger.info("guard: request target refused: %s", refused)
            await refuse(scope, receive, send, GuardError(refused.status, refused.reason, refused.detail))
            return
        if kind == "http" and get_route_path(scope) == self.policy.metrics_path:
            await self.serve_metrics(scope, receive, send)
            return
        route = self.routes.match(scope)
        if route is None or (kind == "websocket" and route.websocket):
            await self.app(scope, receive, send)
        elif kind == "websocket":
            await refuse(scope, receive, send, None)
        else:
            await GuardedExchange(self, route, scope, receive, send).run()

    async def refuse_startup(self, receive: Receive, send: Send) -> None:
        """Answer the server's ``lifespan.startup`` with a failure naming the ways around the policy,
        then raise it, as Starlette's router does when its startup fails."""
        await receive()
        message = "; ".join(self.problems)
        await send({"type": "lifespan.startup.failed", "message": message})
        raise RuntimeError(message)

    async def serve_metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The Prometheus exposition to allowed clients; others get the app's own answer there."""
        monitoring = self.monitoring
        if not monitoring.metrics_access.allows(monitoring.identifier.address(scope), scope["headers"]):
            await self.app(scope, receive, send)
            return
        body, content_type = monitoring.metrics.exposition()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", content_type.encode()),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


async def refuse(scope: Scope, receive: Receive, send: Send, error: GuardError | None) -> None:
    """Refuse a request before the app sees it: a WebSocket is accepted and at once closed with 1008
    (policy violation), so the client learns why; an HTTP request gets ``error`` as JSON."""
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": 1008, "reason": "guarded route"})
        return
    body = dumps({"error": error.error, "detail": error.detail})
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case) in raw ASGI headers."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def decode(body: bytes, encoding: bytes | None) -> bytes:
    """The response body without its ``Content-Encoding`` (gzip or deflate); others fail closed."""
    coding = (encoding or b"identity").strip().lower()
    try:
        if coding == b"identity":
            return body
        if coding in (b"gzip", b"x-gzip"):
            return gzip.decompress(body)
        if coding == b"deflate":
            try:
                return zlib.decompress(body)
            except zlib.error:  # deflate sent without its zlib wrapper, as some servers do
                return zlib.decompress(body, -zlib.MAX_WBITS)
    except (OSError, EOFError, zlib.error) as error:
        raise GuardError(502, "bad_response", f"cannot decode the {coding.decode()} response") from error
    raise GuardError(502, "bad_response", f"unsupported Content-Encoding {coding.decode(errors='replace')!r}")


class GuardedExchange:
    """One request on a guarded route, one method per step of the request flow in docs/architecture.md."""

    __slots__ = ("app", "policy", "monitoring", "escalations", "extra_headers", "app_seconds", "route",
                 "scope", "receive", "send", "body", "replayed", "start", "chunks", "complete", "unsupported")

    def __init__(self, guard: GuardMiddleware, route: RouteGuard, scope: Scope, receive: Receive,
                 send: Send) -> None:
        self.app = guard.app
        self.policy = guard.policy
        self.monitoring = guard.monitoring
        self.escalations = 0 if guard.monitoring.monitor is None else guard.monitoring.monitor.escalations
        self.extra_headers: list[tuple[bytes, bytes]] = []
        self.app_seconds = 0.0
        self.route = route
        self.scope = scope
        self.receive = receive
        self.send = send
        self.body = b""
        self.replayed = False
        self.start: Message | None = None
        self.chunks: list[bytes] = []
        self.complete = False
        self.unsupported: str | None = None

    async def run(self) -> None:
        """The request flow: identify (2), read (3), admit by rate limit and sanction (4, 5), call
        the app and defend its answer (6), hand the observation to the monitor (7) before the
        answer is sent, and count it (8)."""
        if self.scope["method"] in self.route.free_methods:
            await self.app(self.scope, self.receive, self.send)
            return
        started = time.perf_counter()
        identity = self.monitoring.identifier.identify(self.scope)
        decision = await self.guard(identity)
        metrics = self.monitoring.metrics
        metrics.request(self.route.path, decision, time.perf_counter() - started - self.app_seconds)
        await metrics.seen(identity.client)

    async def guard(self, identity: Identity) -> str:
        """Steps 2 to 7; the metrics' decision."""
        if identity.rejected:
            await self.reject(GuardError(401, "invalid_api_key", "the API key is not valid"))
            return "unauthorized"
        features = await self.fail_closed(self.read_request())
        if features is None:
            return "rejected"
        output, decision = await self.admit(identity, len(features))
        if output is None:
            return decision
        await self.call_app()
        return await self.fail_closed(self.respond(identity.client, features, output, decision)) or "failed"

    async def fail_closed(self, step: Awaitable[T]) -> T | None:
        """Run a step of the guard; a refusal or any failure inside it becomes a JSON error (None)."""
        try:
            return await step
        except ClientDisconnected:
            return None
        except GuardError as error:
            await self.reject(error)
        except Exception:
            logger.exception("guard: internal error on %s", self.scope["path"])
            await self.reject(GuardError(500, "guard_error", "the guard failed to process this request"),
                              logged=True)
        return None

    async def reject(self, error: GuardError, logged: bool = False) -> None:
        if not logged:
            level = logging.ERROR if error.status >= 500 else logging.INFO
            logger.log(level, "guard: %s %s -> %d %s: %s", self.scope.get("method"), self.scope["path"],
                       error.status, error.error, error.detail)
        await self.send_json(error.status, [(b"content-type", b"application/json")],
                             dumps({"error": error.error, "detail": error.detail}))

    # Step 3: the request body, read once and bounded, and the features in it (``NO_FEATURES``
    # when the route names none or a body source gets no body).
    async def read_request(self) -> FeatureRows:
        self.body = await self.read_body()
        if self.route.features is None:
            return NO_FEATURES
        try:
            return self.route.features.read(self.body, self.scope.get("query_string", b""))
        except InvalidJSON as error:
            raise GuardError(400, "invalid_json", str(error)) from None
        except PayloadError as error:
            raise GuardError(422, "invalid_features", str(error)) from None

    async def read_body(self) -> bytes:
        limit = self.policy.max_body_bytes
        declared = header(self.scope["headers"], b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise GuardError(413, "body_too_large", f"the request body exceeds {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise GuardError(413, "body_too_large", f"the request body exceeds {limit} bytes")
            chunks.append(chunk)
            more = message.get("more_body", False)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def replay(self) -> Message:
        """The app's ``receive``: the body read in step 3, then whatever the client sends next."""
        if self.replayed:
            return await self.receive()
        self.replayed = True
        return {"type": "http.request", "body": self.body, "more_body": False}

    # Steps 4 and 5, in one store round trip: the client's standing sanction and its rate limits (a
    # throttled client's include the route's throttle limits) select the output policy or refuse.
    async def admit(self, identity: Identity, queries: int) -> tuple[Pipeline | None, str]:
        """The output pipeline for this request and the metrics' decision (pipeline None: refused)."""
        if not self.route.admitted:
            return self.route.output, "allowed"
        monitoring = self.monitoring
        try:
            standing, limit = await monitoring.admission.admit(
                self.route.path, identity.client, self.route.limits, max(queries, 1), identity.network,
                identity.address)
        except Exception as error:  # StoreUnavailable (with its reason), or anything else the store raised
            reason = error.reason if isinstance(error, StoreUnavailable) else "error"
            monitoring.metrics.store_errors.labels(reason).inc()
            logger.error("guard: state store failed (%s: %s); failing closed (%s)", reason, error,
                         self.policy.fail_mode, exc_info=not isinstance(error, StoreUnavailable))
            if self.policy.fail_mode == "503":
                await self.reject(GuardError(503, "unavailable", "the guard's state store is unavailable"),
                                  logged=True)
                return None, "unavailable"
            return monitoring.fail_output, "fail_closed"
        if standing.level == Level.BLOCK:
            await self.reject(GuardError(403, "blocked", "this client is blocked"))
            return None, "blocked"
        if limit is not None:
            self.extra_headers = limit.headers()
            if not limit.allowed:
                await self.reject(GuardError(429, "rate_limited", "too many queries; retry after "
                                             f"{self.extra_headers[-1][1].decode()} s"))
                return None, "rate_limited"
        if standing.level >= Level.DEGRADE:
            return self.route.degraded_output, "degraded"
        return self.route.output, "allowed"

    # Step 6: call the app, hold its response, defend it.
    async def call_app(self) -> None:
        """Run the app with ``capture`` as its ``send``. If it raises, the client gets a JSON 500
        (nothing the app had produced) and the exception propagates to the server as usual."""
        started = time.perf_counter()
        try:
            await self.app(self.scope, self.replay, self.capture)
        except Exception:
            logger.exception("guard: the app raised on %s", self.scope["path"])
            await self.reject(GuardError(500, "app_error", "the application failed"), logged=True)
            raise
        finally:
            self.app_seconds = time.perf_counter() - started

    async def capture(self, message: Message) -> None:
        """The app's ``send``: holds the response start and buffers every body chunk."""
        kind = message["type"]
        if kind == "http.response.start":
            self.start = message
        elif kind == "http.response.body":
            self.chunks.append(message.get("body", b""))
            self.complete = not message.get("more_body", False)
        else:
            self.unsupported = kind

    async def respond(self, client: str, features: FeatureRows, output: Pipeline, decision: str) -> str:
        """Send the defended answer (in the fail mode when the monitor cannot take its observation);
        return the metrics' decision."""
        if self.start is None or not self.complete or self.unsupported:
            raise GuardError(502, "bad_response", "the app's response is incomplete or not a plain body")
        headers = self.start.get("headers", [])
        raw = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        if not raw and (self.scope["method"] == "HEAD" or self.start["status"] in _BODYLESS_STATUSES):
            # Nothing to defend; a HEAD answer's length and tags describe the undefended body.
            headers = [(k, v) for k, v in headers if k.lower() not in _STALE_HEADERS]
            await self.send_json(self.start["status"], headers, raw, rewritten=False)
            return decision
        body = decode(raw, header(headers, b"content-encoding"))
        document, found = self.locate(body)
        if found is None:
            await self.send_json(self.start["status"], headers, raw, rewritten=False)
            return decision
        if len(features) and len(found.rows) != len(features):
            raise GuardError(502, "bad_response", f"{len(found.rows)} probability rows for "
                             f"{len(features)} feature rows")
        if self.route.monitored and len(features):
            output, decision = await self.observe(client, features, found.predicted(), output, decision)
        marks = None
        if output.watermark is not None:
            marks = await self.record(output.watermark, found, features, client)
        defended = output(found.rows, features if len(features) else None, client, marks)
        rendered = found.render(defended, output.label_only, self.route.one_hot)
        document = self.route.probabilities.replace(document, rendered)
        try:
            body = dumps(document)
        except TypeError:  # orjson.JSONEncodeError: nested deeper than the serialiser allows
            raise GuardError(502, "bad_response", "the app's response cannot be re-serialised") from None
        await self.send_json(self.start["status"], headers, body)
        return decision

    async def record(self, watermark: Watermark, found: Probabilities, features: FeatureRows,
                     client: str) -> Marks:
        """The watermark's marks on this answer; the rows it marked are kept for ``guard verify`` (a
        store failure is logged, the answer still sent)."""
        predicted = found.predicted()
        marks = watermark.marks(predicted, features, client, len(found.rows[0]))
        if marks.watermarked.any() or marks.controls.any():
            try:
                await self.monitoring.watermarks.add(records_of(marks, features, predicted, client))
            except Exception:
                logger.exception("guard: watermark records not kept on %s", self.scope["path"])
        return marks

    # Step 7: the observation (client, features, the model's own labels) goes to the monitor,
    # which judges it off the request path (guard.monitoring.monitor). When it cannot be queued (the
    # queue is full, the monitor stalled or the stream unreachable) the answer fails closed.
    async def observe(self, client: str, features: FeatureRows, predicted: list[int], output: Pipeline,
                      decision: str) -> tuple[Pipeline, str]:
        """The output and decision once the monitor has the observation: chosen again by the
        client's standing when the monitor wrote a sanction since this request began (its sanction
        check may predate it); the fail mode (counted; ``503`` under that fail mode) when refused."""
        monitoring = self.monitoring
        try:
            queued = await monitoring.monitor.offer(Observation(client, features, predicted, self.route.path))
            if queued is Queued.ACCEPTED and monitoring.monitor.escalations != self.escalations:
                if (await monitoring.sanctions.standing(client)).level >= Level.DEGRADE:
                    return self.route.degraded_output, "degraded"
            if queued is Queued.ACCEPTED:
                return output, decision
        except StoreUnavailable as error:
            logger.error("guard: state store unreachable (%s); the observation is not queued", error)
        monitoring.metrics.dropped.inc()
        if self.policy.fail_mode == "503":
            raise GuardError(503, "unavailable", "the guard's monitor cannot take more queries now")
        return monitoring.fail_output, "unmonitored"

    def locate(self, body: bytes) -> tuple[object, Probabilities | None]:
        """The parsed response and its validated probabilities. A non-2xx JSON response without a
        value at the pointer carries none (``None``), nor does a non-2xx body that is not JSON and
        holds no digit (a plain ``Not Found``); anything else that cannot be read fails closed."""
        success = 200 <= self.start["status"] < 300
        try:
            document = loads(body)
        except ValueError:  # orjson.JSONDecodeError: not JSON, NaN, truncated, nested too deep
            if success or _DIGIT.search(body):
                raise GuardError(502, "bad_response", "the app's response is not valid JSON") from None
            return None, None
        try:
            value = self.route.probabilities.get(document)
        except PayloadError:
            if not success:
                return None, None
            raise GuardError(502, "bad_response", "no probabilities at "
                             f"{self.route.probabilities.text!r} in the app's JSON response") from None
        try:
            return document, read_probabilities(value, self.route.labels, self.route.tolerance, self.route.flat)
        except PayloadError as error:
            raise GuardError(502, "bad_response", str(error)) from None

    async def send_json(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes,
                        rewritten: bool = True) -> None:
        """Send a complete response; a ``rewritten`` body gets fresh length headers."""
        if rewritten:
            headers = [(k, v) for k, v in headers if k.lower() not in _STALE_HEADERS]
            headers.append((b"content-length", str(len(body)).encode()))
        if self.extra_headers:
            headers = headers + self.extra_headers
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})
