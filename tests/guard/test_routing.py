"""Route matching on the path the app routes on: root paths, mounts, templates, WebSockets, and a
guard that refuses to start where its policy can be walked around."""
from __future__ import annotations

import subprocess
import sys

import httpx
import numpy as np
import pytest
from pydantic import ValidationError
from conftest import free_port, wait_until_serving
from fastapi import FastAPI, WebSocket
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from guard.serving import prediction_app
from guard import GuardMiddleware, Policy
from guard.routing import overlap, template_regex

SECRET = "routing test secret"
RAW = [0.61234, 0.28766, 0.1]
ROUNDED = [0.61, 0.29, 0.1]
ROUTE = {"probabilities": "/probabilities", "features": "/features", "output": ["round:2"]}


def model(X: np.ndarray) -> np.ndarray:
    return np.tile(RAW, (len(X), 1))


def policy(*paths: str, **route) -> Policy:
    return Policy(secret=SECRET, routes={path: {**ROUTE, **route} for path in paths})


async def post(app, path: str, root_path: str = "") -> httpx.Response:
    transport = httpx.ASGITransport(app=app, root_path=root_path)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.post(path, json={"features": [0.1, 0.2, 0.3]})


async def test_fastapi_root_path_is_guarded_under_both_paths():
    app = prediction_app(model, 3)
    app.root_path = "/api"
    app.add_middleware(GuardMiddleware, policy=policy("/predict"))
    for path in ("/api/predict", "/predict"):
        response = await post(app, path)
        assert response.status_code == 200 and response.json() == {"probabilities": ROUNDED}, path


async def test_a_proxy_stripping_the_root_path_cannot_double_it():
    app = prediction_app(model, 3)
    app.add_middleware(GuardMiddleware, policy=policy("/predict"))
    # Behind a proxy that strips /api the server names root_path /api and the full path.
    response = await post(app, "/api/predict", root_path="/api")
    assert response.json() == {"probabilities": ROUNDED}


async def test_a_guard_on_a_mounted_sub_app_guards_it():
    sub = prediction_app(model, 3)
    sub.add_middleware(GuardMiddleware, policy=policy("/predict"))
    app = FastAPI()
    app.mount("/v1", sub)
    response = await post(app, "/v1/predict")
    assert response.status_code == 200 and response.json() == {"probabilities": ROUNDED}


async def test_an_outer_guard_sees_mounted_routes_by_their_full_path():
    app = FastAPI()
    app.mount("/v1", prediction_app(model, 3))
    app.add_middleware(GuardMiddleware, policy=policy("/v1/predict"))
    assert (await post(app, "/v1/predict")).json() == {"probabilities": ROUNDED}


async def test_path_templates_guard_every_name():
    app = FastAPI()

    @app.post("/models/{name}/predict")
    async def predict(name: str) -> dict:
        return {"probabilities": RAW, "model": name}

    app.add_middleware(GuardMiddleware, policy=policy("/models/{name}/predict"))
    for name in ("a", "b-2"):
        assert (await post(app, f"/models/{name}/predict")).json() == {"probabilities": ROUNDED, "model": name}


def sub_mounted_app() -> FastAPI:
    app = FastAPI()
    app.mount("/v1", prediction_app(model, 3))
    return app


def aliased_app() -> FastAPI:
    app = prediction_app(model, 3)
    app.add_api_route("/v2/predict", next(r.endpoint for r in app.routes if r.path == "/predict"),
                      methods=["POST"])
    return app


@pytest.mark.parametrize("build, problem", [(sub_mounted_app, "matches no route"),
                                            (aliased_app, "unguarded, at '/v2/predict'")])
async def test_a_policy_that_can_be_walked_around_fails_closed(build, problem, caplog):
    app = build()
    app.add_middleware(GuardMiddleware, policy=policy("/predict"))
    for path in ("/v1/predict", "/v2/predict", "/predict", "/health"):
        response = await post(app, path)
        assert response.status_code == 500 and response.json()["error"] == "guard_misconfigured"
    assert any(problem in record.getMessage() for record in caplog.records)


def test_a_policy_that_can_be_walked_around_refuses_to_start():
    app = sub_mounted_app()
    app.add_middleware(GuardMiddleware, policy=policy("/predict"))
    with pytest.raises(RuntimeError, match="matches no route"), TestClient(app):
        pass


