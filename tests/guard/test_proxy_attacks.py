"""What an attacker sends to a live ``guard proxy`` (the command, served by uvicorn): raw request
lines written on a real socket, never through an HTTP client that would normalise them.

The upstream is as lenient as servers come: before routing it folds case, merges slashes, drops
``;`` parameters and trailing dots and spaces, turns backslashes into slashes and resolves dot
segments, and it serves raw probabilities to every method on its prediction paths. Beside it
listens a second service (``Tripwire``) that the proxy must never connect to. Every answer is
checked for the raw probabilities' digits; every spelling of a guarded path must come back defended
(rounded) or refused."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

import guard
from conftest import free_port, served_in_thread, wait_until_serving

SECRET = "proxy attack test secret"
RAW = [0.61234, 0.28766, 0.1]
RAW_DIGITS = (b"61234", b"28766")
DEFENDED = {"probabilities": [0.6, 0.3, 0.1]}
BODY = json.dumps({"features": [1.0, 2.0]}).encode()
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "PROPFIND", "BREW"]


def lenient_path(path: str) -> str:
    """The path a lenient server routes on (IIS, servlet containers, slash-merging front ends)."""
    segments: list[str] = []
    for segment in path.replace("\\", "/").lower().split("/"):
        segment = segment.split(";", 1)[0]
        if segment == "..":
            segments = segments[:-1]
        elif segment != ".":
            segment = segment.rstrip(". ")
            if segment:
                segments.append(segment)
    return "/" + "/".join(segments)


def upstream_app() -> Starlette:
    async def predict(request: Request) -> JSONResponse:
        return JSONResponse({"probabilities": RAW}, status_code=int(request.query_params.get("status", 200)))

    async def broken(request: Request) -> PlainTextResponse:
        return PlainTextResponse(f"p = {RAW[0]}")  # not JSON: the guard fails closed

    async def cut(request: Request) -> StreamingResponse:
        async def parts():
            yield b'{"probabilities": [0.61234,'
            raise RuntimeError("the model server dies mid-answer")
        return StreamingResponse(parts(), media_type="application/json")

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    app = Starlette(routes=[Route("/predict", predict, methods=METHODS),
                            Route("/models/{name}/predict", predict, methods=METHODS),
                            Route("/broken", broken, methods=["POST"]), Route("/cut", cut, methods=["POST"]),
                            Route("/health", health)])

    async def lenient(scope, receive, send) -> None:
        if scope["type"] == "http":
            path = lenient_path(scope["path"])
            scope = {**scope, "path": path, "raw_path": path.encode()}
        await app(scope, receive, send)
    return lenient


class Tripwire:
    """A service on the proxy's machine that no client may reach through it: it counts every
    connection and answers raw probabilities, so a forwarded request would also leak them."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        body = json.dumps({"probabilities": RAW}).encode()
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:  # closed
                return
            self.connections += 1
            with connection:
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                                   b"Connection: close\r\n\r\n%s" % (len(body), body))


@pytest.fixture(scope="module")
def tripwire() -> Tripwire:
    wire = Tripwire()
    yield wire
    wire.server.close()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, tripwire) -> int:
    """``guard proxy`` in a process of its own, in front of the lenient upstream: its port."""
    with served_in_thread(upstream_app(), log_level="critical") as upstream_port:
        route = {"probabilities": "/probabilities", "features": "/features", "output": ["round:1"]}
        policy = {"secret": SECRET, "metrics_path": "/metrics",
                  "routes": {path: route for path in ("/predict", "/models/{name}/predict", "/broken", "/cut")}}
        path = tmp_path_factory.mktemp("proxy") / "guard.toml"
        path.write_text("\n".join(toml_lines(policy)))
        port = free_port()
        process = subprocess.Popen([sys.executable, "-m", "guard.cli", "proxy", "--upstream",
                                    f"http://127.0.0.1:{upstream_port}", "--policy", str(path), "--port", str(port)],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=path.parent, env=same_guard())
        output: list[bytes] = []
        try:
            wait_until_serving(f"http://127.0.0.1:{port}", 60, process)
            threading.Thread(target=lambda: output.extend(process.stdout), daemon=True).start()  # never a full pipe
            yield port
        finally:
            process.terminate()
            process.wait(10)
    assert b"Traceback" not in b"".join(output), b"".join(output).decode(errors="replace")[-3000:]


def same_guard() -> dict[str, str]:
    """The environment for a process that imports the very ``guard`` this test imported."""
    root = os.path.dirname(os.path.dirname(guard.__file__))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}


