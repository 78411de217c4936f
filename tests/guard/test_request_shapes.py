"""Request shapes and schema-keeping label-only answers on servers written the way tutorials write
them, guarded without changing their APIs: a pydantic body of named fields answering
``{"prediction": "setosa", "probabilities": {"setosa": 0.9, ...}}``, a GET endpoint with query
parameters, a batch of objects, a KServe-v2-style flat tensor, a CORS preflight, and a multi-model
server behind one path-template route."""
from __future__ import annotations

import httpx
import numpy as np
from fastapi import FastAPI, HTTPException
from fastapi.middleware.cors import CORSMiddleware
from pydantic import BaseModel
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.naive_bayes import GaussianNB

from guard import GuardMiddleware, Policy

SECRET = "request shapes test secret"
FIELDS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
SPECIES = ["setosa", "versicolor", "virginica"]
SETOSA = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}


class Flower(BaseModel):
    sepal_length: float
    sepal_width: float
    petal_length: float
    petal_width: float


class Prediction(BaseModel):
    prediction: str
    probabilities: dict[str, float]


class Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float]


class InferenceRequest(BaseModel):
    inputs: list[Tensor]


def iris_app(model: LogisticRegression) -> FastAPI:
    """The tutorial server: typed bodies in, typed answers out, as FastAPI's docs write them."""
    app = FastAPI()
    app.add_middleware(CORSMiddleware, allow_origins=["https://app.example"], allow_methods=["*"])

    def answer(rows: np.ndarray) -> list[Prediction]:
        return [Prediction(prediction=SPECIES[int(p.argmax())], probabilities=dict(zip(SPECIES, p.tolist())))
                for p in model.predict_proba(rows)]

    @app.post("/predict", response_model=Prediction)
    def predict(flower: Flower) -> Prediction:
        return answer(np.array([[getattr(flower, name) for name in FIELDS]]))[0]

    @app.get("/predict", response_model=Prediction)
    def predict_get(sepal_length: float, sepal_width: float, petal_length: float, petal_width: float) -> Prediction:
        return answer(np.array([[sepal_length, sepal_width, petal_length, petal_width]]))[0]

    @app.post("/batch", response_model=list[Prediction])
    def batch(flowers: list[Flower]) -> list[Prediction]:
        return answer(np.array([[getattr(f, name) for name in FIELDS] for f in flowers]))

    @app.post("/models/iris/predict", response_model=Prediction)
    def model_predict(flower: Flower) -> Prediction:
        return predict(flower)

    @app.post("/v2/models/iris/infer")
    def infer(request: InferenceRequest) -> dict:
        tensor = request.inputs[0]
        probabilities = model.predict_proba(np.array(tensor.data).reshape(tensor.shape))
        return {"model_name": "iris", "outputs": [{"name": "predict_proba", "shape": list(probabilities.shape),
                                                   "datatype": "FP64", "data": probabilities.ravel().tolist()}]}

    return app


NAMED = {"probabilities": "/probabilities", "features": [f"/{name}" for name in FIELDS]}


def guarded(model: LogisticRegression, routes: dict, **settings) -> httpx.AsyncClient:
    app = iris_app(model)
    app.add_middleware(GuardMiddleware, policy=Policy(secret=SECRET, routes=routes, **settings))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def raw(model: LogisticRegression, flower: dict) -> np.ndarray:
    return model.predict_proba(np.array([[flower[name] for name in FIELDS]]))[0]


async def test_named_field_body_is_defended_without_changing_the_api(iris_model):
    async with guarded(iris_model, {"/predict": {**NAMED, "output": ["round:1"]}}) as client:
        answer = (await client.post("/predict", json=SETOSA)).json()
        missing = await client.post("/predict", json={"sepal_length": 5.1})
        text = await client.post("/predict", json={**SETOSA, "petal_width": "wide"})
    Prediction.model_validate(answer)
    assert answer["prediction"] == "setosa"
    assert answer["probabilities"] == dict(zip(SPECIES, np.round(raw(iris_model, SETOSA), 1).tolist()))
    assert missing.status_code == 422 and "/sepal_width" in missing.json()["detail"]
    assert text.status_code == 422 and text.json()["error"] == "invalid_features"


