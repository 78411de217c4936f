"""GuardMiddleware on the wire: real FastAPI apps through httpx's ASGI transport."""
from __future__ import annotations

import gzip
import json
import logging
import re
import zlib

import httpx
import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.middleware.gzip import GZipMiddleware

from guard.serving import prediction_app
from guard import GuardMiddleware, Policy
from guard.outputs import Round

SECRET = "middleware test secret"
RAW = [0.61234, 0.28766, 0.1]
ROUNDED = [0.61, 0.29, 0.1]
FEATURES = {"features": [0.1, 0.2, 0.3]}

# Canned answers of /raw (chosen by the request's "kind"): each must fail closed.
UNGUARDABLE = {
    "text": b"0.61234 0.28766 0.1",
    "empty": b"",
    "missing": b'{"scores": [0.61234, 0.28766, 0.1]}',
    "nan": b'{"probabilities": [NaN, 0.61234, 0.1]}',
    "infinite": b'{"probabilities": [1e999, 0.61234, 0.1]}',
    "negative": b'{"probabilities": [0.71234, -0.01, 0.29876]}',
    "not_summing": b'{"probabilities": [0.61234, 0.61234, 0.1]}',
    "shape": b'{"probabilities": [[[0.61234, 0.28766, 0.1]]]}',
    "strings": b'{"probabilities": ["0.61234", "0.28766", "0.1"]}',
    "too_many_rows": b'{"probabilities": [[0.61234, 0.28766, 0.1], [0.61234, 0.28766, 0.1]]}',
}


# Error answers (status 400) the guard cannot read: each must fail closed, not pass through.
UNREADABLE_ERRORS = {
    "nan_elsewhere": b'{"probabilities": [0.61234, 0.28766, 0.1], "loss": NaN}',
    "too_deep": b'{"probabilities": [0.61234, 0.28766, 0.1], "x": ' + b"[" * 2000 + b"]" * 2000 + b"}",
    "truncated": b'{"probabilities": [0.61234, 0.28',
    "text": b"failed: 0.61234 0.28766 0.1",
}


