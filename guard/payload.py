"""Find and rewrite the probability vectors inside a JSON body, and read the feature vectors from a
request, at JSON pointers (RFC 6901).

Probabilities may be a single vector ``[p1, ..., pk]``, a batch ``[[...], ...]``, a flat row-major
list of ``n * k`` numbers (KServe v2 tensors), a label→probability object ``{"cat": p1, ...}`` or a
batch of such objects; ``Probabilities`` holds them as an ``(n, k)`` array and writes defended values
back in the same form (label-only: the predicted labels, or one-hot rows that keep the schema).

Features come from a ``FeatureSource``: a vector or batch at one pointer (``VectorAt``), named
fields of one object or of each object in a list (``NamedFields``), query parameters (``QueryFields``)
or a user function (``FeatureFunction``); each value is read as the app's pydantic model reads a
``float`` field (numeric strings and booleans included: ``feature_number``). The same description
also *writes* requests (``write``) and cuts answers into rows (``answer_rows``), so ``guard audit``
talks to an endpoint in exactly the shape the guard reads.
"""
from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qs

import numpy as np
import orjson
from pydantic import TypeAdapter, ValidationError

from guard.references import import_function

Json = Any


class PayloadError(ValueError):
    """A JSON body does not hold what the policy says it holds."""


loads = orjson.loads
dumps = orjson.dumps


@dataclass(frozen=True)
class Pointer:
    """A JSON pointer (RFC 6901), parsed once: ``""`` is the whole document, ``"/a/0"`` the first
    element of member ``a``; ``~1`` stands for ``/`` and ``~0`` for ``~`` inside a token."""

    text: str
    tokens: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Pointer:
        if text and not text.startswith("/"):
            raise ValueError(f"JSON pointer {text!r} must be empty or start with '/'")
        tokens = tuple(t.replace("~1", "/").replace("~0", "~") for t in text.split("/")[1:])
        return cls(text, tokens)

    def _step(self, node: Json, token: str) -> Json:
        if isinstance(node, dict) and token in node:
            return node[token]
        if (isinstance(node, list) and token.isdigit() and (token == "0" or token[0] != "0")
                and int(token) < len(node)):
            return node[int(token)]
        raise PayloadError(f"nothing at JSON pointer {self.text!r}")

    def get(self, document: Json) -> Json:
        """The value the pointer names; ``PayloadError`` when there is none."""
        for token in self.tokens:
            document = self._step(document, token)
        return document

    def replace(self, document: Json, value: Json) -> Json:
        """``document`` with the (existing) value at the pointer replaced by ``value``; the
        containers are modified in place and the document is returned."""
        if not self.tokens:
            return value
        parent = document
        for token in self.tokens[:-1]:
            parent = self._step(parent, token)
        last = self.tokens[-1]
        self._step(parent, last)
        parent[int(last) if isinstance(parent, list) else last] = value
        return document

    def put(self, document: Json, value: Json) -> Json:
        """``document`` with ``value`` at the pointer, making the objects on the way that are
        missing (an existing list element may be replaced); modified in place and returned."""
        if not self.tokens:
            return value
        parent = document
        for token in self.tokens[:-1]:
            if isinstance(parent, dict) and token not in parent:
                parent[token] = {}
            parent = self._step(parent, token)
        last = self.tokens[-1]
        if isinstance(parent, list):
            self._step(parent, last)
            parent[int(last)] = value
        elif isinstance(parent, dict):
            parent[last] = value
        else:
            raise PayloadError(f"nothing at JSON pointer {self.text!r} can hold a value")
        return document


@dataclass(frozen=True)
class EachRow:
    """The value at ``field`` in each object of the list at ``rows``, read and written as one batch:
    an answer like ``[{"prediction": "setosa", "probabilities": {...}}, ...]``."""

    rows: Pointer
    field: Pointer

    @property
    def text(self) -> str:
        return f"{self.field.text!r} in each of {self.rows.text!r}"

    def _objects(self, document: Json) -> list:
        objects = self.rows.get(document)
        if not isinstance(objects, list) or not objects:
            raise PayloadError(f"nothing at JSON pointer {self.rows.text!r} is a non-empty list")
        return objects

    def get(self, document: Json) -> list:
        return [self.field.get(row) for row in self._objects(document)]

    def replace(self, document: Json, value: list) -> Json:
        for row, replacement in zip(self._objects(document), value, strict=True):
            self.field.replace(row, replacement)
        return document


