"""``guard proxy``: the reverse proxy behind GuardMiddleware, against real servers on real sockets:
a small FastAPI upstream under uvicorn, and MLServer (KServe v2) serving a scikit-learn model."""
from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from guard import GuardMiddleware, Policy
from guard.proxy import UpstreamProxy
from conftest import free_port, served_in_thread

SECRET = "proxy test secret value"
RAW = [0.61234, 0.28766, 0.1]


def upstream_app() -> FastAPI:
    app = FastAPI()

    @app.post("/predict")
    async def predict(request: Request) -> dict:
        body = await request.json()
        return {"probabilities": RAW, "echo": {"query": request.url.query, "body": body,
                                               "key": request.headers.get("x-api-key"),
                                               "forwarded": request.headers.get("x-forwarded-for")}}

    @app.get("/stream")
    def stream() -> StreamingResponse:
        return StreamingResponse((f"part {i}\n" for i in range(3)), media_type="text/plain")

    @app.post("/slow")
    async def slow() -> dict:
        await asyncio.sleep(2)
        return {"probabilities": RAW}

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    return app


@pytest.fixture(scope="module")
def upstream() -> str:
    """The upstream under uvicorn in a thread, on a free port."""
    with served_in_thread(upstream_app()) as port:
        yield f"http://127.0.0.1:{port}"


def guarded_proxy(upstream: str, routes: dict, **options) -> httpx.AsyncClient:
    app = GuardMiddleware(UpstreamProxy(upstream, **options), policy=Policy(secret=SECRET, routes=routes))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("10.1.2.3", 5555)),
                             base_url="http://proxy")


ROUTE = {"probabilities": "/probabilities", "features": "/features", "output": ["round:1"]}


async def test_the_proxy_forwards_and_the_guard_defends(upstream):
    async with guarded_proxy(upstream, {"/predict": ROUTE}) as client:
        answer = await client.post("/predict?version=2", json={"features": [1, 2]},
                                   headers={"X-API-Key": "k1"})
        streamed = await client.get("/stream")
        missing = await client.get("/nothing")
    assert answer.status_code == 200
    assert answer.json() == {"probabilities": [0.6, 0.3, 0.1],
                             "echo": {"query": "version=2", "body": {"features": [1, 2]}, "key": "k1",
                                      "forwarded": "10.1.2.3"}}
    assert streamed.text == "part 0\npart 1\npart 2\n"
    assert missing.status_code == 404


async def test_upstream_failures_fail_closed(upstream):
    async with guarded_proxy(upstream, {"/slow": ROUTE}, timeout=0.3) as client:
        late = await client.post("/slow", json={"features": [1]})
    async with guarded_proxy(f"http://127.0.0.1:{free_port()}", {"/predict": ROUTE}) as client:
        down = await client.post("/predict", json={"features": [1]})
    assert late.status_code == 504 and late.json()["error"] == "upstream_timeout"
    assert down.status_code == 502 and down.json()["error"] == "upstream_unavailable"
    assert "0.6" not in late.text + down.text


def test_bad_upstreams_are_refused():
    with pytest.raises(ValueError, match="http"):
        UpstreamProxy("ftp://model-server")


# MLServer: KServe v2 over HTTP, serving a scikit-learn model the test saves.
IRIS_ROUTE = {"probabilities": "/outputs/0/data", "probabilities_flat": True,
              "labels": ["setosa", "versicolor", "virginica"],
              "features_function": "guard.payload:kserve_v2_inputs", "output": ["round:2"]}
PATH = "/v2/models/iris/infer"


def v2_request(rows: list[list[float]], outputs: tuple[str, ...] = ("predict_proba",)) -> dict:
    return {"inputs": [{"name": "input-0", "shape": [len(rows), len(rows[0])], "datatype": "FP64",
                        "data": sum(rows, [])}],
            "outputs": [{"name": name} for name in outputs]}


ROWS = [[5.1, 3.5, 1.4, 0.2], [6.4, 3.2, 4.5, 1.5]]


async def test_mlserver_is_guarded_without_changing_its_api(mlserver):
    url, model = mlserver
    bare = httpx.post(url + PATH, json=v2_request(ROWS)).json()
    one_hot = {**IRIS_ROUTE, "output": ["label_only"], "label_only_as": "one_hot"}
    async with guarded_proxy(url, {PATH: IRIS_ROUTE}) as client:
        rounded = (await client.post(PATH, json=v2_request(ROWS))).json()
        sneaky = await client.post(PATH, json=v2_request(ROWS, ("predict", "predict_proba")))
        labels = (await client.post(PATH, json=v2_request(ROWS, ("predict",))))
        ready = await client.get("/v2/models/iris/ready")
    async with guarded_proxy(url, {PATH: one_hot}) as client:
        hot = (await client.post(PATH, json=v2_request(ROWS))).json()
    expected = model.predict_proba(np.array(ROWS))
    assert np.allclose(np.reshape(bare["outputs"][0]["data"], (2, 3)), expected)
    assert rounded["outputs"][0]["data"] == np.round(expected, 2).ravel().tolist()
    assert rounded["model_name"] == bare["model_name"] == "iris"
    assert rounded["outputs"][0]["shape"] == [2, 3] and rounded["outputs"][0]["datatype"] == "FP64"
    assert sneaky.status_code == 422  # a second output would carry raw probabilities past the guard
    assert labels.status_code == 502  # predicted labels are not probabilities: fail closed
    assert ready.status_code == 200
    assert hot["outputs"][0]["data"] == np.eye(3)[expected.argmax(axis=1)].ravel().tolist()


def test_guard_proxy_refuses_bad_settings_with_a_clear_message(tmp_path):
    from typer.testing import CliRunner

    from guard.cli import app

    policy = tmp_path / "guard.toml"
    policy.write_text('secret = "a proxy secret value"\n[routes."/predict"]\nprobabilities = "/p"\n')
    for upstream, path, message in [("ftp://model", policy, "must be an http(s) URL"),
                                    ("http://127.0.0.1:9", tmp_path / "none.toml", "none.toml")]:
        result = CliRunner().invoke(app, ["proxy", "--upstream", upstream, "--policy", str(path)])
        assert result.exit_code == 2 and message in result.output