async def test_label_only_can_keep_the_schema(iris_model):
    one_hot = {**NAMED, "output": ["label_only"], "label_only_as": "one_hot"}
    async with guarded(iris_model, {"/predict": one_hot, "/batch": {**NAMED, "output": ["label_only"]}}) as client:
        answer = (await client.post("/predict", json=SETOSA)).json()
        schema = (await client.get("/openapi.json")).json()["components"]["schemas"]["Prediction"]
    Prediction.model_validate(answer)
    assert answer["probabilities"] == {"setosa": 1.0, "versicolor": 0.0, "virginica": 0.0}
    assert schema["properties"]["probabilities"]["type"] == "object"


async def test_batches_of_objects_and_bare_labels(iris_model):
    versicolor = {"sepal_length": 6.4, "sepal_width": 3.2, "petal_length": 4.5, "petal_width": 1.5}
    route = {"probabilities": {"rows": "", "field": "/probabilities"},
             "features": {"rows": "", "fields": NAMED["features"]},
             "output": ["label_only"], "rate_limits": ["3/minute"]}
    async with guarded(iris_model, {"/batch": route}) as client:
        first = await client.post("/batch", json=[SETOSA, versicolor])
        over = await client.post("/batch", json=[SETOSA, versicolor])
    assert [answer["probabilities"] for answer in first.json()] == ["setosa", "versicolor"]
    assert [answer["prediction"] for answer in first.json()] == ["setosa", "versicolor"]
    assert over.status_code == 429  # a request of two rows costs two queries


async def test_get_with_query_parameters_and_cors_preflight(iris_model):
    route = {**NAMED, "features": FIELDS, "features_in": "query", "output": ["top_k:1"]}
    preflight_headers = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    async with guarded(iris_model, {"/predict": {**route, "free_methods": ["OPTIONS"]}}) as client:
        answer = (await client.get("/predict", params=SETOSA)).json()
        missing = await client.get("/predict", params={"sepal_length": 5.1})
        preflight = await client.options("/predict", headers=preflight_headers)
    async with guarded(iris_model, {"/predict": route}) as client:
        guarded_preflight = await client.options("/predict", headers=preflight_headers)
    assert answer["probabilities"] == {"setosa": 1.0, "versicolor": 0.0, "virginica": 0.0}
    assert missing.status_code == 422 and "sepal_width" in missing.json()["detail"]
    assert preflight.status_code == 200  # the policy lists OPTIONS as free: the app answers it
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    assert guarded_preflight.status_code == 422  # not free: guarded like any method, features required


async def test_a_route_without_features_still_rounds(iris_model):
    async with guarded(iris_model, {"/predict": {"probabilities": "/probabilities", "output": ["round:1"]}}) as client:
        answer = (await client.post("/predict", json=SETOSA)).json()
        bad = await client.post("/predict", content=b"not json")
    assert answer["probabilities"] == dict(zip(SPECIES, np.round(raw(iris_model, SETOSA), 1).tolist()))
    assert bad.status_code == 422  # the app's own answer: it carries no probabilities


def flower_from_body(document, query):
    """A user's feature function: the named fields of the body's ``flower`` member."""
    return [document["flower"][name] for name in FIELDS]


