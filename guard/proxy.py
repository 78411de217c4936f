"""A reverse proxy as an ASGI app, so ``GuardMiddleware`` can guard any HTTP model server (KServe v2
servers such as MLServer and Triton, TorchServe, TF Serving, MLflow, BentoML): ``guard proxy``
serves ``GuardMiddleware(UpstreamProxy(upstream), policy)``.

Every HTTP request is forwarded to ``upstream`` with its method, canonical path (``guard.target``:
the path the guard matched, sent unchanged after the configured origin and prefix), query, headers
(less the hop-by-hop ones, RFC 9110 section 7.6.1) and body, streamed both ways over one pooled
``httpx.AsyncClient``; the guard in front buffers only the routes it guards. An upstream that cannot
be reached answers ``502``, one that times out ``504``, both as JSON without any upstream bytes; a
failure after the answer started leaves it incomplete (the guard then fails closed with ``502``).
"""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import httpx
from starlette.types import Message, Receive, Scope, Send

from guard.payload import dumps
from guard.target import TargetRefused, canonical_scope

logger = logging.getLogger("guard")

# Hop-by-hop headers (RFC 9110 section 7.6.1) and Host, which names the proxy, not the upstream.
_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
                         b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade", b"host"})


class UpstreamProxy:
    """ASGI app forwarding every HTTP request to ``upstream`` (``http://host:port``, optionally with a
    path prefix). ``timeout``: seconds for the upstream's answer; ``connect_timeout``: for the
    connection; ``max_connections``: the pool's size."""

    def __init__(self, upstream: str, *, timeout: float = 30.0, connect_timeout: float = 5.0,
                 max_connections: int = 100) -> None:
        url = httpx.URL(upstream)
        if url.scheme not in ("http", "https") or not url.host or url.userinfo or url.query or url.fragment:
            raise ValueError(f"upstream {upstream!r} must be an http(s) URL: scheme, host, port and "
                             "optionally a path prefix")
        self.origin = url.copy_with(raw_path=b"/")
        self.prefix = url.raw_path.rstrip(b"/")
        self.timeout = httpx.Timeout(timeout, connect=connect_timeout)
        self.limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        """The pooled client, made on first use inside the server's event loop."""
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout, limits=self.limits, follow_redirects=False)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
        elif scope["type"] == "http":
            await self.forward(scope, receive, send)
        else:  # WebSockets are not proxied
            await send({"type": "websocket.close", "code": 1003})

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def upstream_url(self, scope: Scope) -> httpx.URL:
        """The configured origin and prefix, the canonical path, the query: nothing in the request
        can name another host, port, scheme or user-info, and the URL is sent as built
        (``TargetRefused`` for a target the guard refuses or one the client library would change)."""
        scope = canonical_scope(scope)
        query = scope.get("query_string", b"")
        raw_path = self.prefix + scope["raw_path"] + (b"?" + query if query else b"")
        try:
            url = self.origin.copy_with(raw_path=raw_path)
        except httpx.InvalidURL:
            url = None
        if url is None or url.raw_path != raw_path or url.netloc != self.origin.netloc:
            raise TargetRefused(400, "bad_target", "the request target cannot be forwarded unchanged")
        return url

    def upstream_request(self, scope: Scope, receive: Receive) -> httpx.Request:
        url = self.upstream_url(scope)
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP_BY_HOP]
        client = scope.get("client")
        if client:
            forwarded = dict(scope["headers"]).get(b"x-forwarded-for")
            peer = client[0].encode()
            headers = [(k, v) for k, v in headers if k.lower() != b"x-forwarded-for"]
            headers.append((b"x-forwarded-for", forwarded + b", " + peer if forwarded else peer))
        has_body = any(k.lower() in (b"content-length", b"transfer-encoding") for k, _ in scope["headers"])
        return self.client.build_request(scope["method"], url, headers=headers,
                                         content=request_body(receive) if has_body else None)

    async def forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the request upstream and stream its answer back. Nothing raises to the server, so a
        refusal keeps the client's connection: a failure before the answer starts is a JSON error;
        one after it leaves the answer incomplete (the guard in front then fails closed)."""
        try:
            request = self.upstream_request(scope, receive)
        except TargetRefused as refused:
            await self.refuse(send, refused.status, refused.reason, refused.detail)
            return
        try:
            response = await self.client.send(request, stream=True)
        except httpx.TimeoutException as error:
            await self.refuse(send, 504, "upstream_timeout", f"the model server did not answer in time ({error!r})")
            return
        except httpx.HTTPError as error:
            await self.refuse(send, 502, "upstream_unavailable", f"cannot reach the model server ({error!r})")
            return
        try:
            headers = [(k.lower(), v) for k, v in response.headers.raw if k.lower() not in _HOP_BY_HOP]
            await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except httpx.HTTPError as error:
            logger.error("guard proxy: the model server's answer broke off: %r", error)
        finally:
            await response.aclose()

    async def refuse(self, send: Send, status: int, error: str, detail: str) -> None:
        logger.error("guard proxy: %d %s: %s", status, error, detail)
        body = dumps({"error": error, "detail": detail})
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


async def request_body(receive: Receive) -> AsyncIterator[bytes]:
    """The client's body as it arrives (streamed to the upstream)."""
    more = True
    while more:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        more = message.get("more_body", False)