def toml_lines(policy: dict) -> list[str]:
    lines = [f"{key} = {json.dumps(value)}" for key, value in policy.items() if key != "routes"]
    for path, route in policy["routes"].items():
        lines.append(f"[routes.{json.dumps(path)}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in route.items()]
    return lines


def request(target: str, method: str = "POST", body: bytes = BODY, headers: tuple[str, ...] = (),
            close: bool = True, host: str = "proxy") -> bytes:
    """A request exactly as written: ``target`` goes on the request line unchanged."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Content-Type: application/json", *headers]
    if not any(h.lower().startswith("transfer-encoding") for h in headers):
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def exchange(port: int, raw: bytes) -> tuple[int, bytes]:
    """Send ``raw`` on a fresh connection, read until the proxy closes it: the status and every byte."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(raw)
        data = b""
        while chunk := connection.recv(65536):
            data += chunk
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", data)
    assert match, data[:200]
    return int(match.group(1)), data


def read_answer(connection: socket.socket) -> tuple[int, bytes]:
    """One answer with a ``Content-Length`` from a kept-alive connection: its status and body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += connection.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"(?im)^content-length: *(\d+)", head).group(1))
    while len(body) < length:
        body += connection.recv(65536)
    return int(head.split(b" ", 2)[1]), body


def body_of(answer: bytes) -> dict:
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])


def leaks(answer: bytes) -> bool:
    return any(digits in answer for digits in RAW_DIGITS)


# Spellings of a guarded path that a server after the guard (this upstream) serves: each must be defended.
GUARDED_SPELLINGS = [
    "/x/../predict", "/./predict", "/predict/.", "/predict/x/..", "/models/a/../b/predict", "/models/a/./predict",
    "/models/./a/predict", "/%2e%2e/predict", "/x/%2e%2e/predict", "/x/%2E%2E/predict", "/x/.%2e/predict",
    "/%2e/predict", "/x%2f..%2fpredict", "/x/..%2fpredict", "/predict%2f", "//predict", "///predict",
    "/models//a/predict", "/PREDICT", "/Predict", "/MODELS/A/PREDICT", "/predict.", "/predict%2e", "/predict..",
    "/predict;x=1", "/predict/", "/predict%20", "/models/a/predict;v=2", "/predict?status=201",
]


@pytest.mark.parametrize("target", GUARDED_SPELLINGS)
def test_every_spelling_of_a_guarded_path_is_defended(proxy, tripwire, target):
    status, answer = exchange(proxy, request(target))
    assert not leaks(answer), answer
    assert status in (200, 201) and body_of(answer) == DEFENDED, answer
    assert tripwire.connections == 0


def refused_targets(tripwire: Tripwire) -> list[tuple[str, str]]:
    other = f"127.0.0.1:{tripwire.port}"
    return [("POST", f"@{other}/predict"), ("GET", f"@{other}/admin"), ("POST", f"http://{other}/predict"),
            ("POST", f"http://user@{other}/predict"), ("POST", "http://proxy/predict"), ("OPTIONS", "*"),
            ("CONNECT", other), ("POST", other + "/predict"), ("POST", "/x/%252e%252e/predict"),
            ("POST", "/predict%00"), ("POST", "/%00/../predict"), ("POST", "/%5cpredict"),
            ("POST", "/x\\..\\predict"), ("POST", "/x/..%5cpredict"), ("POST", "/predict%zz"),
            ("POST", "/predict%ff"), ("POST", "/predict?a#b"), ("POST", "/predict/" + "a" * 9000)]


def test_targets_that_are_not_a_plain_path_are_refused(proxy, tripwire):
    for method, target in refused_targets(tripwire):
        status, answer = exchange(proxy, request(target, method))
        assert not leaks(answer), (target, answer)
        assert status in (400, 414), (target, answer)
    status, answer = exchange(proxy, request("/predict?" + "a" * 70_000))
    assert 400 <= status < 500 and not leaks(answer)
    assert tripwire.connections == 0


def test_no_host_but_the_configured_upstream_is_ever_reached(proxy, tripwire):
    other = f"127.0.0.1:{tripwire.port}"
    for target, host, headers in [("/predict", other, ()), ("/predict", f"user@{other}", ()),
                                  ("/predict", "proxy", (f"X-Forwarded-Host: {other}", f"Forwarded: host={other}")),
                                  (f"//{other}/predict", "proxy", ()), (f"/@{other}/predict", "proxy", ()),
                                  (f"/..//{other}/predict", "proxy", ()), (f"/%2f%2f{other}/predict", "proxy", ())]:
        status, answer = exchange(proxy, request(target, headers=headers, host=host))
        assert not leaks(answer), (target, answer)
        assert status in (200, 400, 404), (target, answer)
    assert tripwire.connections == 0


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND", "BREW"])
def test_every_method_with_a_body_is_defended(proxy, tripwire, method):
    status, answer = exchange(proxy, request("/predict", method))
    assert status == 200 and body_of(answer) == DEFENDED, answer
    status, answer = exchange(proxy, request("/x/../PREDICT?status=418", method))
    assert status == 418 and body_of(answer) == DEFENDED, answer  # a non-2xx answer is defended too
    assert tripwire.connections == 0


def test_head_answers_carry_nothing(proxy):
    status, answer = exchange(proxy, request("/predict", "HEAD"))
    head = answer.split(b"\r\n\r\n", 1)
    assert status == 200 and head[1] == b"" and not leaks(answer)
    assert b"content-length" not in head[0].lower()  # the length of the raw answer would be a hint


def test_chunked_bodies_on_dotted_paths_are_defended(proxy):
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)
    for target in ("/x/../predict", "/%2e%2e/models/a/predict"):
        status, answer = exchange(proxy, request(target, body=chunked, headers=("Transfer-Encoding: chunked",)))
        assert status == 200 and body_of(answer) == DEFENDED, answer


def test_the_connection_survives_the_guards_own_errors(proxy):
    """A guard error (a broken or cut-off upstream answer, a refused target) leaves the keep-alive
    connection usable."""
    with socket.create_connection(("127.0.0.1", proxy), timeout=10) as connection:
        for target, expected in [("/broken", 502), ("/predict", 200), ("/cut", 502), ("/predict", 200),
                                 ("/x/..%5cpredict", 400), ("/predict", 200)]:
            connection.sendall(request(target, close=False))
            status, body = read_answer(connection)
            assert status == expected and not leaks(body), (target, body)


def test_refusals_are_counted(proxy):
    exchange(proxy, request("*", "OPTIONS"))
    status, answer = exchange(proxy, request("/metrics", "GET", b""))
    counted = re.search(rb'guard_refused_targets_total\{reason="target_form"\} (\d+)', answer)
    assert status == 200 and counted and int(counted.group(1)) >= 1
