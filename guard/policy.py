"""What the guard enforces: ``Policy`` (server-wide settings and the guarded routes) and
``RoutePolicy`` (one route: where its probabilities and features are, which output defences apply).

Built from keyword arguments, ``Policy.from_dict`` or ``Policy.from_file`` (TOML or YAML, the same
structure). Every setting is validated when the policy is built; unknown keys are errors.
"""
from __future__ import annotations

import ipaddress
import multiprocessing
import os
import re
import secrets
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from guard.detectors import DETECTORS
from guard.identity import KeyCheck, KeyVerifier, key_digest, read_key_file
from guard.outputs import check_specs, read_spec
from guard.payload import (
    EachRow,
    FeatureFunction,
    FeatureSource,
    NamedFields,
    Pointer,
    QueryFields,
    VectorAt,
)
from guard.ratelimit import Strategy, parse_limits
from guard.references import import_function
from guard.routing import is_template, overlap, template_regex
from guard.sanctions import DEFAULT_LADDER, SanctionRules

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_PROCESS_SECRET = secrets.token_hex(32)
STORE_SCHEMES = ("memory", "redis", "rediss", "unix")


def check_store_uri(uri: str) -> None:
    """Refuse a state store URI the store could not use, saying what is wrong: ``memory://``,
    ``redis://[user:password@]host[:port][/db]`` (also ``rediss://``), ``unix:///path/to/socket``."""
    parts = urlsplit(uri)
    if parts.scheme not in STORE_SCHEMES:
        raise ValueError(f"unknown state store URI {uri!r}: use memory:// or redis://host:port/db "
                         "(also rediss:// and unix://)")
    if not uri.startswith(f"{parts.scheme}://"):
        raise ValueError(f"state store URI {uri!r}: write {parts.scheme}:// (two slashes)")
    if parts.scheme == "memory" and uri != "memory://":
        raise ValueError(f"state store URI {uri!r}: the in-process store is just memory://")
    if parts.scheme == "unix" and not parts.path.startswith("/"):
        raise ValueError(f"state store URI {uri!r}: name the socket's absolute path, "
                         "unix:///path/to/redis.sock")
    if parts.scheme in ("redis", "rediss"):
        try:
            parts.port  # noqa: B018 (parses it)
        except ValueError:
            raise ValueError(f"state store URI {uri!r}: the port is not a number") from None
        if not parts.hostname:
            raise ValueError(f"state store URI {uri!r} names no host: redis://host:port/db")
        if parts.path.strip("/") and not parts.path.strip("/").isdigit():
            raise ValueError(f"state store URI {uri!r}: the database is a number, as in redis://host:port/0")