def websocket_app(allow: bool) -> FastAPI:
    app = prediction_app(model, 3)

    @app.websocket("/predict")
    async def stream(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_json({"probabilities": RAW})

    app.add_middleware(GuardMiddleware, policy=policy("/predict", allow_websocket=allow))
    return app


def test_websockets_on_guarded_routes_are_closed_with_1008():
    with TestClient(websocket_app(False)) as client, client.websocket_connect("/predict") as socket:
        with pytest.raises(WebSocketDisconnect) as closed:
            socket.receive_json()
    assert closed.value.code == 1008


def test_a_route_may_allow_websockets():
    with TestClient(websocket_app(True)) as client, client.websocket_connect("/predict") as socket:
        assert socket.receive_json() == {"probabilities": RAW}


ROOTED_APP = '''
import numpy as np
from guard.serving import prediction_app
from guard import GuardMiddleware, Policy

app = prediction_app(lambda X: np.tile([0.61234, 0.28766, 0.1], (len(X), 1)), 3)
app.add_middleware(GuardMiddleware, policy=Policy(secret="uvicorn root path secret", routes={
    "/predict": {"probabilities": "/probabilities", "features": "/features", "output": ["round:2"]}}))
'''


def test_uvicorn_root_path_is_guarded(tmp_path):
    (tmp_path / "rooted_app.py").write_text(ROOTED_APP)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "rooted_app:app", "--app-dir", str(tmp_path),
                               "--port", str(port), "--root-path", "/api", "--log-level", "warning"])
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(url, 60, server)
        # uvicorn prepends the root path: the app sees /api/predict with root_path /api.
        response = httpx.post(url + "/predict", json={"features": [0.1, 0.2, 0.3]}, timeout=5)
        assert response.json() == {"probabilities": ROUNDED}
    finally:
        server.terminate()
        server.wait(timeout=10)


MISROUTED_APP = '''
from fastapi import FastAPI
from guard.serving import prediction_app
from guard import GuardMiddleware, Policy

app = FastAPI()
app.mount("/v1", prediction_app(lambda X: X, 3))
app.add_middleware(GuardMiddleware, policy=Policy(secret="uvicorn root path secret", routes={
    "/predict": {"probabilities": "/probabilities", "features": "/features"}}))
'''


def test_uvicorn_refuses_to_start_a_policy_that_misses_a_mount(tmp_path):
    (tmp_path / "misrouted_app.py").write_text(MISROUTED_APP)
    server = subprocess.run([sys.executable, "-m", "uvicorn", "misrouted_app:app", "--app-dir", str(tmp_path),
                             "--port", str(free_port()), "--lifespan", "on"], capture_output=True, timeout=60)
    assert server.returncode != 0 and b"matches no route" in server.stderr


@pytest.mark.parametrize("first, second", [
    ("/models/{name}/predict", "/models/iris/predict"),
    ("/models/{name}/predict", "/models/{model}/predict"),
    ("/files/{rest:path}", "/files/{name}/meta"),
    ("/{a}/predict", "/models/{b}"),
    ("/items/{n:int}", "/items/{f:float}"),
    ("/runs/{run:uuid}", "/runs/{name}"),
])
def test_routes_that_can_match_the_same_path_are_refused_at_load(first, second):
    both = overlap(first, second)
    assert both is not None
    assert template_regex(first).match(both) and template_regex(second).match(both)
    with pytest.raises(ValidationError, match="both match"):
        policy(first, second)


@pytest.mark.parametrize("first, second", [
    ("/models/{name}/predict", "/models/{name}/explain"),
    ("/items/{n:int}", "/items/latest"),
    ("/items/{n:int}", "/items/1.5"),
    ("/{a}", "/{a}/{b}"),
    ("/runs/{run:uuid}", "/runs/0000"),
])
def test_disjoint_routes_load(first, second):
    assert overlap(first, second) is None
    assert set(policy(first, second).routes) == {first, second}


def test_an_ambiguous_policy_file_gets_a_one_line_error(tmp_path):
    from typer.testing import CliRunner

    from guard.cli import app

    path = tmp_path / "guard.toml"
    path.write_text('secret = "routing test secret"\n[routes."/models/{name}/predict"]\nprobabilities = "/p"\n'
                    '[routes."/models/iris/predict"]\nprobabilities = "/p"\n')
    result = CliRunner().invoke(app, ["proxy", "--upstream", "http://127.0.0.1:9", "--policy", str(path)])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "'/models/iris/predict'" in result.output
