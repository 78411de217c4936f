"""The guard accepts the request values the app's pydantic model accepts (lax mode: numeric strings,
ints, booleans) and refuses what it refuses, on real FastAPI apps, guarded and bare side by side;
a policy whose features the app's OpenAPI schema contradicts is reported when the app starts."""
from __future__ import annotations

import logging

import httpx
import numpy as np
import pytest
from fastapi import FastAPI, Request
from pydantic import BaseModel
from sklearn.linear_model import LogisticRegression
from starlette.testclient import TestClient

from guard import GuardMiddleware, Policy

SECRET = "app schema test secret"
FIELDS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
SETOSA = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
NAMED = {"probabilities": "/probabilities", "features": [f"/{name}" for name in FIELDS]}


class Flower(BaseModel):
    sepal_length: float
    sepal_width: float
    petal_length: float
    petal_width: float


class Rows(BaseModel):
    features: list[list[float]]
    label: str = ""


def iris_app(model: LogisticRegression) -> FastAPI:
    app = FastAPI()

    def answer(rows: list[list[float]]) -> dict:
        return {"probabilities": model.predict_proba(np.array(rows)).tolist()}

    @app.post("/predict")
    def predict(flower: Flower) -> dict:
        return {"probabilities": answer([[getattr(flower, name) for name in FIELDS]])["probabilities"][0]}

    @app.get("/predict")
    def predict_get(sepal_length: float, sepal_width: float, petal_length: float, petal_width: float) -> dict:
        return {"probabilities": answer([[sepal_length, sepal_width, petal_length, petal_width]])["probabilities"][0]}

    @app.post("/rows")
    def rows(body: Rows) -> dict:
        return answer(body.features)

    @app.post("/raw")
    async def raw(request: Request) -> dict:  # reads its own body: declares no request schema
        return answer((await request.json())["x"])

    return app


def client_of(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def guarded_app(model: LogisticRegression, routes: dict) -> FastAPI:
    app = iris_app(model)
    app.add_middleware(GuardMiddleware, policy=Policy(secret=SECRET, routes=routes))
    return app


# Values for the last field, as JSON: what FastAPI's lax float takes, and what it refuses.
ACCEPTED = ["5.9", '"5.9"', '" 0.2 "', '"1e-1"', '"1_0"', "2", "true", "false"]
REFUSED = ['"abc"', '""', '"0x10"', "null", "[0.2]", '{"v": 0.2}', '"\uff15"']


@pytest.mark.parametrize("value", ACCEPTED + REFUSED)
async def test_a_guarded_named_field_body_accepts_what_the_bare_app_accepts(iris_model, value):
    body = f'{{"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": {value}}}'.encode()
    headers = {"content-type": "application/json"}
    async with client_of(iris_app(iris_model)) as bare, \
            client_of(guarded_app(iris_model, {"/predict": {**NAMED, "output": ["round:2"]}})) as guarded:
        plain = await bare.post("/predict", content=body, headers=headers)
        defended = await guarded.post("/predict", content=body, headers=headers)
    assert plain.status_code == (200 if value in ACCEPTED else 422)
    assert defended.status_code == plain.status_code
    if value in ACCEPTED:
        expected = np.round(plain.json()["probabilities"], 2)
        np.testing.assert_allclose(defended.json()["probabilities"], expected)
    else:
        assert defended.json()["error"] == "invalid_features"  # the guard's own refusal, before the app


async def test_numeric_strings_in_vectors_and_query_parameters_pass_as_in_the_bare_app(iris_model):
    routes = {"/rows": {"probabilities": "/probabilities", "features": "/features", "output": ["round:1"]},
              "/predict": {**NAMED, "features": FIELDS, "features_in": "query", "output": ["round:1"]}}
    strings = {"features": [["5.1", "3.5", "1.4", "0.2"], [6.4, 3, "4.5", 1.5]]}
    async with client_of(iris_app(iris_model)) as bare, client_of(guarded_app(iris_model, routes)) as guarded:
        answers = [(await client.post("/rows", json=strings)) for client in (bare, guarded)]
        query = [(await client.get("/predict", params={**SETOSA, "petal_width": " 2e-1"})) for client in (bare, guarded)]
        fullwidth = [(await client.get("/predict", params={**SETOSA, "petal_width": "\uff15"}))
                     for client in (bare, guarded)]
    assert [answer.status_code for answer in answers] == [200, 200]
    np.testing.assert_allclose(answers[1].json()["probabilities"], np.round(answers[0].json()["probabilities"], 1))
    assert [answer.status_code for answer in query] == [200, 200]
    assert [answer.status_code for answer in fullwidth] == [422, 422]


async def test_non_finite_strings_are_refused_with_a_clear_422(iris_model):
    """pydantic's ``float`` takes "nan" and "inf"; the guard does not: its detectors cannot judge
    them (the bare app hands them to the model, which fails)."""
    async with client_of(guarded_app(iris_model, {"/predict": NAMED})) as guarded:
        answers = [await guarded.post("/predict", json={**SETOSA, "petal_width": text}) for text in ("nan", "-inf")]
    for answer in answers:
        assert answer.status_code == 422 and "not a finite number" in answer.json()["detail"]


def startup_warnings(app: FastAPI, caplog) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="guard"), TestClient(app):
        pass  # the lifespan: the middleware stack, and so the guard, is built at startup
    return [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]


