"""Which policy route a request is on, decided the way Starlette's router decides it, and whether the
app behind the guard could serve a guarded endpoint another way.

Matching happens on the *route path*: ``scope["path"]`` without ``scope["root_path"]`` (Starlette's own
``get_route_path``), so ``FastAPI(root_path=...)``, ``uvicorn --root-path`` and a guard added to a
sub-app under ``app.mount(...)`` all see the path the router dispatches on. Policy routes are exact
paths (looked up first) or Starlette path templates (``/models/{name}/predict``, compiled by
Starlette's ``compile_path``, tried in policy order).

``audit_routes`` inspects the app's router once, before the first request, and names every way
around the policy: a policy route that matches no route of the app (say a policy for ``/predict``
in front of an app that serves it under a mount at ``/v1/predict``), or an endpoint of a guarded
route that another, unguarded route also serves. The middleware refuses to start on those
(``lifespan.startup.failed``) and fails every request closed if the server skips the lifespan.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from re import Pattern
from typing import Generic, TypeVar

from starlette._utils import get_route_path
from starlette.routing import Mount, compile_path
from starlette.types import ASGIApp, Scope

T = TypeVar("T")


def is_template(path: str) -> bool:
    """Whether a policy route is a path template (has ``{parameters}``)."""
    return "{" in path


def template_regex(path: str) -> Pattern[str]:
    """Starlette's regex for a path template (``ValueError`` on duplicate or unknown parameters)."""
    try:
        return compile_path(path)[0]
    except AssertionError as error:  # Starlette asserts on unknown convertors
        raise ValueError(str(error)) from None


class RouteTable(Generic[T]):
    """Policy routes (path or template -> ``T``) matched on a scope's route path."""

    def __init__(self, routes: Mapping[str, T]) -> None:
        self.exact = {path: value for path, value in routes.items() if not is_template(path)}
        self.templates = [(template_regex(path), value) for path, value in routes.items() if is_template(path)]

    def match(self, scope: Scope) -> T | None:
        path = get_route_path(scope)
        found = self.exact.get(path)
        if found is not None:
            return found
        return next((value for regex, value in self.templates if regex.match(path)), None)


def find_router(app: ASGIApp) -> object | None:
    """The Starlette router (or app) under a middleware stack: the first object with ``routes``,
    following each middleware's ``app``; None for a plain ASGI callable."""
    seen = set()
    while app is not None and id(app) not in seen:
        seen.add(id(app))
        if hasattr(app, "routes"):
            return app
        app = getattr(app, "app", None)
    return None


def app_routes(routes: list, prefix: str = "") -> Iterator[tuple[str, object]]:
    """Every ``(full path template, endpoint)`` a router serves, through mounts."""
    for route in routes:
        path = prefix + getattr(route, "path", "")
        if isinstance(route, Mount):
            yield from app_routes(route.routes, path)
            if not route.routes:  # a mounted plain ASGI app serves everything under it
                yield path + "/{path:path}", route.app
        elif hasattr(route, "endpoint"):
            yield path, route.endpoint


def audit_routes(app: ASGIApp, policy_routes: list[str]) -> list[str]:
    """The ways around ``policy_routes`` in ``app``'s router (empty when none, or no router)."""
    router = find_router(app)
    if router is None:
        return []
    served = list(app_routes(router.routes))
    problems = []
    guarded_endpoints = {}
    for policy_path in policy_routes:
        exact = [endpoint for path, endpoint in served if path == policy_path]
        if exact:
            guarded_endpoints.update((id(endpoint), policy_path) for endpoint in exact)
        elif not any(template_regex(path).match(policy_path) for path, _ in served if is_template(path)):
            problems.append(f"policy route {policy_path!r} matches no route of the app (under a mount "
                            "or a root path? write the path the app's router sees, e.g. '/v1/predict')")
    guarded = set(policy_routes)
    for path, endpoint in served:
        policy_path = guarded_endpoints.get(id(endpoint))
        if policy_path is not None and path not in guarded:
            problems.append(f"the endpoint guarded at {policy_path!r} is also served, unguarded, at {path!r}")
    return problems