async def test_a_user_function_reads_the_features(iris_model):
    app = FastAPI()

    @app.post("/predict")
    def predict(body: dict) -> dict:
        row = np.array([[body["flower"][name] for name in FIELDS]])
        return {"probabilities": iris_model.predict_proba(row)[0].tolist()}

    route = {"probabilities": "/probabilities", "features_function": flower_from_body,
             "rate_limits": ["1/minute"]}
    app.add_middleware(GuardMiddleware, policy=Policy(secret=SECRET, routes={"/predict": route}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        broken = await client.post("/predict", json={"plant": SETOSA})
        answer = await client.post("/predict", json={"flower": SETOSA})
        over = await client.post("/predict", json={"flower": SETOSA})
    assert broken.status_code == 422 and "KeyError" in broken.json()["detail"]
    assert answer.status_code == 200 and over.status_code == 429


async def test_flat_v2_tensors_keep_their_layout(iris_model):
    route = {"probabilities": "/outputs/0/data", "probabilities_flat": True, "labels": SPECIES,
             "features": "/inputs/0/data", "features_width": 4, "output": ["label_only"],
             "label_only_as": "one_hot", "rate_limits": ["3/minute"]}
    rows = [list(SETOSA.values()), [6.4, 3.2, 4.5, 1.5]]
    body = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP64", "data": sum(rows, [])}]}
    async with guarded(iris_model, {"/v2/models/iris/infer": route}) as client:
        answer = (await client.post("/v2/models/iris/infer", json=body)).json()
        over = await client.post("/v2/models/iris/infer", json=body)
    assert answer["outputs"][0]["shape"] == [2, 3]
    assert answer["outputs"][0]["data"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert over.status_code == 429  # two rows per request: two queries each


def multi_model_app(models: dict) -> FastAPI:
    """A tutorial-style multi-model server: ``/models/{name}/predict`` serves whichever model of
    ``models`` is named (models may be added while it runs), with a pydantic body of named fields."""
    app = FastAPI()

    @app.post("/models/{name}/predict", response_model=Prediction)
    def predict(name: str, flower: Flower) -> Prediction:
        if name not in models:
            raise HTTPException(404, f"no model {name!r}")
        p = models[name].predict_proba(np.array([[getattr(flower, field) for field in FIELDS]]))[0]
        return Prediction(prediction=SPECIES[int(p.argmax())], probabilities=dict(zip(SPECIES, p.tolist())))

    return app


class Counting:
    """A model that counts the rows it was asked about."""

    def __init__(self, model) -> None:
        self.model, self.rows = model, 0

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        self.rows += len(X)
        return self.model.predict_proba(X)


BORDERLINE = {"sepal_length": 6.0, "sepal_width": 2.9, "petal_length": 4.8, "petal_width": 1.6}


async def test_one_template_route_guards_every_model_of_a_multi_model_server(iris_model):
    iris = load_iris()
    models = {"logistic": Counting(iris_model), "bayes": Counting(GaussianNB().fit(iris.data, iris.target))}
    app = multi_model_app(models)
    route = {**NAMED, "output": ["round:1"]}
    app.add_middleware(GuardMiddleware, policy=Policy(secret=SECRET, routes={"/models/{name}/predict": route}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        answers = {name: (await client.post(f"/models/{name}/predict", json=BORDERLINE)).json() for name in models}
        models["later"] = Counting(LogisticRegression(C=0.05, max_iter=500).fit(iris.data, iris.target))
        later = (await client.post("/models/later/predict", json=BORDERLINE)).json()
        bad = await client.post("/models/bayes/predict", json={**SETOSA, "petal_width": "wide"})
        missing = await client.post("/models/bayes/predict", json={"sepal_length": 5.1})
    for name, answer in {**answers, "later": later}.items():
        Prediction.model_validate(answer)
        raw = models[name].model.predict_proba(np.array([list(BORDERLINE.values())]))[0]
        assert answer["probabilities"] == dict(zip(SPECIES, np.round(raw, 1).tolist())), name
        assert not np.allclose(raw, np.round(raw, 1)), name  # the rounding is visible
    assert bad.status_code == missing.status_code == 422
    assert bad.json()["error"] == missing.json()["error"] == "invalid_features"
    assert models["bayes"].rows == 1  # the bad bodies never reached the model
