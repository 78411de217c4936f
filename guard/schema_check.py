"""Compare where a policy reads each route's features with the request schema the app publishes in
its OpenAPI document (a FastAPI app: ``app.openapi()``, or its router's routes through
``fastapi.openapi.utils.get_openapi`` when the guard sits inside the app's middleware stack).

A policy feature that the schema says is not there (a field the request model does not have, a
query parameter the endpoint does not take) or is not a number (a ``str`` field) would make the
guard refuse requests the bare app accepts, or read something that is not a feature; ``GuardMiddleware``
logs each such mismatch as a warning when it starts. Only what the schema states is reported: an
endpoint that reads its request itself (``request: Request``, a ``dict`` body) declares nothing and
is not checked, nor are features read by a user's function, nor apps without an OpenAPI document.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any

from starlette.types import ASGIApp

from guard.payload import NamedFields, Pointer, QueryFields, VectorAt
from guard.policy import RoutePolicy
from guard.routing import find_router, is_template, template_regex

logger = logging.getLogger("guard")

Schema = dict[str, Any]
ANY: list[Schema] = [{}]
"""What a schema that states nothing (no type, no properties) allows: anything; nothing under it is
reported."""

NUMERIC = {"number", "integer", "boolean"}  # what pydantic's lax ``float`` also takes as a number


def openapi_document(app: ASGIApp) -> Schema | None:
    """The app's OpenAPI document; None for an app that has none (not FastAPI) or fails to build it."""
    router = find_router(app)
    if router is None:
        return None
    try:
        with warnings.catch_warnings():  # FastAPI's own (duplicate operation ids): not the guard's to say
            warnings.simplefilter("ignore")
            if callable(getattr(router, "openapi", None)):  # the FastAPI app itself
                return router.openapi()
            if type(router).__module__.startswith("fastapi"):  # its APIRouter, under a middleware stack
                from fastapi.openapi.utils import get_openapi
                return get_openapi(title="app", version="0", routes=router.routes)
    except Exception as error:  # noqa: BLE001 (an app whose schema does not build serves all the same)
        logger.info("guard: the app's OpenAPI schema cannot be built (%s: %s); features not checked "
                    "against it", type(error).__name__, error)
    return None


def feature_mismatches(app: ASGIApp, routes: Mapping[str, RoutePolicy]) -> list[str]:
    """Every policy feature the app's OpenAPI schema says is missing or not a number, one line each."""
    document = openapi_document(app)
    if document is None:
        return []
    schema = _Schemas(document)
    problems = []
    for path, route in routes.items():
        source = route.feature_source()
        try:
            for method, operation in _operations(document.get("paths", {}), path):
                where = f"{method.upper()} {path}"
                if isinstance(source, QueryFields):
                    problems += schema.query_mismatches(where, operation, source.names)
                elif isinstance(source, (VectorAt, NamedFields)):
                    body = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
                    if "schema" in body:
                        problems += schema.body_mismatches(where, body["schema"], source)
        except Exception as error:  # noqa: BLE001 (a schema this reader does not follow: say so, serve)
            logger.info("guard: the app's OpenAPI schema at %s cannot be read (%s: %s); its features not "
                        "checked against it", path, type(error).__name__, error)
    return problems


def _operations(paths: Mapping[str, Schema], policy_path: str) -> list[tuple[str, Schema]]:
    """The operations of the app's path(s) that a policy route guards."""
    return [(method, operation) for path, item in paths.items()
            if path == policy_path or (is_template(path) and template_regex(path).match(policy_path))
            for method, operation in item.items() if isinstance(operation, dict)]


def types(schema: Schema) -> set[str]:
    """The JSON types a schema names (``"type"`` is one name or a list of them)."""
    named = schema.get("type")
    return set(named) if isinstance(named, list) else {named} if named else set()