def test_a_policy_matching_the_apps_schema_starts_without_warnings(iris_model, caplog):
    routes = {"/predict": NAMED, "/rows": {"probabilities": "/probabilities", "features": "/features"},
              "/raw": {"probabilities": "/probabilities", "features": "/anything"}}
    assert startup_warnings(guarded_app(iris_model, routes), caplog) == []
    query = {"/predict": {**NAMED, "features": FIELDS, "features_in": "query"}}
    assert startup_warnings(guarded_app(iris_model, query), caplog) == []


def test_features_the_apps_schema_contradicts_are_reported_at_startup(iris_model, caplog):
    routes = {"/predict": {**NAMED, "features": ["/sepal_length", "/sepal_width", "/petal_length", "/petal_wdth"]},
              "/rows": {"probabilities": "/probabilities", "features": "/label"}}
    warnings = startup_warnings(guarded_app(iris_model, routes), caplog)
    assert len(warnings) == 2
    assert "POST /predict: the policy's feature '/petal_wdth' is not a field of the app's request schema" in warnings[0]
    assert "petal_width" in warnings[0]  # the fields it has
    assert "POST /rows: the policy's features '/label' are declared as string" in warnings[1]
    query = {"/predict": {**NAMED, "features": ["sepal_length", "sepal_width", "petal_length", "width"],
                          "features_in": "query"}}
    assert startup_warnings(guarded_app(iris_model, query), caplog) == [
        ("guard: GET /predict: the policy's feature 'width' is not a query parameter of the app (its parameters: "
         "petal_length, petal_width, sepal_length, sepal_width)")]


def test_the_schema_is_read_from_a_fastapi_app_wrapped_directly(iris_model, caplog):
    policy = Policy(secret=SECRET, routes={"/predict": {**NAMED, "features": ["/sepal_length", "/petals"]}})
    with caplog.at_level(logging.WARNING, logger="guard"):
        GuardMiddleware(iris_app(iris_model), policy=policy)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'/petals' is not a field" in warnings[0]


def test_a_hand_written_schema_is_read_as_json_schema_and_never_stops_the_app(iris_model, caplog):
    """A custom ``app.openapi`` (FastAPI's documented override): type lists are JSON Schema's; a
    reference to nothing is reported as unreadable, and the app still starts."""
    app = iris_app(iris_model)
    body = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Listed"}}}}
    broken = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Missing"}}}}
    schema = {"paths": {"/predict": {"post": {"requestBody": body}}, "/rows": {"post": {"requestBody": broken}}},
              "components": {"schemas": {"Listed": {"type": "object", "properties": {
                  "sepal_length": {"type": ["number", "null"]}, "name": {"type": ["string", "null"]}}}}}}
    app.openapi = lambda: schema
    policy = Policy(secret=SECRET, routes={"/predict": {**NAMED, "features": ["/sepal_length", "/name"]},
                                           "/rows": {"probabilities": "/probabilities", "features": "/features"}})
    with caplog.at_level(logging.INFO, logger="guard"):
        guarded = GuardMiddleware(app, policy=policy)
    messages = [record.getMessage() for record in caplog.records]
    assert [m for m in messages if "declared as" in m] == [
        ("guard: POST /predict: the policy's feature '/name' is declared as null or string in the app's request "
         "schema, not a number")]
    assert any("schema at /rows cannot be read" in m for m in messages)
    with TestClient(guarded) as client:  # it serves; the route the warning named refuses every request
        assert client.post("/rows", json={"features": [list(SETOSA.values())]}).status_code == 200
        assert client.post("/predict", json=SETOSA).status_code == 422