_FLOATS = {float}


def _number(value: Json) -> float:
    """A JSON number as a float (a probability in an answer: strict, no strings or booleans)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{value!r} is not a number")
    return float(value)


_LAX_FLOAT = TypeAdapter(float)


def feature_number(value: Json) -> float:
    """A request's feature value read as the app's pydantic model reads a ``float`` field in its
    default (lax) mode: a number, a boolean (1.0 or 0.0) or a numeric string (``"5.9"``, ``" 1e3 "``,
    ``"1_000"``); ``TypeError`` for anything pydantic refuses (``OverflowError`` for an integer
    beyond float64). A string of a non-finite value (``"nan"``, ``"inf"``, which pydantic's
    ``float`` takes) is refused with ``PayloadError``: the detectors cannot judge it (JSON numbers
    are finite: the parser refuses NaN and infinities)."""
    kind = type(value)
    if kind is float or kind is int:  # JSON numbers, as pydantic reads them, without its call
        return float(value)  # OverflowError beyond float64, where pydantic refuses too
    try:
        number = _LAX_FLOAT.validate_python(value)
    except ValidationError:
        raise TypeError(f"{value!r} is not a number") from None
    if not math.isfinite(number):
        raise PayloadError(f"features: {value!r} is not a finite number")
    return number


def number_rows(value: Json, what: str, number: Callable[[Json], float] = _number
                ) -> tuple[list[list[float]], bool]:
    """A JSON vector or list of equal-length vectors of numbers as rows of floats, and whether it
    was a single vector; values that are not floats are read by ``number`` (``TypeError``: not a
    number). Plain Python, no numpy: requests and answers hold a few short rows, where each numpy
    call costs several microseconds on the request path."""
    single = isinstance(value, list) and bool(value) and not isinstance(value[0], list)
    if single and set(map(type, value)) == _FLOATS:  # the common case, checked without generators
        return [value], True
    rows = [value] if single else value
    if not isinstance(rows, list) or not rows or not all(isinstance(row, list) for row in rows) or not rows[0]:
        raise PayloadError(f"{what}: expected a non-empty list of numbers or a list of such lists")
    width = len(rows[0])
    if any(len(row) != width for row in rows):
        raise PayloadError(f"{what}: rows of different lengths")
    if not all(set(map(type, row)) == _FLOATS for row in rows):  # ints, or something else
        try:
            rows = [[number(v) for v in row] for row in rows]
        except (TypeError, OverflowError):
            raise PayloadError(f"{what}: expected a non-empty list of numbers or a list of such lists") from None
    return rows, single


FeatureRows = list[list[float]]
"""A request's feature rows: ``n`` lists of ``d`` floats (``np.asarray`` makes the ``(n, d)`` array).
Lists, not an array, on the request path: a few short rows, where each numpy call costs
microseconds; the in-process monitor converts each observation's once (``detectors.base.with_array``)."""


def json_features(value: Json, width: int | None = None) -> FeatureRows:
    """The feature vectors (one vector or a batch) in parsed JSON as rows, each value read as the
    app's pydantic model would read a ``float`` (``feature_number``); with ``width``, a flat
    row-major list of ``n * width`` numbers is read as ``n`` rows. Finite: the JSON parser refuses
    NaN, infinities and numbers beyond float64, and ``feature_number`` non-finite strings."""
    rows = number_rows(value, "features", feature_number)[0]
    if width is not None:
        values = rows[0] if len(rows) == 1 else [v for row in rows for v in row]
        if len(values) % width:
            raise PayloadError(f"features: {len(values)} values are not rows of {width}")
        rows = [values[i:i + width] for i in range(0, len(values), width)]
    return rows


