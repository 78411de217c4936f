"""What an attack queries.

A ``Target`` answers ``predict_proba(X)`` (an ``(n, k)`` array) and/or ``predict(X)`` (labels), counts
every queried row against an optional budget, and says clearly when it cannot give what an attack
needs (``OutputUnavailable``), e.g. probabilities from an API that returns labels only.
Targets: ``CallableTarget`` (in-process), ``TorchTarget`` (white-box) and ``HTTPTarget`` (a live
endpoint, which also records when it was throttled, degraded or blocked).

``OutputFormat`` is what the attacker knows about the API's public output format (rounded, top-k,
label-only). Adaptive attacks pass their own shadow/reference models' outputs through
``OutputFormat.apply`` so they score them exactly as the target's answers are scored. It is the
attacker's own description of the format: ``attacks`` never imports the defence's code.
"""
from __future__ import annotations

import asyncio
import email.utils
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Self

import httpx
import numpy as np
import orjson
import torch
from torch import nn


class QueryBudgetExceeded(RuntimeError):
    """The attack asked for more rows than the target's query budget allows."""


class OutputUnavailable(RuntimeError):
    """The target does not return what the attack needs (e.g. probabilities from a label-only API)."""


@dataclass(frozen=True)
class OutputFormat:
    """The API's public output format as the attacker learns it from the answers."""

    rounding: int | None = None
    top_k: int | None = None
    label_only: bool = False

    def apply(self, probabilities: np.ndarray) -> np.ndarray:
        """Transform full probabilities as the API would: label-only gives one-hot rows."""
        probabilities = np.asarray(probabilities, dtype=np.float64)
        if self.label_only:
            return np.eye(probabilities.shape[1])[probabilities.argmax(axis=1)]
        if self.top_k is not None:
            cut = np.sort(probabilities, axis=1)[:, -self.top_k][:, None]
            probabilities = np.where(probabilities >= cut, probabilities, 0.0)
            probabilities = probabilities / probabilities.sum(axis=1, keepdims=True)
        if self.rounding is not None:
            probabilities = np.round(probabilities, self.rounding)
        return probabilities


class Target(ABC):
    """Counts queries (rows) against ``budget``; subclasses implement ``_query``."""

    def __init__(self, n_classes: int, budget: int | None = None):
        self.n_classes = n_classes
        self.budget = budget
        self.queries = 0

    @property
    @abstractmethod
    def returns_probabilities(self) -> bool:
        """Whether ``predict_proba`` can answer (False for label-only targets)."""

    @abstractmethod
    def _query(self, X: np.ndarray) -> np.ndarray:
        """Answer a batch: ``(n, k)`` probabilities, or ``(n,)`` integer labels if label-only."""

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        if not self.returns_probabilities:
            raise OutputUnavailable(
                "the target returns labels only; use a label-only attack (or OutputFormat(label_only=True))"
            )
        return self._ask(X)

    def predict(self, X: np.ndarray) -> np.ndarray:
        answers = self._ask(X)
        return answers.argmax(axis=1) if answers.ndim == 2 else answers

    def answer(self, X: np.ndarray) -> np.ndarray:
        """Whatever the target gives, counted: ``(n, k)`` probabilities, or ``(n,)`` labels from a
        label-only target; for attacks that use probabilities where there are any, labels otherwise."""
        return self._ask(X)

    def _ask(self, X: np.ndarray) -> np.ndarray:
        X = np.atleast_2d(np.asarray(X, dtype=np.float64))
        if self.budget is not None and self.queries + len(X) > self.budget:
            raise QueryBudgetExceeded(
                f"{len(X)} more queries would exceed the budget of {self.budget} ({self.queries} spent)"
            )
        self.queries += len(X)
        return self._query(X)


