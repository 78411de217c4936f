"""Fuzzing the guarded answers (hypothesis): whatever the app answers on a guarded route, 2xx or not,
well-formed, truncated, with NaN, nested deep or mislabelled, no raw probability value reaches the
client."""
from __future__ import annotations

import asyncio

import httpx
import numpy as np
import orjson
from fastapi import FastAPI
from fastapi.responses import Response
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from guard import GuardMiddleware, Policy

ANSWER: dict = {}  # the canned answer of the current example


def build_app(output: list[str]) -> FastAPI:
    app = FastAPI()

    @app.post("/predict")
    async def predict() -> Response:
        return Response(ANSWER["body"], status_code=ANSWER["status"], media_type="application/json")

    app.add_middleware(GuardMiddleware, policy=Policy(secret="fuzz test secret 0123", routes={"/predict": {
        "probabilities": "/out/probabilities", "features": "/features", "output": output}}))
    return app


APPS = {"round:2": build_app(["round:2"]), "label_only": build_app(["top_k:2", "label_only"])}

rows = st.integers(2, 6).flatmap(lambda k: st.lists(
    st.lists(st.floats(0.01, 1.0), min_size=k, max_size=k), min_size=1, max_size=3))
extras = st.dictionaries(st.text("abcxyz_", min_size=1, max_size=5),
                         st.one_of(st.text("abc XYZ", max_size=8), st.booleans(), st.none()), max_size=3)
mutations = st.sampled_from(["none", "truncate", "nan", "deep", "labels", "strings", "extra_row"])


def raw_body(probabilities: list[list[float]], single: bool, extra: dict, mutation: str, cut: float) -> bytes:
    value: object = probabilities[0] if single else probabilities
    if mutation == "labels":
        value = [{f"class{i}": p for i, p in enumerate(row)} for row in probabilities]
    elif mutation == "strings":
        value = [[repr(p) for p in row] for row in probabilities]
    elif mutation == "extra_row":
        value = probabilities + probabilities[:1]
    body = orjson.dumps({"out": {"probabilities": value, **extra}, "model": "v1"})
    if mutation == "truncate":
        body = body[: max(1, int(len(body) * cut))]
    elif mutation == "nan":
        body = body[:-1] + b', "loss": NaN}'
    elif mutation == "deep":
        body = body[:-1] + b', "deep": ' + b"[" * 300 + b"]" * 300 + b"}"
    return body


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=rows, single=st.booleans(), extra=extras, mutation=mutations, cut=st.floats(0.05, 0.95),
       status=st.sampled_from([200, 201, 400, 404, 422, 500, 503]), output=st.sampled_from(sorted(APPS)))
def test_no_raw_probability_reaches_the_client(rows, single, extra, mutation, cut, status, output):
    probabilities = (np.array(rows) / np.array(rows).sum(axis=1, keepdims=True)).tolist()
    raw_values = {repr(p) for row in probabilities for p in row}
    assume(all(len(text) > 6 for text in raw_values))  # values a defended answer cannot show by chance
    ANSWER.update(body=raw_body(probabilities, single, extra, mutation, cut), status=status)
    features = [[0.5, 0.25]] * (1 if single else len(probabilities))
    response = asyncio.run(post(APPS[output], {"features": features[0] if single else features}))
    text = response.text
    leaked = [value for value in raw_values if value in text or value[:8] in text]
    assert not leaked, (mutation, status, text[:200])
    assert response.status_code in (status, 502, 500)


async def post(app: FastAPI, body: dict) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        return await client.post("/predict", json=body)
