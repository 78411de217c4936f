"""Which policy route a request is on, decided the way Starlette's router decides it, and whether the
app behind the guard could serve a guarded endpoint another way.

Matching happens on the *route path*: ``scope["path"]`` without ``scope["root_path"]`` (Starlette's own
``get_route_path``), so ``FastAPI(root_path=...)``, ``uvicorn --root-path`` and a guard added to a
sub-app under ``app.mount(...)`` all see the path the router dispatches on. Policy routes are exact
paths or Starlette path templates (``/models/{name}/predict``, compiled by Starlette's
``compile_path``). No two policy routes may match the same path (``overlap`` finds one such path):
Starlette's router would take the first, the reader of the policy might expect the other, and an
ambiguous policy is a misconfiguration, so ``Policy`` refuses it when it is loaded.

``find_bypasses`` inspects the app's router once, before the first request, and names every way
around the policy: a policy route that matches no route of the app (say a policy for ``/predict``
in front of an app that serves it under a mount at ``/v1/predict``), or an endpoint of a guarded
route that another, unguarded route also serves. The middleware refuses to start on those
(``lifespan.startup.failed``) and fails every request closed if the server skips the lifespan.
"""
from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from re import Pattern
from typing import Generic, TypeVar

from starlette._utils import get_route_path
from starlette.routing import PARAM_REGEX, Mount, compile_path
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


CharTest = Callable[[str], bool]
_ANY: CharTest = lambda c: True  # noqa: E731
_NOT_SLASH: CharTest = lambda c: c != "/"  # noqa: E731
_DIGIT: CharTest = lambda c: c in "0123456789"  # noqa: E731
_HEX: CharTest = lambda c: c in "0123456789abcdefABCDEF"  # noqa: E731


def _literal(char: str) -> CharTest:
    return lambda c: c == char


class _Automaton:
    """A path template as a small NFA over single characters: ``edges[state]`` holds ``(test,
    next)`` pairs, ``test`` None for an empty move; the last state accepts."""

    def __init__(self) -> None:
        self.edges: list[list[tuple[CharTest | None, int]]] = [[]]

    def _new(self, source: int, test: CharTest | None) -> int:
        self.edges.append([])
        self.edges[source].append((test, len(self.edges) - 1))
        return len(self.edges) - 1

    def one(self, state: int, test: CharTest) -> int:
        return self._new(state, test)

    def many(self, state: int, test: CharTest, at_least_one: bool) -> int:
        """``test*`` (or ``test+``) after ``state``."""
        if at_least_one:
            state = self._new(state, test)
        loop = self._new(state, None)
        self.edges[loop].append((test, loop))
        return loop

    def maybe(self, state: int, tests: list[tuple[CharTest, bool]]) -> int:
        """An optional group of ``(test, repeated)`` pieces after ``state``."""
        end = state
        for test, repeated in tests:
            end = self.many(end, test, True) if repeated else self.one(end, test)
        return self._join(state, end)

    def _join(self, skip_from: int, end: int) -> int:
        after = self._new(end, None)
        self.edges[skip_from].append((None, after))
        return after

    def convertor(self, state: int, name: str) -> int:
        """Starlette's standard convertors' regexes; any other convertor may match anything."""
        if name == "str":
            return self.many(state, _NOT_SLASH, True)
        if name == "int":
            return self.many(state, _DIGIT, True)
        if name == "float":
            return self.maybe(self.many(state, _DIGIT, True), [(_literal("."), False), (_DIGIT, True)])
        if name == "uuid":
            for count in (8, 4, 4, 4, 12):
                if count != 8:
                    state = self.maybe(state, [(_literal("-"), False)])
                for _ in range(count):
                    state = self.one(state, _HEX)
            return state
        return self.many(state, _ANY, False)

    @classmethod
    def of(cls, template: str) -> _Automaton:
        automaton, state, at = cls(), 0, 0
        for parameter in PARAM_REGEX.finditer(template):
            for char in template[at:parameter.start()]:
                state = automaton.one(state, _literal(char))
            state = automaton.convertor(state, (parameter.group(2) or ":str")[1:])
            at = parameter.end()
        for char in template[at:]:
            state = automaton.one(state, _literal(char))
        return automaton


def overlap(first: str, second: str) -> str | None:
    """A path both policy routes (exact paths or Starlette templates) match, or None when there is
    none. A search of the two templates' product automaton over the characters they spell out plus
    ``0``: every standard convertor's class holds ``0``, so a path both match exists iff one over
    those characters does (a custom convertor is taken to match anything)."""
    a, b = _Automaton.of(first), _Automaton.of(second)
    alphabet = sorted(set(PARAM_REGEX.sub("", first + second)) | {"0"})
    start, accept = (0, 0), (len(a.edges) - 1, len(b.edges) - 1)
    spelled: dict[tuple[int, int], str] = {start: ""}
    queue = deque([start])
    while queue:
        state = queue.popleft()
        if state == accept:
            return spelled[state]
        p, q = state
        moves = [((p2, q), "") for test, p2 in a.edges[p] if test is None]
        moves += [((p, q2), "") for test, q2 in b.edges[q] if test is None]
        moves += [((p2, q2), c) for test_a, p2 in a.edges[p] if test_a is not None
                  for test_b, q2 in b.edges[q] if test_b is not None
                  for c in alphabet if test_a(c) and test_b(c)]
        for following, char in moves:
            if following not in spelled:
                spelled[following] = spelled[state] + char
                queue.append(following)
    return None


def fold(path: str) -> str:
    """What a lenient server might take ``path`` for: lower case, each segment without its ``;``
    parameters and trailing dots and spaces, empty segments (doubled and trailing slashes) dropped."""
    segments = (segment.split(";", 1)[0].rstrip(". ") for segment in path.lower().split("/"))
    return "/" + "/".join(segment for segment in segments if segment)


class RouteTable(Generic[T]):
    """Policy routes (path or template -> ``T``) matched on a scope's route path: as Starlette
    matches it, else folded (``fold``), so a spelling that a case-insensitive or slash-merging server
    would route onto a guarded route is guarded too."""

    def __init__(self, routes: Mapping[str, T]) -> None:
        self.exact = {path: value for path, value in routes.items() if not is_template(path)}
        self.templates = [(template_regex(path), value) for path, value in routes.items() if is_template(path)]
        self.folded = {fold(path): value for path, value in self.exact.items()}
        self.folded_templates = [(template_regex(fold(path)), value) for path, value in routes.items()
                                 if is_template(path)]

        self._lookup = functools.lru_cache(maxsize=4096)(self._find)  # paths seen lately keep their route

    def match(self, scope: Scope) -> T | None:
        return self._lookup(get_route_path(scope))

    def _find(self, path: str) -> T | None:
        found = self.exact.get(path)
        if found is None:
            found = next((value for regex, value in self.templates if regex.match(path)), None)
        if found is None:
            path = fold(path)
            found = self.folded.get(path)
        if found is None:
            found = next((value for regex, value in self.folded_templates if regex.match(path)), None)
        return found


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


def find_bypasses(app: ASGIApp, policy_routes: list[str]) -> list[str]:
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