class CallableTarget(Target):
    """An in-process target: any callable mapping a batch to probabilities (or to labels when
    ``label_only``), or a scikit-learn-style model via ``from_model``. ``output`` is applied to the
    callable's probabilities, so a local target can mimic a defended API's answers."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], n_classes: int, *,
                 output: OutputFormat = OutputFormat(), budget: int | None = None):
        super().__init__(n_classes, budget)
        self.fn = fn
        self.output = output

    @classmethod
    def from_model(cls, model, n_classes: int, **kwargs) -> CallableTarget:
        return cls(model.predict_proba, n_classes, **kwargs)

    @property
    def returns_probabilities(self) -> bool:
        return not self.output.label_only

    def _query(self, X: np.ndarray) -> np.ndarray:
        answers = self.output.apply(self.fn(X))
        return answers.argmax(axis=1) if self.output.label_only else answers


class TorchTarget(CallableTarget):
    """A white-box torch classifier: queries like any target, and ``module`` gives gradients."""

    def __init__(self, module: nn.Module, n_classes: int, **kwargs):
        self.module = module.eval()
        super().__init__(self._softmax, n_classes, **kwargs)

    def _softmax(self, X: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            logits = self.module(torch.as_tensor(X, dtype=torch.float32))
        return torch.softmax(logits.double(), dim=1).numpy()


class TargetError(RuntimeError):
    """The endpoint answered something other than predictions: ``status`` and a body excerpt."""

    def __init__(self, message: str, status: int | None = None, body: str = ""):
        super().__init__(f"{message} (status {status}): {body[:200]!r}" if status is not None else message)
        self.status = status
        self.body = body


class TargetBlocked(TargetError):
    """The endpoint refused the client (``403``). ``queries`` answered before, and ``events``: the
    query counts at which it was first throttled, degraded and blocked."""

    def __init__(self, status: int, body: str, queries: int, events: dict[str, int | None]):
        super().__init__(f"blocked after {queries} answered queries, events {events}", status, body)
        self.queries = queries
        self.events = events


class TargetThrottled(TargetError):
    """The endpoint kept answering ``429`` for longer than the target's ``max_wait``."""