def several_workers() -> bool:
    """Whether this process looks like one of several serving workers: a ``multiprocessing`` child
    (``uvicorn --workers``, ``--reload``), a gunicorn worker, ``WEB_CONCURRENCY`` above 1, or
    prometheus-client's multiprocess mode."""
    return (multiprocessing.parent_process() is not None
            or os.environ.get("SERVER_SOFTWARE", "").startswith("gunicorn")
            or os.environ.get("WEB_CONCURRENCY", "1").strip() not in ("", "0", "1")
            or bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR")))


class SanctionPolicy(BaseModel):
    """A route's answer to detector alarms (see ``guard.sanctions.SanctionRules``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ladder: dict[str, float] = Field(default_factory=lambda: {level.name.lower(): seconds
                                                              for level, seconds in DEFAULT_LADDER.items()},
                                     description="level -> seconds it lasts; each alarm climbs one level")
    floors: dict[str, str] = Field(default_factory=dict, description="detector -> lowest level its alarm imposes")
    memory: float = Field(default=86400.0, ge=0, description="seconds a lapsed sanction still counts")
    min_interval: float = Field(default=0.0, ge=0, description="alarms closer than this renew, not escalate")
    accomplices: bool = Field(default=False, description="a cross-client alarm also sanctions the clients "
                              "whose queries it matched (Sybil keys); lets a client who can guess "
                              "another's queries frame it")
    scope: Literal["client", "network"] = Field(default="client", description="network: a block of an "
                                                "address also blocks its /24 (IPv4) or /64 (IPv6), whatever "
                                                "key comes from there; blocks everyone behind the same NAT "
                                                "or mobile carrier range with it")

    @model_validator(mode="after")
    def _valid(self) -> SanctionPolicy:
        self.rules()
        return self

    def rules(self) -> SanctionRules:
        return SanctionRules.parse(self.ladder, self.floors, self.memory, self.min_interval, self.accomplices,
                                   self.scope == "network")


class IdentityPolicy(BaseModel):
    """How clients are told apart (see ``guard.identity.ClientIdentifier``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    header: str | None = Field(default=None, description="API-key header (e.g. X-API-Key); None: peer IP only")
    keys: list[str] = Field(default_factory=list, description="the valid API keys as 'sha256:<hex digest>'")
    keys_file: Path | None = Field(default=None, description="a file of valid keys, one 'sha256:<hex>' a line")
    unknown_keys: Literal["reject", "ip"] = Field(default="reject", description="a key that is not valid: "
                                                  "refused with 401, or ignored (the client is its IP)")
    trusted_proxies: list[str] = Field(default_factory=list, description="addresses/CIDRs whose "
                                       "X-Forwarded-For is believed")
    network_prefix_v4: int = Field(default=32, ge=0, le=32, description="IPv4 prefix of a network's budget")
    network_prefix_v6: int = Field(default=64, ge=0, le=128, description="IPv6 prefix of a network's budget")

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, proxies: list[str]) -> list[str]:
        for proxy in proxies:
            ipaddress.ip_network(proxy, strict=False)
        return proxies

    @field_validator("keys")
    @classmethod
    def _digests(cls, keys: list[str]) -> list[str]:
        for key in keys:
            key_digest(key)
        return keys

    def verifier(self, check: KeyCheck | None = None) -> KeyVerifier:
        """The valid keys: those listed, those in ``keys_file``, and those ``check`` accepts."""
        listed = self.keys + (read_key_file(self.keys_file) if self.keys_file else [])
        return KeyVerifier(listed, check)


class MonitorPolicy(BaseModel):
    """Where the detectors run and how late a sanction may take effect (see
    ``guard.monitoring.monitor``): ``in-process`` (a worker thread of each web worker) or ``streams``
    (Redis Streams consumed by ``guard monitor`` processes; needs a Redis store)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    deployment: Literal["in-process", "streams"] = "in-process"
    max_pending: int = Field(default=256, ge=1, description="observations (requests) answered but not "
                             "yet judged, at most (per partition with streams); a request that would "
                             "exceed it waits up to max_delay, then gets the fail-mode answer")
    max_delay: float = Field(default=0.02, gt=0, description="seconds the oldest unjudged observation "
                             "may wait; beyond it the monitor is stalled and new answers fail closed")
    batch_size: int = Field(default=64, ge=1, description="observations judged together, at most")
    partitions: int = Field(default=8, ge=1, description="streams: clients are dealt into this many "
                            "partitions, each consumed by one monitor process at a time")
    lease: float = Field(default=2.0, gt=0, description="streams: seconds a monitor holds a partition "
                         "without renewing it; a dead monitor's partitions pass on after this")


class WatermarkRecordsPolicy(BaseModel):
    """Where the watermark defence's records are kept (``guard.watermarks``): in the memory store, at
    most ``max_bytes`` in all, oldest dropped first; in Redis, a stream per client capped at
    ``per_client`` records, kept ``retention`` seconds after the client's last record."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_bytes: int = Field(default=16 << 20, ge=1 << 16, description="memory store: bytes of records, at most")
    per_client: int = Field(default=10_000, ge=1, description="Redis: records kept per client, at most")
    retention: float = Field(default=365 * 86400.0, gt=0, description="Redis: seconds a client's records "
                             "are kept after its last one")


def _valid_pointer(text: str) -> str:
    Pointer.parse(text)
    return text


PointerText = Annotated[str, AfterValidator(_valid_pointer)]
"""A JSON pointer (RFC 6901), checked when the policy is loaded."""


class FeatureFields(BaseModel):
    """Named fields read from each object of a list (or from one object) in the request body."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rows: PointerText = Field(description="JSON pointer to the list of objects (or the one object)")
    fields: list[PointerText] = Field(min_length=1, description="JSON pointers into each object, in model order")


class AnswerRows(BaseModel):
    """Probabilities in each object of a list in the response (``[{"probabilities": ...}, ...]``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rows: PointerText = Field(description="JSON pointer to the list of answer objects")
    field: PointerText = Field(description="JSON pointer into each object, e.g. /probabilities")

    @field_validator("field")
    @classmethod
    def _inside(cls, text: str) -> str:
        if not text:
            raise ValueError("`field` must point inside each answer object")
        return text


class RoutePolicy(BaseModel):
    """How one route is guarded."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    probabilities: str | AnswerRows = Field(description="JSON pointer (RFC 6901) to the probabilities in "
                                            "the response, or {rows, field} for a list of answers")
    probabilities_flat: bool = Field(default=False, description="the probabilities are one row-major list "
                                     "of n * k numbers (KServe v2 tensors); needs `labels`")
    features: str | list[str] | FeatureFields | None = Field(
        default=None, description="where the features are: a JSON pointer to the vector(s); a list of "
        "pointers to named fields in model order; {rows, fields} for a list of such objects; with "
        "features_in = 'query', a list of query parameter names. None: the route has no features "
        "(only output defences that need none, no detectors)")
    features_in: Literal["body", "query"] = Field(default="body", description="the JSON body, or the "
                                                  "query string (GET)")
    features_function: str | Callable | None = Field(default=None, description="instead of `features`: "
                                                     "a function (document, query) -> rows, or a "
                                                     "'module:function' reference")
    features_width: int | None = Field(default=None, gt=0, description="a flat list of n * width numbers "
                                       "at the `features` pointer is n rows (KServe v2 tensors)")
    label_only_as: Literal["label", "one_hot"] = Field(default="label", description="how label-only "
                                                       "answers are written: the bare label, or a "
                                                       "vector/object of the original schema with "
                                                       "1.0 for the answer")
    output: list[str] = Field(default_factory=list, description="output defence specs, applied in order")
    degraded_output: list[str] = Field(default_factory=lambda: ["label_only"],
                                       description="the stricter output specs for sanctioned clients")
    labels: list[str] | None = Field(default=None, description="class names: the keys of label→probability "
                                     "objects (in this order), or just the expected number of classes")
    tolerance: float = Field(default=1e-3, gt=0, lt=1, description="how far a row may sum from 1")
    rate_limits: list[str] = Field(default_factory=list, description="per-client limits, e.g. '100/minute'; "
                                   "a request costs one per feature row")
    overall_rate_limits: list[str] = Field(default_factory=list, description="limits over all clients")
    network_rate_limits: list[str] = Field(default_factory=list, description="limits per client network "
                                           "(identity.network_prefix_v4/_v6), shared by every key from it")
    throttle_rate_limits: list[str] = Field(default_factory=lambda: ["10/minute"],
                                            description="the extra limits of a client sanctioned 'throttle'")
    detectors: list[str] | None = Field(default=None, description="names of the policy's detectors that "
                                        "watch this route; None: all of them")
    sanctions: SanctionPolicy = Field(default_factory=SanctionPolicy)
    free_methods: list[str] = Field(default_factory=list, description="methods whose requests and answers "
                                    "pass unguarded on this route (e.g. ['OPTIONS'] for CORS preflights "
                                    "the app answers); every other method's answer is defended")
    allow_websocket: bool = Field(default=False, description="let WebSocket connections on this route "
                                  "through, unguarded (default: closed with 1008)")

    @field_validator("rate_limits", "overall_rate_limits", "network_rate_limits", "throttle_rate_limits")
    @classmethod
    def _limits(cls, limits: list[str]) -> list[str]:
        parse_limits(limits)
        return limits

    @field_validator("free_methods")
    @classmethod
    def _methods(cls, methods: list[str]) -> list[str]:
        for method in methods:
            if not re.fullmatch(r"[A-Z]+", method):
                raise ValueError(f"free_methods: {method!r} is not an HTTP method in upper case "
                                 "(e.g. 'OPTIONS')")
        return methods

    @field_validator("probabilities")
    @classmethod
    def _pointer(cls, where: str | AnswerRows) -> str | AnswerRows:
        if isinstance(where, str):
            Pointer.parse(where)
        return where

    def probabilities_at(self) -> Pointer | EachRow:
        """Where the response's probabilities are, compiled."""
        if isinstance(self.probabilities, str):
            return Pointer.parse(self.probabilities)
        return EachRow(Pointer.parse(self.probabilities.rows), Pointer.parse(self.probabilities.field))

    @field_validator("features_function")
    @classmethod
    def _function(cls, function: str | Callable | None) -> str | Callable | None:
        if isinstance(function, str):
            import_function(function)
        return function

    @model_validator(mode="after")
    def _request_shape(self) -> RoutePolicy:
        self._check_features()
        if self.probabilities_flat and self.labels is None:
            raise ValueError("probabilities_flat needs `labels` (the number of classes)")
        if not self.has_features:
            for keyed in ("noise", "watermark"):
                if any(read_spec(spec)[0] == keyed for spec in self.output + self.degraded_output):
                    raise ValueError(f"{keyed} is seeded by the features: name the route's `features`")
            if self.detectors:
                raise ValueError("detectors watch features: name the route's `features`")
        return self

    @property
    def has_features(self) -> bool:
        return self.features is not None or self.features_function is not None

    def _check_features(self) -> None:
        """The rules of the request shape that ``feature_source`` compiles."""
        if self.features_function is not None:
            if self.features is not None:
                raise ValueError("set either `features` or `features_function`, not both")
            return
        if self.features_width is not None and not isinstance(self.features, str):
            raise ValueError("features_width applies to a single `features` pointer")
        if self.features_in == "query":
            if not isinstance(self.features, list):
                raise ValueError("features_in = 'query' needs `features` as a list of parameter names")
            return
        if isinstance(self.features, str):
            _valid_pointer(self.features)
        elif isinstance(self.features, list):
            if not self.features:
                raise ValueError("`features` names no fields")
            for text in self.features:
                _valid_pointer(text)

    def feature_source(self) -> FeatureSource | None:
        """The compiled request shape (``None``: the route names no features)."""
        if self.features_function is not None:
            return FeatureFunction.named(self.features_function)
        if self.features_in == "query":
            return QueryFields(tuple(self.features))
        if self.features is None:
            return None
        if isinstance(self.features, str):
            return VectorAt(Pointer.parse(self.features), self.features_width)
        if isinstance(self.features, list):
            return NamedFields(tuple(Pointer.parse(text) for text in self.features))
        return NamedFields(tuple(Pointer.parse(text) for text in self.features.fields),
                           Pointer.parse(self.features.rows))

    @field_validator("output", "degraded_output")
    @classmethod
    def _specs(cls, specs: list[str]) -> list[str]:
        check_specs(specs)  # the middleware builds them, with the server's secret
        return specs

    @field_validator("labels")
    @classmethod
    def _distinct(cls, labels: list[str] | None) -> list[str] | None:
        if labels is not None and (not labels or len(set(labels)) != len(labels)):
            raise ValueError("labels must be a non-empty list of distinct names")
        return labels


class Policy(BaseModel):
    """Server-wide settings and the guarded routes, keyed by the path the app's router sees (root
    path and mounts excluded) or a Starlette path template (``/models/{name}/predict``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    secret: SecretStr | None = Field(default=None, description="server secret for keyed hashes (API keys, "
                                     "noise seeds, detector salts); stable across restarts, identical in "
                                     "every worker; required wherever it matters (see `secret_needed`)")
    dev_random_secret: bool = Field(default=False, description="development only: a random per-process "
                                    "secret where one is required")
    max_body_bytes: int = Field(default=1 << 20, gt=0, description="largest request body accepted")
    routes: dict[str, RoutePolicy] = Field(default_factory=dict)
    identity: IdentityPolicy = Field(default_factory=IdentityPolicy)
    store: str = Field(default="memory://", description="state store URI: memory:// or redis://host:port/db; "
                       "rate limits, detector state and sanctions live there")
    rate_limit_strategy: Strategy = "sliding-window-counter"
    detectors: dict[str, dict[str, Any]] = Field(default_factory=dict, description="detector name -> its "
                                                 "settings (e.g. thresholds written by `guard calibrate`)")
    fail_mode: Literal["label_only", "503"] = Field(default="label_only", description="when the store is "
                                                    "unreachable: answer label-only, or refuse with 503")
    memory_limit: int = Field(default=256 << 20, ge=1 << 20, description="bytes of in-process state "
                              "(memory:// store): detector state, rate-limit counters, sanctions, metrics")
    watermark_records: WatermarkRecordsPolicy = Field(default_factory=lambda: WatermarkRecordsPolicy())
    metrics_path: str | None = Field(default=None, description="serve Prometheus metrics here (e.g. /metrics)")
    monitor: MonitorPolicy = Field(default_factory=MonitorPolicy)
    metrics_networks: list[str] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"],
                                        description="client networks allowed to read the metrics")
    metrics_token: SecretStr | None = Field(default=None, description="a bearer token that may read the "
                                            "metrics from anywhere")

    @field_validator("metrics_networks")
    @classmethod
    def _metrics_networks(cls, networks: list[str]) -> list[str]:
        for network in networks:
            ipaddress.ip_network(network, strict=False)
        return networks

    @field_validator("secret")
    @classmethod
    def _long_enough(cls, secret: SecretStr | None) -> SecretStr | None:
        if secret is not None and len(secret.get_secret_value()) < 16:
            raise ValueError("secret must be at least 16 characters")
        return secret

    @field_validator("routes")
    @classmethod
    def _paths(cls, routes: dict[str, RoutePolicy]) -> dict[str, RoutePolicy]:
        for path in routes:
            if not path.startswith("/"):
                raise ValueError(f"route {path!r} must be a path starting with '/'")
            if is_template(path):
                template_regex(path)
        paths = list(routes)
        for i, first in enumerate(paths):
            for second in paths[i + 1:]:
                both = overlap(first, second)
                if both is not None:
                    raise ValueError(f"routes {first!r} and {second!r} both match {both!r}: give every path "
                                     "one route (keep the template, or make the templates disjoint)")
        return routes

    @field_validator("store")
    @classmethod
    def _store_uri(cls, uri: str) -> str:
        check_store_uri(uri)
        return uri

    @model_validator(mode="after")
    def _metrics_path(self) -> Policy:
        path = self.metrics_path
        if path is not None and (not path.startswith("/")
                                 or any(overlap(path, route) is not None for route in self.routes)):
            raise ValueError(f"metrics_path {path!r} must be a path starting with '/' and not a guarded route")
        return self

    @field_validator("detectors")
    @classmethod
    def _known_detectors(cls, detectors: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        unknown = set(detectors) - set(DETECTORS)
        if unknown:
            raise ValueError(f"unknown detectors {sorted(unknown)}: use {sorted(DETECTORS)}")
        return detectors

    @model_validator(mode="after")
    def _route_detectors(self) -> Policy:
        for path, route in self.routes.items():
            missing = set(route.detectors or ()) - set(self.detectors)
            if missing:
                raise ValueError(f"route {path} names detectors {sorted(missing)} absent from `detectors`")
        return self

    @model_validator(mode="after")
    def _streams_need_redis(self) -> Policy:
        if self.monitor.deployment == "streams" and not self.store.startswith(("redis", "rediss", "unix")):
            raise ValueError("monitor.deployment = 'streams' needs a Redis store")
        return self

    @model_validator(mode="after")
    def _secret_where_needed(self) -> Policy:
        reasons = self.secret_needed()
        if self.secret is None and reasons:
            if not self.dev_random_secret:
                raise ValueError(f"a `secret` is required ({'; '.join(reasons)}); for development only, "
                                 "`dev_random_secret = true` uses a random one per process")
            warnings.warn(f"predguard: random per-process secret although {'; '.join(reasons)}: "
                          "development only", stacklevel=2)
        return self

    def secret_needed(self) -> list[str]:
        """Why this deployment needs a configured secret: what a per-process one would break."""
        reasons = []
        if several_workers():
            reasons.append("several worker processes would each hash keys, salt detectors and seed noise "
                           "differently")
        if not self.store.startswith("memory:"):
            reasons.append("a shared store needs every worker and restart to name clients alike")
        if self.identity.header:
            reasons.append("API keys are stored as keyed hashes")
        if any(read_spec(spec)[0] == "noise" for route in self.routes.values()
               for spec in route.output + route.degraded_output):
            reasons.append("noise is seeded by a keyed hash and must not change across restarts")
        if self.watermarked:
            reasons.append("watermarks are chosen by a keyed hash and must be verifiable after restarts")
        return reasons

    @property
    def watermarked(self) -> bool:
        """Whether a route's output defences include the watermark (whose records the store keeps)."""
        return any(read_spec(spec)[0] == "watermark" for route in self.routes.values()
                   for spec in route.output + route.degraded_output)

    @property
    def secret_bytes(self) -> bytes:
        return (self.secret.get_secret_value() if self.secret is not None else _PROCESS_SECRET).encode()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Policy:
        return cls.model_validate(data)

    @classmethod
    def from_file(cls, path: str | Path) -> Policy:
        """Load a ``.toml``, ``.yaml`` or ``.yml`` policy file; ``ValueError`` with a one-line
        message naming the file and each setting that is wrong."""
        path = Path(path)
        if path.suffix == ".toml":
            data = tomllib.loads(path.read_text())
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(path.read_text()) or {}
        else:
            raise ValueError(f"{path}: policy files must be .toml, .yaml or .yml")
        try:
            return cls.from_dict(data)
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'policy'}: "
                                 f"{e['msg'].removeprefix('Value error, ')}" for e in error.errors())
            raise ValueError(f"{path}: {problems}") from None
