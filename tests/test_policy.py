"""Policy models: construction from keywords, dicts and files; validation with clear errors."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from guard import Policy, RoutePolicy

SECRET = "0123456789abcdef0123"
ROUTE = {"probabilities": "/probabilities", "features": "/features", "output": ["round:2"]}


def test_keyword_dict_and_file_construction_agree(tmp_path):
    toml = tmp_path / "guard.toml"
    toml.write_text(f'secret = "{SECRET}"\n\n[routes."/predict"]\nprobabilities = "/probabilities"\n'
                    'features = "/features"\noutput = ["round:2"]\n')
    yaml = tmp_path / "guard.yaml"
    yaml.write_text(f"secret: {SECRET}\nroutes:\n  /predict:\n    probabilities: /probabilities\n"
                    "    features: /features\n    output: [round:2]\n")
    by_keywords = Policy(secret=SECRET, routes={"/predict": RoutePolicy(**ROUTE)})
    assert Policy.from_file(toml) == Policy.from_file(yaml) == Policy.from_dict(
        {"secret": SECRET, "routes": {"/predict": ROUTE}}) == by_keywords
    route = by_keywords.routes["/predict"]
    assert route.degraded_output == ["label_only"] and route.labels is None
    assert by_keywords.max_body_bytes == 1 << 20
    assert SECRET not in repr(by_keywords) and by_keywords.secret_bytes == SECRET.encode()


@pytest.mark.parametrize("route, message", [
    ({**ROUTE, "output": ["round:x"]}, "not a valid int"),
    ({**ROUTE, "output": ["blur"]}, "unknown output spec"),
    ({**ROUTE, "degraded_output": ["label_only", "round:1"]}, "label_only must be the last"),
    ({**ROUTE, "probabilities": "probabilities"}, "start with '/'"),
    ({**ROUTE, "rate": 5}, "Extra inputs are not permitted"),
    ({"probabilities": "/p", "output": ["noise:0.1"]}, "noise is seeded by the features"),
    ({"probabilities": "/p", "detectors": ["prada"]}, "detectors watch features"),
    ({**ROUTE, "features": ["/a"], "features_width": 2}, "features_width applies"),
    ({**ROUTE, "features": "/x", "features_in": "query"}, "list of parameter names"),
    ({**ROUTE, "features_function": "os:nothing_here"}, "does not name a function"),
    ({**ROUTE, "features_function": "os:getcwd"}, "either `features` or `features_function`"),
    ({**ROUTE, "probabilities_flat": True}, "needs `labels`"),
    ({**ROUTE, "label_only_as": "onehot"}, "label_only_as"),
    ({**ROUTE, "labels": ["a", "a"]}, "distinct"),
    ({**ROUTE, "tolerance": 0}, "greater than 0"),
])
def test_bad_routes_fail_at_load_time(route, message):
    with pytest.raises(ValidationError, match=message):
        Policy.from_dict({"secret": SECRET, "routes": {"/predict": route}})


@pytest.mark.parametrize("policy, message", [
    ({"secret": SECRET, "routes": {"predict": ROUTE}}, "starting with '/'"),
    ({"secret": "short", "routes": {}}, "at least 16"),
    ({"secret": SECRET, "max_body_bytes": 0}, "greater than 0"),
    ({"secret": SECRET, "unknown": 1}, "Extra inputs are not permitted"),
])
def test_bad_policies_fail_at_load_time(policy, message):
    with pytest.raises(ValidationError, match=message):
        Policy.from_dict(policy)


def test_without_a_secret_a_random_one_serves_a_single_process_that_needs_none():
    first, second = Policy(routes={"/predict": ROUTE}), Policy.from_dict({})
    assert first.secret_bytes == second.secret_bytes and len(first.secret_bytes) >= 32


@pytest.mark.parametrize("settings, reason", [
    ({"store": "redis://127.0.0.1:6379/0"}, "shared store"),
    ({"identity": {"header": "X-API-Key"}}, "API keys"),
    ({"routes": {"/predict": {**ROUTE, "output": ["noise:0.3"]}}}, "noise"),
    ({"routes": {"/predict": {**ROUTE, "degraded_output": ["noise:0.3", "label_only"]}}}, "noise"),
])
def test_a_secret_is_required_where_it_matters(settings, reason):
    with pytest.raises(ValidationError, match=reason):
        Policy.from_dict(settings)
    with pytest.warns(UserWarning, match="development only"):
        Policy.from_dict({**settings, "dev_random_secret": True})
    Policy.from_dict({**settings, "secret": SECRET})


@pytest.mark.parametrize("environment", [{"WEB_CONCURRENCY": "2"}, {"SERVER_SOFTWARE": "gunicorn/22.0"}])
def test_a_secret_is_required_with_several_workers(monkeypatch, environment):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match="several worker processes"):
        Policy.from_dict({})


def test_a_uvicorn_worker_process_needs_a_secret():
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert "several worker processes" in pool.apply(secret_error)


def secret_error() -> str:
    try:
        Policy.from_dict({})
    except ValidationError as error:
        return str(error)
    return ""


def test_unknown_file_types_are_refused(tmp_path):
    path = tmp_path / "guard.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match=".toml, .yaml or .yml"):
        Policy.from_file(path)


@pytest.mark.parametrize("settings, message", [
    ({"store": "memcached://localhost"}, "unknown state store URI"),
    ({"store": "localhost:6379"}, "unknown state store URI"),
    ({"store": "redis:/localhost"}, "two slashes"),
    ({"store": "redis://"}, "names no host"),
    ({"store": "redis://localhost:63x9/0"}, "port is not a number"),
    ({"store": "redis://localhost/zero"}, "database is a number"),
    ({"store": "unix://redis.sock"}, "absolute path"),
    ({"store": "memory://big"}, "just memory://"),
    ({"routes": {"/predict": {**ROUTE, "free_methods": ["options"]}}}, "upper case"),
    ({"metrics_path": "metrics"}, "metrics_path"),
    ({"metrics_path": "/predict"}, "not a guarded route"),
])
def test_bad_server_settings_fail_at_load_time(settings, message):
    with pytest.raises(ValidationError, match=message):
        Policy.from_dict({"secret": SECRET, "routes": {"/predict": ROUTE}, **settings})