class HTTPTarget(Target):
    """A prediction endpoint over HTTP (httpx), queried in batches.

    The request carries a batch of feature rows at the JSON pointer ``features_path``; the answer
    holds, at ``probabilities_path``, one entry per row: a probability list, a label->probability
    object, or (label-only APIs) the predicted class as an integer index or a label string
    (``class_labels`` gives the class order for labels and objects; by default an object's key order).
    ``returns_probabilities`` is learnt from the answers (a probe of one row in the middle of the
    feature box when nothing was asked yet; needs ``n_features``).

    ``single_rows``: each request carries one row (a vector, not a batch) and the answer is one
    entry, as for an endpoint with a typed single-record body; ``fields`` sends each row as an object
    of named fields (``{"sepal_length": 5.1, ...}``) instead of a vector; ``encode`` maps the rows
    (e.g. back to the endpoint's own feature scale) just before they are sent. ``write_body(rows,
    single) -> JSON`` and ``read_answers(document, n, single) -> list`` replace the pointers
    altogether, for request and answer shapes a pointer cannot describe (``guard audit`` builds
    them from the guard's own description of the route). ``one_hot_labels``: probability-shaped
    answers are one-hot encodings of labels (a label-only API answering vectors), read as labels.

    Requests are paced by the endpoint's ``RateLimit-Remaining``/``RateLimit-Reset`` headers (or
    their ``X-RateLimit-`` forms): when none remain, the next request waits for the reset.
    ``429`` answers are retried after ``Retry-After`` seconds (each wait capped, at most ``max_wait``
    seconds in all per batch); ``events`` records the number of answered queries when the endpoint
    first throttled (``429``), degraded (answers switched from probabilities to labels) and blocked
    (``403``, which raises ``TargetBlocked``). ``api_keys`` are used round robin, one per batch, in
    the ``key_header`` header; with several keys each call's rows are split evenly over all of them
    (a Sybil attacker spreads every round of queries over its identities). ``client`` is an
    ``httpx.Client``, an ASGI app (served in-process), or ``None`` for a fresh client; ``queries``
    counts the rows the endpoint answered; ``progress(queries)`` is called after every request.
    """

    def __init__(self, url: str, n_classes: int, *, features_path: str = "/features",
                 probabilities_path: str = "/probabilities", batch_size: int = 256,
                 api_keys: Sequence[str] = (), key_header: str = "X-API-Key", budget: int | None = None,
                 client: httpx.Client | Callable | None = None, timeout: float = 30.0,
                 max_wait: float = 60.0, class_labels: Sequence[str] | None = None,
                 n_features: int | None = None, single_rows: bool = False,
                 fields: Sequence[str] | None = None, encode: Callable[[np.ndarray], np.ndarray] | None = None,
                 progress: Callable[[int], None] | None = None,
                 write_body: Callable[[np.ndarray, bool], Any] | None = None,
                 read_answers: Callable[[Any, int, bool], list] | None = None, one_hot_labels: bool = False):
        super().__init__(n_classes, budget)
        self.one_hot_labels = one_hot_labels
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.url = url
        self.features_path = _pointer_tokens(features_path)
        self.probabilities_path = _pointer_tokens(probabilities_path)
        self.single_rows = single_rows
        self.batch_size = 1 if single_rows else batch_size
        self.fields = list(fields) if fields else None
        self.encode = encode
        self.progress = progress
        self.write_body, self.read_answers = write_body, read_answers
        self._remaining: tuple[int, float] | None = None  # (rows left, monotonic time of the reset)
        self.api_keys = list(api_keys)
        self.key_header = key_header
        self.max_wait = max_wait
        self.class_labels = list(class_labels) if class_labels is not None else None
        self.n_features = n_features
        self.events: dict[str, int | None] = {"throttled_at": None, "degraded_at": None, "blocked_at": None}
        self._gave_probabilities: bool | None = None
        self._batches = 0
        self._owns_client = not isinstance(client, httpx.Client)
        if client is None:
            self._client: httpx.Client | _ASGIClient = httpx.Client(timeout=timeout)
        elif isinstance(client, httpx.Client):
            self._client = client
        else:
            self._client = _ASGIClient(client, timeout)

    def close(self) -> None:
        """Close the HTTP client if this target made it."""
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def returns_probabilities(self) -> bool:
        if self._gave_probabilities is None:
            if self.n_features is None:
                raise ValueError("nothing asked yet: pass n_features so the target can probe the endpoint")
            self._ask(np.full((1, self.n_features), 0.5))
        return bool(self._gave_probabilities)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        if self._gave_probabilities is False:
            raise OutputUnavailable(f"the endpoint answers labels only (events {self.events})")
        answers = self._ask(X)
        if answers.ndim == 1:
            raise OutputUnavailable(f"the endpoint answered labels, not probabilities (events {self.events})")
        return answers

    def _query(self, X: np.ndarray) -> np.ndarray:
        answered = self.queries - len(X)
        parts = []
        size = self.batch_size if len(self.api_keys) < 2 else min(self.batch_size, -(-len(X) // len(self.api_keys)))
        try:
            for batch in np.array_split(X, range(size, len(X), size)):
                parts.append(self._post(batch, answered))
                answered += len(batch)
        finally:
            self.queries = answered
        if any(part.ndim == 1 for part in parts):
            return np.concatenate([part.argmax(axis=1) if part.ndim == 2 else part for part in parts])
        return np.concatenate(parts)

    def _post(self, batch: np.ndarray, answered: int) -> np.ndarray:
        headers = {"Content-Type": "application/json"}
        if self.api_keys:
            headers[self.key_header] = self.api_keys[self._batches % len(self.api_keys)]
        self._batches += 1
        body = orjson.dumps(self._body(batch), option=orjson.OPT_SERIALIZE_NUMPY)
        waited = self._pace(len(batch))
        while True:
            response = self._client.post(self.url, content=body, headers=headers)
            self._note_limit(response.headers)
            if response.status_code != 429:
                break
            self._record("throttled_at", answered)
            pause = _retry_after(response.headers.get("Retry-After"))
            if waited + pause > self.max_wait:
                raise TargetThrottled(f"still throttled after waiting {waited:.1f} s", 429, response.text)
            time.sleep(pause)
            waited += pause
        if response.status_code == 403:
            self._record("blocked_at", answered)
            raise TargetBlocked(403, response.text, answered, dict(self.events))
        if not response.is_success:
            raise TargetError("the endpoint answered an error", response.status_code, response.text)
        try:
            value = self._answers(orjson.loads(response.content), len(batch))
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise TargetError(f"no predictions where expected: {error}", response.status_code,
                              response.text) from error
        answers = self._parse(value, len(batch), response)
        if self.progress is not None:
            self.progress(answered + len(batch))
        gave_probabilities = answers.ndim == 2
        if self._gave_probabilities and not gave_probabilities:
            self._record("degraded_at", answered)
        if self._gave_probabilities is None:
            self._gave_probabilities = gave_probabilities
        return answers

    def _body(self, batch: np.ndarray) -> Any:
        """The request document for ``batch`` (encoded with orjson, numpy arrays included): vectors
        or objects of named fields at the features path (one row alone when the endpoint takes single
        rows), or what ``write_body`` writes."""
        batch = self.encode(batch) if self.encode is not None else batch
        if self.write_body is not None:
            return self.write_body(batch, self.single_rows)
        batch = np.asarray(batch)
        if self.fields is not None:
            rows: Any = [dict(zip(self.fields, row, strict=True)) for row in batch.tolist()]
        else:
            rows = np.ascontiguousarray(batch) if batch.dtype.kind in "biuf" else batch.tolist()
        return _pointer_build(self.features_path, rows[0] if self.single_rows else rows)

    def _answers(self, document: Any, n: int) -> Any:
        """The answers for a batch of ``n`` rows, one entry each."""
        if self.read_answers is not None:
            return self.read_answers(document, n, self.single_rows)
        value = _pointer_get(document, self.probabilities_path)
        return [value] if self.single_rows else value

    def _pace(self, rows: int) -> float:
        """Wait until the endpoint's rate-limit window resets when its last answer said fewer than
        ``rows`` queries remain; the seconds waited (counted against ``max_wait``)."""
        if self._remaining is None or self._remaining[0] >= rows:
            return 0.0
        pause = self._remaining[1] - time.monotonic()
        self._remaining = None
        if pause <= 0:
            return 0.0
        if pause > self.max_wait:
            raise TargetThrottled(f"the rate limit resets in {pause:.0f} s, more than max_wait {self.max_wait:.0f} s")
        time.sleep(pause)
        return pause

    def _note_limit(self, headers: httpx.Headers) -> None:
        remaining = headers.get("RateLimit-Remaining") or headers.get("X-RateLimit-Remaining")
        reset = headers.get("RateLimit-Reset") or headers.get("X-RateLimit-Reset")
        if remaining is None or reset is None or not remaining.strip().isdigit():
            return
        seconds = _retry_after(reset)
        if seconds > 1e6:  # an epoch timestamp (the X-RateLimit-Reset convention of some APIs)
            seconds = max(0.0, seconds - time.time())
        self._remaining = (int(remaining), time.monotonic() + seconds)

    def _parse(self, value: Any, n: int, response: httpx.Response) -> np.ndarray:
        """One batch's answers: ``(n, k)`` probabilities or ``(n,)`` label indices."""
        def fail(why: str) -> TargetError:
            return TargetError(f"unparseable answer: {why}", response.status_code, response.text)

        if not isinstance(value, list) or len(value) != n:
            raise fail(f"expected a list of {n} answers at the probabilities path")
        try:
            if all(isinstance(entry, dict) for entry in value):
                order = self._class_order(value[0])
                rows = np.array([[float(entry.get(label, 0.0)) for label in order] for entry in value])
            elif all(isinstance(entry, list) for entry in value):
                rows = np.asarray(value, dtype=np.float64)
            elif all(isinstance(entry, str) for entry in value):
                order = self._class_order({})
                return np.array([order.index(label) for label in value], dtype=np.int64)
            elif all(isinstance(entry, int) and not isinstance(entry, bool) for entry in value):
                labels = np.asarray(value, dtype=np.int64)
                if labels.min() < 0 or labels.max() >= self.n_classes:
                    raise fail(f"labels outside 0..{self.n_classes - 1}")
                return labels
            else:
                raise fail("answers are neither probabilities nor labels")
        except (TypeError, ValueError) as error:
            raise fail(str(error)) from error
        if rows.shape != (n, self.n_classes) or not np.isfinite(rows).all():
            raise fail(f"expected {n} finite rows of {self.n_classes} probabilities, got shape {rows.shape}")
        return rows.argmax(axis=1) if self.one_hot_labels else rows

    def _class_order(self, example: dict) -> list[str]:
        if self.class_labels is None:
            if len(example) != self.n_classes:
                raise ValueError("cannot tell the class order: pass class_labels")
            self.class_labels = list(example)
        return self.class_labels

    def _record(self, event: str, answered: int) -> None:
        if self.events[event] is None:
            self.events[event] = answered


def _retry_after(header: str | None, default: float = 1.0) -> float:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if header is None:
        return default
    try:
        return max(0.0, float(header))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(header).timestamp() - time.time())
        except (TypeError, ValueError):
            return default


def _pointer_tokens(pointer: str) -> list[str]:
    """The reference tokens of a JSON pointer (RFC 6901), e.g. ``/data/0/x``."""
    if pointer and not pointer.startswith("/"):
        raise ValueError(f"a JSON pointer starts with '/': {pointer!r}")
    return [token.replace("~1", "/").replace("~0", "~") for token in pointer.split("/")[1:]]


def _pointer_get(document: Any, tokens: list[str]) -> Any:
    for token in tokens:
        document = document[int(token)] if isinstance(document, list) else document[token]
    return document


def _pointer_build(tokens: list[str], value: Any) -> Any:
    """A request body holding ``value`` at the pointer (objects all the way down)."""
    for token in reversed(tokens):
        value = {token: value}
    return value


class _ASGIClient:
    """Synchronous requests to an in-process ASGI app: ``httpx.AsyncClient`` over ``ASGITransport``,
    run on one private event loop in a daemon thread, so it works whether or not the caller runs an
    event loop itself, and an app's loop-bound state (locks, connections) always sees the same loop.
    App exceptions come back as ``500`` answers, as from a real server."""

    _loop: asyncio.AbstractEventLoop | None = None
    _lock = threading.Lock()

    def __init__(self, app: Callable, timeout: float):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        self._client = httpx.AsyncClient(transport=transport, base_url="http://asgi.local", timeout=timeout)

    @classmethod
    def _shared_loop(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None:
                cls._loop = asyncio.new_event_loop()
                threading.Thread(target=cls._loop.run_forever, name="predguard-asgi", daemon=True).start()
            return cls._loop

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._shared_loop()).result()

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self._run(self._client.post(url, **kwargs))

    def close(self) -> None:
        self._run(self._client.aclose())