def read_features(value: Json, width: int | None = None) -> FeatureRows:
    """``json_features`` of values from anywhere (a query string, a user's function), checked finite."""
    rows = json_features(value, width)
    if not all(math.isfinite(v) for row in rows for v in row):
        raise PayloadError("features: not all values are finite")
    return rows


class InvalidJSON(PayloadError):
    """The request body is not JSON."""


NO_FEATURES: FeatureRows = []
"""What a source reads from a request without a body (a GET or DELETE on a JSON route): no rows
(shared: never modified)."""


class FeatureSource(Protocol):
    """Where a route's feature rows are in a request."""

    def read(self, body: bytes, query_string: bytes) -> FeatureRows:
        """The request's finite feature rows, ``n`` of ``d`` (``NO_FEATURES`` when a body source
        gets no body); ``InvalidJSON`` or ``PayloadError`` when they are not there."""

    def write(self, rows: np.ndarray, single: bool, example: Json = None) -> Json:
        """A JSON request body that ``read`` reads ``rows`` from (one row not as a batch when
        ``single``), built on a copy of ``example`` (the rest of a request, e.g. a KServe v2
        ``outputs`` list); ``ValueError`` when this source cannot be written."""


def parse_body(body: bytes) -> Json:
    try:
        return loads(body)
    except ValueError:
        raise InvalidJSON("the request body is not valid JSON") from None


@dataclass(frozen=True)
class VectorAt:
    """One feature vector or a batch of them at ``pointer`` (flat rows of ``width`` when given)."""

    pointer: Pointer
    width: int | None = None

    def read(self, body: bytes, query_string: bytes) -> FeatureRows:
        if not body:
            return NO_FEATURES
        return json_features(self.pointer.get(parse_body(body)), self.width)

    def write(self, rows: np.ndarray, single: bool, example: Json = None) -> Json:
        if self.width is not None:
            value = rows.ravel().tolist()
        else:
            value = rows[0].tolist() if single else rows.tolist()
        return self.pointer.put(copy.deepcopy(example) if example is not None else {}, value)


@dataclass(frozen=True)
class NamedFields:
    """Named scalar fields in model order, e.g. a pydantic body ``{"sepal_length": 5.1, ...}``: read
    from the object at ``rows``, or from each object when ``rows`` names a list of them."""

    fields: tuple[Pointer, ...]
    rows: Pointer = Pointer("", ())

    def read(self, body: bytes, query_string: bytes) -> FeatureRows:
        if not body:
            return NO_FEATURES
        found = self.rows.get(parse_body(body))
        objects = found if isinstance(found, list) else [found]
        try:
            values = [[field.get(row) for field in self.fields] for row in objects]
        except PayloadError as error:
            raise PayloadError(f"features: {error}") from None
        return json_features([[self._number(field, v) for field, v in zip(self.fields, row)] for row in values])

    @staticmethod
    def _number(field: Pointer, value: Json) -> float:
        try:
            return feature_number(value)
        except (TypeError, OverflowError):
            raise PayloadError(f"features: {field.text!r} holds {value!r}, not a number") from None

    def write(self, rows: np.ndarray, single: bool, example: Json = None) -> Json:
        if rows.shape[1] != len(self.fields):
            raise ValueError(f"{len(self.fields)} named fields for rows of {rows.shape[1]} features")
        objects = []
        for row in rows.tolist():
            entry: Json = {}
            for field, value in zip(self.fields, row, strict=True):
                entry = field.put(entry, value)
            objects.append(entry)
        return self.rows.put(copy.deepcopy(example) if example is not None else {},
                             objects[0] if single else objects)


@dataclass(frozen=True)
class QueryFields:
    """Features from query parameters in model order (``GET /predict?x1=0.5&x2=3``): one row."""

    names: tuple[str, ...]

    def read(self, body: bytes, query_string: bytes) -> FeatureRows:
        query = parse_qs(query_string.decode("latin-1"), keep_blank_values=True)
        missing = [name for name in self.names if name not in query]
        if missing:
            raise PayloadError(f"features: query parameters {missing} missing")
        try:
            return [[feature_number(query[name][-1]) for name in self.names]]
        except TypeError:
            raise PayloadError("features: every feature parameter must be a number") from None

    def write(self, rows: np.ndarray, single: bool, example: Json = None) -> Json:
        raise ValueError("features in the query string: only requests with a JSON body can be written")


