"""A plain FastAPI prediction server around any ``predict_proba`` callable: the kind of app a
user puts ``GuardMiddleware`` in front of.

Request: ``{"features": [x1, ..., xd]}`` or a batch ``{"features": [[...], ...]}``.
Response: ``{"probabilities": [p1, ..., pk]}`` or ``{"probabilities": [[...], ...]}``.
The route reads and writes its bodies with orjson (the bench's in-process server spends its time on
the model and the guard, not on the standard library's JSON); a body that is not such a request is
answered ``422`` with a ``detail``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import orjson
from fastapi import FastAPI, HTTPException, Request, Response

PredictProba = Callable[[np.ndarray], np.ndarray]


def read_features(body: bytes, n_features: int) -> np.ndarray:
    """The request's features as a float64 array: ``(d,)`` for one row, ``(n, d)`` for a batch;
    ``HTTPException(422)`` for anything else (not JSON, no ``features``, ragged, not numbers)."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise HTTPException(422, f"the body is not JSON: {error}") from error
    features = document.get("features") if isinstance(document, dict) else None
    if not isinstance(features, list):
        raise HTTPException(422, "features must be a list of numbers or a list of lists of numbers")
    try:
        X = np.asarray(features, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise HTTPException(422, f"features must be numbers in rows of one length: {error}") from error
    if X.ndim not in (1, 2) or not np.isfinite(X).all():
        raise HTTPException(422, "features must be finite numbers, one row or a batch of rows")
    if X.shape[-1] != n_features:
        raise HTTPException(422, f"expected {n_features} features, got {X.shape[-1]}")
    return X


def prediction_app(predict_proba: PredictProba, n_features: int) -> FastAPI:
    """A FastAPI app with ``POST /predict`` and ``GET /health``."""
    app = FastAPI(title="prediction server")

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        X = read_features(await request.body(), n_features)
        probabilities = np.asarray(predict_proba(np.atleast_2d(X)), dtype=np.float64)
        if not np.isfinite(probabilities).all():
            raise ValueError("the model returned non-finite probabilities")
        answer = probabilities[0] if X.ndim == 1 else probabilities
        return Response(orjson.dumps({"probabilities": np.ascontiguousarray(answer)},
                                     option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    return app