class _Schemas:
    """JSON Schema navigation within one OpenAPI document: references followed, unions as lists of
    branches (a pointer exists where any branch has it)."""

    def __init__(self, document: Schema) -> None:
        self.document = document

    def branches(self, schema: Schema) -> list[Schema]:
        """``schema``'s alternatives, references resolved, ``null`` left out; ``ANY`` when one of
        them states nothing checkable."""
        for _ in range(32):  # a reference to a reference ...
            if "$ref" not in schema:
                break
            schema = Pointer.parse(schema["$ref"].removeprefix("#")).get(self.document)
        alternatives = schema.get("anyOf") or schema.get("oneOf")
        if alternatives is None and len(schema.get("allOf", ())) == 1:
            alternatives = schema["allOf"]
        if alternatives is not None:
            found = [branch for alternative in alternatives for branch in self.branches(alternative)]
            return ANY if any(branch is ANY[0] for branch in found) else found
        if types(schema) == {"null"}:
            return []
        if not {"type", "properties", "items", "prefixItems"} & schema.keys():
            return ANY
        return [schema]

    def step(self, schemas: list[Schema], token: str) -> list[Schema]:
        """What a JSON pointer's ``token`` names in any of ``schemas`` (``ANY`` when it cannot tell)."""
        if schemas is ANY:
            return ANY
        found: list[Schema] = []
        for schema in schemas:
            if "array" in types(schema) and token.isdigit():
                prefix = schema.get("prefixItems", [])
                items = prefix[int(token)] if int(token) < len(prefix) else schema.get("items", {})
                found += self.branches(items)
            elif "object" in types(schema) or "properties" in schema:
                extra = schema.get("additionalProperties", "properties" not in schema)
                if token in schema.get("properties", {}):
                    found += self.branches(schema["properties"][token])
                elif extra is True:
                    return ANY
                elif isinstance(extra, dict):
                    found += self.branches(extra)
        return ANY if any(branch is ANY[0] for branch in found) else found

    def at(self, schemas: list[Schema], pointer: Pointer) -> list[Schema]:
        for token in pointer.tokens:
            schemas = self.step(schemas, token)
        return schemas

    def elements(self, schemas: list[Schema]) -> list[Schema]:
        """The items of the arrays among ``schemas``, and the rest as they are (a value that may be
        one object or a list of them)."""
        if schemas is ANY:
            return ANY
        found = [branch for schema in schemas
                 for branch in (self.branches(schema.get("items", {})) if "array" in types(schema)
                                else [schema])]
        return ANY if any(branch is ANY[0] for branch in found) else found

    @staticmethod
    def numeric(schemas: list[Schema]) -> bool:
        return schemas is ANY or any(types(schema) & NUMERIC for schema in schemas)

    @staticmethod
    def describe(schemas: list[Schema]) -> str:
        return " or ".join(sorted(set().union(*(types(schema) or {"object"} for schema in schemas))))

    def body_mismatches(self, where: str, body: Schema, source: VectorAt | NamedFields) -> list[str]:
        top = self.branches(body)
        if isinstance(source, VectorAt):
            found = self.at(top, source.pointer)
            if not found:
                return [f"{where}: the policy's features {source.pointer.text!r} are not in the app's "
                        + "request schema"]
            vectors = ANY if found is ANY else [schema for schema in found if "array" in types(schema)]
            rows = self.elements(vectors)
            if self.numeric(rows) or (source.width is None and self.numeric(self.elements(rows))):
                return []
            declared = self.describe(found)
            return [(f"{where}: the policy's features {source.pointer.text!r} are declared as {declared} in "
                     "the app's request schema, not a list of numbers")]
        objects = self.elements(self.at(top, source.rows))
        problems = []
        for field in source.fields:
            found = self.at(objects, field)
            if not found:
                problems.append(f"{where}: the policy's feature {field.text!r} is not a field of the app's "
                                f"request schema{self.fields_hint(objects)}")
            elif not self.numeric(found):
                problems.append(f"{where}: the policy's feature {field.text!r} is declared as "
                                f"{self.describe(found)} in the app's request schema, not a number")
        return problems

    def fields_hint(self, objects: list[Schema]) -> str:
        names = sorted({name for schema in objects for name in schema.get("properties", {})})
        return f" (its fields: {', '.join(names)})" if names else ""

    def query_mismatches(self, where: str, operation: Schema, names: tuple[str, ...]) -> list[str]:
        declared = {parameter["name"]: parameter.get("schema", {})
                    for parameter in operation.get("parameters", []) if parameter.get("in") == "query"}
        if not declared:  # the endpoint reads its query itself, or takes none: nothing stated
            return []
        problems = []
        for name in names:
            if name not in declared:
                problems.append(f"{where}: the policy's feature {name!r} is not a query parameter of the app "
                                f"(its parameters: {', '.join(sorted(declared))})")
            elif not self.numeric(self.branches(declared[name])):
                problems.append(f"{where}: the policy's feature {name!r} is declared as "
                                f"{self.describe(self.branches(declared[name]))} query parameter, not a number")
        return problems