UserFunction = Callable[[Json, Mapping[str, list[str]]], Any]
"""``function(document, query) -> rows``: the parsed JSON body (``None`` without a body) and the
query parameters (name -> values) to one feature vector or a batch."""


@dataclass(frozen=True)
class FeatureFunction:
    """Features computed by the user's ``function`` (``UserFunction``); any exception it raises is
    the request's fault (``422``)."""

    function: UserFunction

    @classmethod
    def named(cls, reference: str | UserFunction) -> FeatureFunction:
        """From a callable or a ``"module:function"`` reference."""
        return cls(reference if callable(reference) else import_function(reference))

    def read(self, body: bytes, query_string: bytes) -> FeatureRows:
        document = parse_body(body) if body else None
        try:
            rows = self.function(document, parse_qs(query_string.decode("latin-1")))
        except Exception as error:
            raise PayloadError(f"features: {type(error).__name__}: {error}") from None
        return read_features(rows.tolist() if isinstance(rows, np.ndarray) else rows)

    def write(self, rows: np.ndarray, single: bool, example: Json = None) -> Json:
        writer = REQUEST_WRITERS.get(self.function)
        if writer is None:
            raise ValueError(f"features read by {getattr(self.function, '__name__', self.function)!r}, "
                             "which has no request writer: describe them with `features` pointers")
        return writer(rows, example)


def kserve_v2_inputs(document: Json, query: Mapping[str, list[str]]) -> np.ndarray:
    """Features of a KServe v2 (Open Inference Protocol) request: its one input tensor, reshaped by
    its ``shape``. Requests asking for more than one output are refused, so the one answer is at
    ``/outputs/0`` where the policy's probabilities pointer defends it (a second output could carry
    the raw probabilities past the guard)."""
    if not isinstance(document, dict) or len(document.get("inputs") or ()) != 1:
        raise ValueError("a v2 inference request with exactly one input tensor is expected")
    if len(document.get("outputs") or ()) > 1:
        raise ValueError("ask for at most one output: only /outputs/0 is answered through the guard")
    tensor = document["inputs"][0]
    return np.asarray(tensor["data"], dtype=np.float64).reshape(tensor["shape"])


def kserve_v2_request(rows: np.ndarray, example: Json = None) -> Json:
    """A KServe v2 inference request that ``kserve_v2_inputs`` reads ``rows`` from: one ``FP64``
    tensor named ``input-0`` (unless ``example``'s first input names them otherwise), with the
    rest of ``example`` (e.g. ``{"outputs": [{"name": "predict_proba"}]}``)."""
    body = copy.deepcopy(example) if example is not None else {}
    named = (body.get("inputs") or [{}])[0]
    body["inputs"] = [{"name": "input-0", "datatype": "FP64", **named, "shape": list(rows.shape),
                       "data": rows.ravel().tolist()}]
    return body


REQUEST_WRITERS: dict[Callable, Callable[[np.ndarray, Json], Json]] = {kserve_v2_inputs: kserve_v2_request}
"""The request each built-in feature function reads, written (``FeatureFunction.write``)."""


@dataclass(frozen=True)
class Probabilities:
    """Probability vectors found in a response: ``rows`` (``n`` lists of ``k`` floats; ``values``:
    the same as an ``(n, k)`` array); ``single`` when the body held one vector rather than a batch;
    ``labels`` the object keys when it held label→probability objects (``None`` for plain vectors);
    ``flat`` when it held one row-major list of ``n * k``."""

    rows: list[list[float]]
    single: bool
    labels: tuple[str, ...] | None
    flat: bool = False

    @functools.cached_property
    def values(self) -> np.ndarray:
        return np.array(self.rows)

    def predicted(self) -> list[int]:
        """Each row's label (its first largest entry)."""
        return [row.index(max(row)) for row in self.rows]

    def render(self, defended: np.ndarray | list[list[float]], label_only: bool, one_hot: bool = False) -> Json:
        """JSON for ``defended`` in the form the probabilities came in. Label-only: the predicted
        class instead of each vector: its index, or its label for label→probability objects; with
        ``one_hot``, a vector (or object) of the same schema with 1.0 for the predicted class."""
        if label_only and one_hot:
            defended = np.eye(defended.shape[1])[defended.argmax(axis=1)]
        elif label_only:
            top = defended.argmax(axis=1).tolist()
            rows = top if self.labels is None else [self.labels[i] for i in top]
            return rows[0] if self.single else rows
        rows = defended.tolist() if isinstance(defended, np.ndarray) else defended
        if self.flat:
            return [value for row in rows for value in row]
        if self.labels is not None:
            rows = [dict(zip(self.labels, row)) for row in rows]
        return rows[0] if self.single else rows


