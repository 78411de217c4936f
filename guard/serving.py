"""A plain FastAPI prediction server around any ``predict_proba`` callable: the kind of app a
user puts ``GuardMiddleware`` in front of.

Request: ``{"features": [x1, ..., xd]}`` or a batch ``{"features": [[...], ...]}``.
Response: ``{"probabilities": [p1, ..., pk]}`` or ``{"probabilities": [[...], ...]}``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

PredictProba = Callable[[np.ndarray], np.ndarray]


class PredictRequest(BaseModel):
    features: list[float] | list[list[float]]


def prediction_app(predict_proba: PredictProba, n_features: int) -> FastAPI:
    """A FastAPI app with ``POST /predict`` and ``GET /health``."""
    app = FastAPI(title="prediction server")

    @app.post("/predict")
    def predict(request: PredictRequest) -> dict:
        X = np.asarray(request.features, dtype=np.float64)
        single = X.ndim == 1
        X = np.atleast_2d(X)
        if X.shape[1] != n_features:
            raise HTTPException(422, f"expected {n_features} features, got {X.shape[1]}")
        probabilities = predict_proba(X)
        return {"probabilities": (probabilities[0] if single else probabilities).tolist()}

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    return app
