"""The canonical request target (``guard.target``): RFC 3986 dot-segment removal, percent-decoding
as uvicorn decodes, refusals, and the in-process guard handing the app the path it matched."""
from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from guard import GuardMiddleware, Policy
from guard.target import MAX_TARGET_BYTES, TargetRefused, canonical, canonical_scope, remove_dot_segments

RAW = [0.61234, 0.28766, 0.1]


@pytest.mark.parametrize("path, expected", [  # RFC 3986 section 5.4's examples, as absolute paths
    ("/a/b/c/./../../g", "/a/g"), ("/mid/content=5/../6", "/mid/6"), ("/a/b/c/.", "/a/b/c/"),
    ("/a/b/c/..", "/a/b/"), ("/..", "/"), ("/../..", "/"), ("/a//../b", "/a/b"), ("/", "/"),
    ("/a/.../b", "/a/.../b"), ("/a/..b/c", "/a/..b/c"), ("//a", "//a"),
])
def test_dot_segments_are_removed_as_rfc_3986_removes_them(path, expected):
    assert remove_dot_segments(path) == expected


@pytest.mark.parametrize("raw, path, forwarded", [
    (b"/predict", "/predict", b"/predict"),
    (b"/x/../predict", "/predict", b"/predict"),
    (b"/%2e%2E/predict", "/predict", b"/predict"),
    (b"/a%2F..%2Fpredict", "/predict", b"/predict"),  # %2F is a slash, as uvicorn decodes it
    (b"/models/caf%C3%A9/predict", "/models/caf\u00e9/predict", b"/models/caf%C3%A9/predict"),
    (b"/a%3Fb%23c%25", "/a?b#c%", b"/a%3Fb%23c%25"),  # escapes that must stay escaped
    (b"/v1/models/iris:predict", "/v1/models/iris:predict", b"/v1/models/iris:predict"),
])
def test_canonical_paths(raw, path, forwarded):
    target = canonical(raw)
    assert (target.path, target.raw_path) == (path, forwarded)
    assert canonical(target.raw_path) == target  # canonical already: nothing changes it again


@pytest.mark.parametrize("raw, status, reason", [
    (b"*", 400, "target_form"), (b"http://other/predict", 400, "target_form"), (b"@other:80/x", 400, "target_form"),
    (b"other:80", 400, "target_form"), (b"/a\\b", 400, "bad_character"), (b"/a%5Cb", 400, "bad_character"),
    (b"/a%00", 400, "bad_character"), (b"/a%0d%0aX: y", 400, "bad_character"), (b"/a%zz", 400, "bad_escape"),
    (b"/a%", 400, "bad_escape"), (b"/%ff", 400, "bad_encoding"), (b"/%252e%252e/p", 400, "double_escape"),
    (b"/" + b"a" * MAX_TARGET_BYTES, 414, "target_too_long"),
])
def test_refused_targets(raw, status, reason):
    with pytest.raises(TargetRefused) as refused:
        canonical(raw)
    assert (refused.value.status, refused.value.reason) == (status, reason)


def test_a_canonical_scope_is_left_as_it_is():
    scope = {"type": "http", "path": "/predict", "raw_path": b"/predict", "query_string": b"a=1"}
    assert canonical_scope(scope) is scope
    with pytest.raises(TargetRefused):
        canonical_scope({**scope, "query_string": b"a#b"})


async def test_the_app_gets_the_path_the_guard_matched():
    seen = []

    async def predict(request: Request) -> JSONResponse:
        seen.append((request.scope["path"], request.scope["raw_path"]))
        return JSONResponse({"probabilities": RAW})

    app = Starlette(routes=[Route("/predict", predict, methods=["POST"])])
    policy = Policy(routes={"/predict": {"probabilities": "/probabilities", "output": ["round:1"]}})
    guarded = GuardMiddleware(app, policy)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guarded), base_url="http://g") as client:
        dotted = await client.post(httpx.URL("http://g/x/%2e%2e/predict"), json={})
        refused = await client.post(httpx.URL("http://g/x/..%5cpredict"), json={})
    assert dotted.json() == {"probabilities": [0.6, 0.3, 0.1]} and seen == [("/predict", b"/predict")]
    assert refused.status_code == 400 and refused.json()["error"] == "bad_character"