def answer_rows(value: Json, n: int, single: bool, classes: int | None = None) -> list:
    """The ``n`` answers at a route's probabilities pointer, one per request row, as the endpoint
    wrote them (probability vectors, label->probability objects, or a label-only answer's labels):
    ``single``: one answer for a one-row request; ``classes``: a flat row-major list of ``n *
    classes`` numbers (``probabilities_flat``, for any ``n``), cut into rows (a label-only answer
    holds ``n`` labels)."""
    if single and classes is None:
        return [value]
    if not isinstance(value, list):
        raise PayloadError("answers: expected a list, one entry per row")
    if classes is not None and classes > 1 and len(value) == n * classes:
        return [value[i * classes:(i + 1) * classes] for i in range(n)]
    return value


def _label_rows(value: Json, labels: tuple[str, ...] | None) -> tuple[list, bool, tuple[str, ...]]:
    """Label→probability objects as rows ordered by ``labels`` (default: the first object's keys)."""
    single = isinstance(value, dict)
    objects = [value] if single else value
    if not all(isinstance(o, dict) for o in objects):
        raise PayloadError("probabilities: mixed objects and other values")
    labels = labels or tuple(objects[0])
    if any(o.keys() != set(labels) for o in objects):
        raise PayloadError("probabilities: objects do not all have the expected labels")
    return [[o[label] for label in labels] for o in objects], single, labels


def read_probabilities(value: Json, labels: tuple[str, ...] | None = None,
                       tolerance: float = 1e-3, flat: bool = False) -> Probabilities:
    """Locate and validate the probability vectors in ``value``: finite, non-negative, each row
    summing to one within ``tolerance``; with ``labels``, exactly that many classes (and, for
    label→probability objects, exactly those keys, in that order). ``flat``: ``value`` is one
    row-major list of ``n * len(labels)`` numbers."""
    keys = None
    if flat:
        rows, single = number_rows(value, "probabilities")
        if not single or labels is None or len(rows[0]) % len(labels):
            raise PayloadError("probabilities: expected a flat list of rows of the labels' length")
        k, values = len(labels), rows[0]
        rows, single = [values[i:i + k] for i in range(0, len(values), k)], False
    elif isinstance(value, dict) or (isinstance(value, list) and value and isinstance(value[0], dict)):
        value, single, keys = _label_rows(value, labels)
        rows = number_rows(value, "probabilities")[0]
    else:
        rows, single = number_rows(value, "probabilities")
    if labels is not None and len(rows[0]) != len(labels):
        raise PayloadError(f"probabilities: expected {len(labels)} classes, got {len(rows[0])}")
    # Any NaN or infinity makes the total of the sums non-finite; with that excluded, ``min`` and
    # ``max`` are exact.
    sums = [sum(row) for row in rows]
    if not (math.isfinite(sum(sums)) and min(map(min, rows)) >= 0 and min(sums) >= 1.0 - tolerance
            and max(sums) <= 1.0 + tolerance):
        values = np.array(rows)
        if not np.isfinite(values).all():
            raise PayloadError("probabilities: not all values are finite")
        if values.min() < 0:
            raise PayloadError("probabilities: negative values")
        raise PayloadError(f"probabilities: rows do not sum to 1 (tolerance {tolerance})")
    return Probabilities(rows, single, keys, flat)