class Model:
    """A fixed classifier that counts how often it is called."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, X: np.ndarray) -> np.ndarray:
        self.calls += 1
        return np.tile(RAW, (len(X), 1))


def build_app(model: Model) -> FastAPI:
    app = prediction_app(model, n_features=3)

    @app.post("/labels")
    async def labels(request: Request) -> dict:
        X = (await request.json())["features"]
        scores = [{"cat": RAW[0], "dog": RAW[1], "eel": RAW[2]} for _ in np.atleast_2d(X)]
        return {"result": {"scores": scores if isinstance(X[0], list) else scores[0]}, "model": "v1"}

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"probabilities": RAW, "echo": (await request.body()).decode()}

    @app.post("/stream")
    async def stream() -> StreamingResponse:
        body = json.dumps({"probabilities": RAW, "pad": "x" * 100}).encode()
        return StreamingResponse((body[i:i + 7] for i in range(0, len(body), 7)), media_type="application/json")

    @app.post("/encoded/{coding}")
    async def encoded(coding: str) -> Response:
        body = json.dumps({"probabilities": RAW}).encode()
        packed = {"gzip": gzip.compress, "deflate": zlib.compress, "br": lambda b: b}[coding](body)
        return Response(packed, media_type="application/json", headers={"Content-Encoding": coding})

    @app.post("/raw")
    async def raw(request: Request) -> Response:
        kind = (await request.json())["kind"]
        return Response(UNGUARDABLE[kind], media_type="application/json")

    @app.post("/status/{code}")
    async def status(code: int) -> JSONResponse:
        content = {"detail": "model unavailable"} if code == 503 else {"probabilities": RAW}
        return JSONResponse(content, status_code=code)

    @app.post("/error/{kind}")
    async def error(kind: str) -> Response:
        body = UNREADABLE_ERRORS.get(kind, b"Bad Request")
        return Response(body, status_code=400, media_type="application/json")

    @app.post("/etag")
    async def etag() -> JSONResponse:
        return JSONResponse({"probabilities": RAW}, headers={"ETag": '"raw-answer-hash"'})

    @app.post("/boom")
    async def boom() -> None:
        raise RuntimeError("model crashed: 0.61234")

    @app.post("/boom-late")
    async def boom_late() -> StreamingResponse:
        def chunks():
            yield b'{"probabilities": [0.61234, '
            raise RuntimeError("model crashed mid-stream")
        return StreamingResponse(chunks(), media_type="application/json")

    @app.post("/unguarded")
    async def unguarded() -> dict:
        return {"probabilities": RAW}

    return app


GUARDED = ["/predict", "/error/{kind}", "/echo", "/stream", "/raw", "/status/200", "/status/422", "/status/500", "/status/503",
           "/etag", "/boom", "/boom-late", "/encoded/gzip", "/encoded/deflate", "/encoded/br"]


def guarded_app(model: Model, output: list[str] | None = None, **policy) -> FastAPI:
    route = {"probabilities": "/probabilities", "features": "/features", "output": output or ["round:2"]}
    routes = {path: route for path in GUARDED}
    routes["/labels"] = {**route, "probabilities": "/result/scores"}
    app = build_app(model)
    app.add_middleware(GuardMiddleware, policy=Policy(secret=SECRET, routes=routes, **policy))
    return app


async def post(app: FastAPI, path: str, body: object = FEATURES, **kwargs) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post(path, json=body, **kwargs) if "content" not in kwargs else \
            await client.post(path, **kwargs)
    if "content-length" in response.headers:
        assert int(response.headers["content-length"]) == response.num_bytes_downloaded
    return response


@pytest.fixture
def model() -> Model:
    return Model()


async def test_unguarded_routes_are_byte_identical(model):
    bare, guarded = build_app(Model()), guarded_app(model)
    for path in ("/unguarded", "/docs"):
        expected, actual = await post(bare, path), await post(guarded, path)
        assert actual.content == expected.content and actual.headers == expected.headers
        assert actual.status_code == expected.status_code
    assert (await post(guarded, "/unguarded")).json() == {"probabilities": RAW}


async def test_round_on_the_wire_single_and_batch(model):
    app = guarded_app(model)
    response = await post(app, "/predict")
    assert response.status_code == 200 and response.json() == {"probabilities": ROUNDED}
    batch = await post(app, "/predict", {"features": [[0.1, 0.2, 0.3]] * 2})
    assert batch.json() == {"probabilities": [ROUNDED, ROUNDED]}


async def test_label_probability_objects_and_other_fields_are_kept(model):
    response = await post(guarded_app(model), "/labels")
    assert response.json() == {"result": {"scores": {"cat": 0.61, "dog": 0.29, "eel": 0.1}}, "model": "v1"}


@pytest.mark.parametrize("path, body, expected", [
    ("/predict", FEATURES, {"probabilities": 0}),
    ("/predict", {"features": [[0.1, 0.2, 0.3]] * 2}, {"probabilities": [0, 0]}),
    ("/labels", FEATURES, {"result": {"scores": "cat"}, "model": "v1"}),
    ("/labels", {"features": [[0.1, 0.2, 0.3]] * 2}, {"result": {"scores": ["cat", "cat"]}, "model": "v1"}),
])
async def test_label_only_leaves_no_confidence_on_the_wire(model, path, body, expected):
    response = await post(guarded_app(model, ["label_only"]), path, body)
    assert response.json() == expected
    assert not re.search(rb"\d\.\d", response.content)


@pytest.mark.parametrize("output", [["top_k:1"], ["reverse_sigmoid:0.5:2", "round:3"]])
async def test_other_defences_are_applied_on_the_wire(model, output):
    from guard.outputs import Pipeline

    served = (await post(guarded_app(model, output), "/predict")).json()["probabilities"]
    expected = Pipeline.from_specs(output)(np.array([RAW]))[0]
    np.testing.assert_allclose(served, expected)
    assert served != RAW


async def test_noise_on_the_wire_is_repeatable_per_query(model):
    app = guarded_app(model, ["noise:0.5"])
    first, again = (await post(app, "/predict")).json(), (await post(app, "/predict")).json()
    other = (await post(app, "/predict", {"features": [0.1, 0.2, 0.4]})).json()
    assert first == again and first != other and first["probabilities"] != RAW
    assert np.argmax(first["probabilities"]) == 0


async def test_averaging_queries_perturbed_below_float32_gains_nothing(model):
    app = guarded_app(model, ["noise:0.5"])
    answers = np.array([(await post(app, "/predict", {"features": [0.1 + k * 1e-12, 0.2, 0.3]})).json()
                        ["probabilities"] for k in range(30)])
    single_error = np.abs(answers[0] - RAW).mean()
    averaged_error = np.abs(answers.mean(axis=0) - RAW).mean()
    assert single_error > 0.01 and averaged_error == pytest.approx(single_error)


async def test_streamed_responses_are_buffered_and_rewritten(model):
    response = await post(guarded_app(model), "/stream")
    assert response.json() == {"probabilities": ROUNDED, "pad": "x" * 100}


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
async def test_compressed_app_responses_are_decoded_and_sent_plain(model, coding):
    response = await post(guarded_app(model), f"/encoded/{coding}")
    assert response.json() == {"probabilities": ROUNDED}
    assert "content-encoding" not in response.headers


async def test_gzip_added_after_the_guard_compresses_the_defended_body(model):
    app = guarded_app(model)
    app.add_middleware(GZipMiddleware, minimum_size=1)
    response = await post(app, "/stream", headers={"Accept-Encoding": "gzip"})
    assert response.headers["content-encoding"] == "gzip"
    assert response.json() == {"probabilities": ROUNDED, "pad": "x" * 100}
    assert response.num_bytes_downloaded < len(response.content)


async def test_gzip_added_before_the_guard_is_decoded_and_defended(model):
    app = build_app(model)
    app.add_middleware(GZipMiddleware, minimum_size=1)
    app.add_middleware(GuardMiddleware, policy=Policy(secret=SECRET, routes={"/stream": {
        "probabilities": "/probabilities", "features": "/features", "output": ["round:2"]}}))
    response = await post(app, "/stream", headers={"Accept-Encoding": "gzip"})
    assert response.json() == {"probabilities": ROUNDED, "pad": "x" * 100}
    assert "content-encoding" not in response.headers


async def test_the_request_body_reaches_the_app_unchanged(model):
    body = b'{"features": [0.1, 0.2, 0.3], "note": "spacing  kept"}'
    response = await post(guarded_app(model), "/echo", content=body)
    assert response.json() == {"probabilities": ROUNDED, "echo": body.decode()}


async def test_headers_describing_the_raw_answer_are_dropped(model):
    response = await post(guarded_app(model), "/etag")
    assert response.json() == {"probabilities": ROUNDED} and "etag" not in response.headers


async def test_error_responses_without_probabilities_pass_through(model):
    bare, guarded = build_app(Model()), guarded_app(model)
    for path, body in (("/status/503", FEATURES), ("/predict", {"features": [1.0, 2.0]})):
        expected, actual = await post(bare, path, body), await post(guarded, path, body)
        assert actual.status_code == expected.status_code and actual.content == expected.content


@pytest.mark.parametrize("kind", sorted(UNREADABLE_ERRORS))
async def test_unreadable_error_responses_fail_closed(model, kind, caplog):
    assert_fails_closed(await post(guarded_app(model), f"/error/{kind}"), 502, caplog)


async def test_plain_error_text_without_numbers_passes(model):
    response = await post(guarded_app(model), "/error/plain")
    assert response.status_code == 400 and response.content == b"Bad Request"


@pytest.mark.parametrize("code", [422, 500])
async def test_error_responses_with_probabilities_are_defended(model, code):
    response = await post(guarded_app(model), f"/status/{code}")
    assert response.status_code == code and response.json() == {"probabilities": ROUNDED}


def assert_fails_closed(response: httpx.Response, status: int, caplog) -> None:
    assert response.status_code == status
    assert set(response.json()) == {"error", "detail"}
    assert b"0.61234" not in response.content and b"0.28766" not in response.content
    assert any(record.name == "guard" and record.levelno >= logging.ERROR for record in caplog.records)


@pytest.mark.parametrize("kind", sorted(UNGUARDABLE))
async def test_unguardable_responses_fail_closed(model, kind, caplog):
    response = await post(guarded_app(model), "/raw", {**FEATURES, "kind": kind})
    assert_fails_closed(response, 502, caplog)


async def test_unknown_content_encoding_fails_closed(model, caplog):
    assert_fails_closed(await post(guarded_app(model), "/encoded/br"), 502, caplog)


@pytest.mark.parametrize("path", ["/boom", "/boom-late"])
async def test_an_app_that_raises_gives_a_json_500(model, path, caplog):
    assert_fails_closed(await post(guarded_app(model), path), 500, caplog)


async def test_an_exception_inside_the_guard_fails_closed(model, caplog, monkeypatch):
    def explode(self, probabilities, features=None):
        raise ArithmeticError("defence bug")

    monkeypatch.setattr(Round, "__call__", explode)
    assert_fails_closed(await post(guarded_app(model), "/predict"), 500, caplog)


@pytest.mark.parametrize("content, status, error", [
    (b"{not json", 400, "invalid_json"),
    (b'{"inputs": [0.1, 0.2, 0.3]}', 422, "invalid_features"),
    (b'{"features": [0.1, "x", 0.3]}', 422, "invalid_features"),
    (b'{"features": [[0.1, 0.2], [0.3]]}', 422, "invalid_features"),
    (b'{"features": []}', 422, "invalid_features"),
    # No finiteness check of JSON features: the parser itself refuses what is not a finite float64.
    (b'{"features": [0.1, NaN, 0.3]}', 400, "invalid_json"),
    (b'{"features": [0.1, Infinity, 0.3]}', 400, "invalid_json"),
    (b'{"features": [0.1, 1e999, 0.3]}', 400, "invalid_json"),
    (b'{"features": [0.1, -' + b"9" * 400 + b', 0.3]}', 400, "invalid_json"),
])
async def test_malformed_requests_never_reach_the_model(model, content, status, error):
    response = await post(guarded_app(model), "/predict", content=content,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == status and response.json()["error"] == error
    assert model.calls == 0


async def test_oversized_bodies_are_refused_by_length_and_while_streaming(model):
    app = guarded_app(model, max_body_bytes=100)
    body = json.dumps({"features": [0.123456789] * 20}).encode()

    async def chunks():
        for i in range(0, len(body), 16):
            yield body[i:i + 16]

    for content in (body, chunks()):
        response = await post(app, "/predict", content=content, headers={"Content-Type": "application/json"})
        assert response.status_code == 413 and response.json()["error"] == "body_too_large"
    assert model.calls == 0
    assert (await post(app, "/predict")).status_code == 200 and model.calls == 1


async def test_non_http_scopes_pass_through(model):
    seen = []

    async def app(scope, receive, send):
        seen.append(scope["type"])

    guard = GuardMiddleware(app, Policy(secret=SECRET, routes={"/predict": {
        "probabilities": "/probabilities", "features": "/features"}}))
    await guard({"type": "lifespan"}, None, None)
    assert seen == ["lifespan"]


@pytest.mark.parametrize("free", [[], ["OPTIONS"]])
async def test_every_method_of_a_guarded_route_is_defended_unless_listed_free(free):
    """An endpoint that answers OPTIONS, HEAD and unknown methods with probabilities: each answer
    is defended; a HEAD answer tells nothing of the raw one's length; a method the policy lists as
    free is the app's own (its answer passes as it is)."""
    app = FastAPI()

    @app.api_route("/predict", methods=["POST", "OPTIONS", "HEAD", "PROPFIND"])
    async def predict() -> dict:
        return {"probabilities": RAW}

    policy = Policy(routes={"/predict": {"probabilities": "/probabilities", "output": ["round:2"],
                                         "free_methods": free}})
    app.add_middleware(GuardMiddleware, policy=policy)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g") as client:
        answers = {method: await client.request(method, "/predict", json={"features": [1]})
                   for method in ("POST", "OPTIONS", "PROPFIND", "HEAD")}
    assert answers["POST"].json() == answers["PROPFIND"].json() == {"probabilities": ROUNDED}
    assert answers["OPTIONS"].json() == {"probabilities": RAW if free else ROUNDED}
    assert answers["HEAD"].status_code == 200 and answers["HEAD"].content == b""
    # The app sent a HEAD body (the server drops it): defended, so a length names the defended body.
    assert answers["HEAD"].headers.get("content-length") in (None, str(len(answers["POST"].content)))
